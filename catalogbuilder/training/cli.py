"""``catalogbuilder train``: train a BossNet-family model on a spectrum store joined to a label table."""
from __future__ import annotations

import argparse
import sys

from catalogbuilder.constants import GRIDS

DEFAULT_LABEL_COLUMNS = "teff=TEFF,logg=LOGG,fe_h=FE_H"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train a BossNet-family model (official weight format) on stored spectra and a label table",
        description="Train a BossNet-family model on the spectra of a store joined to a label table (FITS, CSV or "
        "Parquet). Targets are z-scored with training-set stats (stats.yaml), loss weights are 1/KDE density in "
        "Teff-logg (cap 5, mean 1), the split is 80/10/10 by star, early stopping has patience 5. Writes "
        "model_args.yaml, stats.yaml, model_chunk_0..9, catalogbuilder.yaml and training_report/ into --out.",
    )
    parser.add_argument("--store", required=True, help="spectrum store directory (catalogbuilder ingest)")
    parser.add_argument("--labels", required=True, help="label table: .fits, .csv or .parquet")
    parser.add_argument("--config", required=True, help="model_args.yaml with the BossNet constructor arguments")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--label-columns", default=DEFAULT_LABEL_COLUMNS,
                        help=f"canonical=COLUMN pairs among teff, logg, fe_h, rv (default {DEFAULT_LABEL_COLUMNS}); "
                        "rv is needed for 4-target models")
    parser.add_argument("--join-on", choices=("source_id", "file"), default="source_id",
                        help="match spectra to label rows by object id or by file base name (default source_id)")
    parser.add_argument("--label-key", default=None,
                        help="key column of the label table (default: source_id, or filename with --join-on file)")
    parser.add_argument("--grid", choices=GRIDS, default=None, help="model grid (default: the store's only grid)")
    parser.add_argument("--kind", choices=("all", "combined", "visit"), default="all", help="spectra to train on")
    parser.add_argument("--name", default=None, help="model name in catalogbuilder.yaml (default: --out's basename)")
    parser.add_argument("--description", default="", help="one-line description for catalogbuilder.yaml")
    parser.add_argument("--epochs", type=int, default=100, help="maximum epochs (default 100)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default 5)")
    parser.add_argument("--samples-per-epoch", type=int, default=0,
                        help="pass a small training set several times per epoch (fresh noise each pass) until this "
                        "many samples were seen (default 0: one pass)")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adamax learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and noise (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``catalogbuilder train``; prints the output directory, weights checksum and test metrics."""
    import torch

    from catalogbuilder.training.data import parse_label_columns
    from catalogbuilder.training.train import train_from_store

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trained = train_from_store(
            args.store, args.labels, args.config, args.out, parse_label_columns(args.label_columns),
            join_on=args.join_on, key_column=args.label_key, grid=args.grid, kind=args.kind, name=args.name,
            description=args.description, epochs=args.epochs, seed=args.seed, device=args.device,
            batch_size=args.batch_size, samples_per_epoch=args.samples_per_epoch, learning_rate=args.learning_rate,
            patience=args.patience, progress=not args.no_progress,
        )
    except (ValueError, KeyError, FileNotFoundError) as error:  # bad inputs: a one-line reason, no traceback
        print(f"catalogbuilder train: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    print(f"model written to {args.out} (weights_sha256 {trained.weights_sha256})")
    print(f"best epoch {trained.history.best_epoch}: validation loss {trained.history.best_val_loss:.4f} "
          f"(start {trained.history.initial_val_loss:.4f})")
    for name, metric in trained.test_metrics.items():
        print(f"test {name}: RMS {metric['rms']:.4g} vs predict-the-mean {metric['baseline_rms']:.4g} (n={metric['n']})")
    return 0
