"""``catalogbuilder train``: train any registered network family — BossNet, APOGEE Net I/II on a spectrum store joined
to a label table or on a built training set, or the photometric MLP (dispatched to
:mod:`catalogbuilder.photometric.train`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from catalogbuilder.constants import GRIDS

DEFAULT_LABEL_COLUMNS = "teff=TEFF,logg=LOGG,fe_h=FE_H"
PHOTOMETRIC_FAMILY = "photometric"  # trained on tables by catalogbuilder.photometric.train, not on spectra

# Options that only some kinds of family read (argparse dest → kind): ``spectra`` for the families registered with
# training facts (catalogbuilder.models registry), ``metadata`` for those of them with extra photometry inputs,
# ``photometric`` for the photometric MLP. Giving one to another family is an error, so a misspelt family never
# silently trains something else. Their defaults are None and resolved per family below.
FAMILY_OPTIONS: dict[str, str] = {
    **{dest: "spectra" for dest in ("store", "labels", "training_set", "config", "label_columns", "join_on",
                                    "label_key", "grid", "kind", "description", "epochs", "samples_per_epoch",
                                    "device")},
    "photometry": "metadata",
    **{dest: PHOTOMETRIC_FAMILY for dest in ("apokasc", "gaia", "epochs_mae", "epochs_smape")},
}
STORE_ONLY_OPTIONS: tuple[str, ...] = ("store", "labels", "label_columns", "join_on", "label_key", "grid", "kind",
                                       "photometry")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train a model of any family (bossnet, apogeenet1, apogeenet2, photometric) into a loadable model directory",
        description="Train a BossNet-family or APOGEE Net I/II model on the spectra of a store joined to a label table "
        "(FITS, CSV or Parquet): targets z-scored with training-set stats (stats.yaml), loss weights 1/KDE density in "
        "Teff-logg (cap 5, mean 1), 80/10/10 split by star, noise augmentation, early stopping (patience 5). Writes "
        "model_args.yaml, stats.yaml, model_chunk_0..9, catalogbuilder.yaml and training_report/ into --out. "
        "--family photometric trains the photometric MLP on APOKASC x Gaia (as `catalogbuilder photometric-train`).",
    )
    parser.add_argument("--family", default="bossnet",
                        help="network family registered in catalogbuilder.models: bossnet (default), apogeenet1, "
                        "apogeenet2 (trained on spectra) or photometric (trained on photometry tables)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--name", default=None, help="model name in catalogbuilder.yaml (default: --out's basename)")
    parser.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default 32; photometric 128)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="learning rate (default 2e-3: Adamax; photometric: AdamW 2e-3)")
    parser.add_argument("--patience", type=int, default=None,
                        help="early-stopping patience in epochs (default 5; photometric 30)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the split, initialisation and noise (default 0; photometric 20240601)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                        "photometric 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    spectral = parser.add_argument_group("families trained on spectra (bossnet, apogeenet1, apogeenet2)")
    spectral.add_argument("--store", help="spectrum store directory (catalogbuilder ingest); with --labels")
    spectral.add_argument("--labels", help="label table: .fits, .csv or .parquet")
    spectral.add_argument("--training-set", metavar="NPZ",
                          help="instead of --store/--labels: a training set built by catalogbuilder.training.sources "
                          "(spectra on a model grid, labels and a fixed train/validation/test split)")
    spectral.add_argument("--config", help="model_args.yaml: the BossNet constructor arguments (required for bossnet); "
                          "for apogeenet1/2 optional, it may only set dropout (the architecture is fixed)")
    spectral.add_argument("--photometry", metavar="PARQUET",
                          help="apogeenet2: crossmatch table (spectrum_id + parallax, phot_g/bp/rp_mean_mag, "
                          "tmass_j/h/k); without it the store's header 2MASS is used and Gaia inputs are imputed")
    spectral.add_argument("--label-columns", default=None,
                          help=f"canonical=COLUMN pairs among teff, logg, fe_h, rv (default {DEFAULT_LABEL_COLUMNS}); "
                          "rv is needed for 4-target BossNet models")
    spectral.add_argument("--join-on", choices=("source_id", "file"), default=None,
                          help="match spectra to label rows by object id or by file base name (default source_id)")
    spectral.add_argument("--label-key", default=None,
                          help="key column of the label table (default: source_id, or filename with --join-on file)")
    spectral.add_argument("--grid", choices=GRIDS, default=None,
                          help="model grid (default: the store's only grid; apogee for apogeenet1/2)")
    spectral.add_argument("--kind", choices=("all", "combined", "visit"), default=None,
                          help="spectra to train on (default all)")
    spectral.add_argument("--description", default=None, help="one-line description for catalogbuilder.yaml")
    spectral.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 100)")
    spectral.add_argument("--samples-per-epoch", type=int, default=None,
                          help="pass a small training set several times per epoch (fresh noise each pass) until this "
                          "many samples were seen (default 0: one pass)")
    spectral.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    photometric = parser.add_argument_group("photometric family")
    photometric.add_argument("--apokasc", metavar="FITS", help="APOKASC_Catalog.v7.1.fits")
    photometric.add_argument("--gaia", metavar="NPZ", help="astroNN_gaiadr2_apogeedr14_parallax.npz")
    photometric.add_argument("--epochs-mae", type=int, default=None, help="epochs of the MAE phase (default 120)")
    photometric.add_argument("--epochs-smape", type=int, default=None, help="epochs of the SMAPE phase (default 40)")
    parser.set_defaults(func=run)


def check_family_options(args: argparse.Namespace) -> str:
    """The kind of ``args.family`` (``spectra`` or ``photometric``); ``ValueError`` naming an unknown family, the first
    option the family does not read, or a missing required one."""
    from catalogbuilder.models.registry import network_family, registered_families

    family = network_family(args.family) if args.family in registered_families() else None
    if family is None or not (family.trains_on_spectra or family.name == PHOTOMETRIC_FAMILY):
        raise ValueError(f"cannot train family {args.family!r}; trainable families: "
                         f"{registered_families(trains_on_spectra=True) + [PHOTOMETRIC_FAMILY]}")
    kinds = {"spectra"} | ({"metadata"} if family.metadata_width else set()) if family.trains_on_spectra \
        else {PHOTOMETRIC_FAMILY}
    for dest, kind in FAMILY_OPTIONS.items():
        if getattr(args, dest) is not None and kind not in kinds:
            raise ValueError(f"--{dest.replace('_', '-')} is not used by --family {args.family}")
    if family.name == PHOTOMETRIC_FAMILY:
        required = ("apokasc", "gaia")
    elif args.training_set is not None:
        given = [dest for dest in STORE_ONLY_OPTIONS if getattr(args, dest) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} belongs to training from a store; a --training-set "
                             "holds its spectra, labels and split")
        required = ()
    else:
        required = ("store", "labels")
    for dest in required:
        if getattr(args, dest) is None:
            raise ValueError(f"--family {args.family} needs --{dest.replace('_', '-')}"
                             + (" (or --training-set)" if dest in ("store", "labels") else ""))
    return "spectra" if family.trains_on_spectra else PHOTOMETRIC_FAMILY


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` that were given (not None), keyed by their argparse dest."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_spectral(args: argparse.Namespace) -> int:
    """Train a family on spectra, from a store + labels or from a training set; prints the directory, checksum and
    test metrics."""
    from catalogbuilder.training.data import parse_label_columns
    from catalogbuilder.training.train import train_from_set, train_from_store

    training = dict(progress=not args.no_progress,
                    **_given(args, "epochs", "seed", "device", "batch_size", "samples_per_epoch", "learning_rate",
                             "patience"))
    if args.training_set is not None:
        trained = train_from_set(args.training_set, args.config, args.out, family=args.family, name=args.name,
                                 description=args.description or "", **training)
    else:
        trained = train_from_store(
            args.store, args.labels, args.config, args.out,
            parse_label_columns(args.label_columns or DEFAULT_LABEL_COLUMNS), join_on=args.join_on or "source_id",
            key_column=args.label_key, grid=args.grid, kind=args.kind or "all", name=args.name,
            description=args.description or "", family=args.family, photometry=args.photometry, **training,
        )
    print(f"{args.family} model written to {args.out} (weights_sha256 {trained.weights_sha256})")
    print(f"best epoch {trained.history.best_epoch}: validation loss {trained.history.best_val_loss:.4f} "
          f"(start {trained.history.initial_val_loss:.4f})")
    for name, metric in trained.test_metrics.items():
        print(f"test {name}: RMS {metric['rms']:.4g} vs predict-the-mean {metric['baseline_rms']:.4g} (n={metric['n']})")
    return 0


def run_photometric(args: argparse.Namespace) -> int:
    """Train the photometric MLP with :func:`catalogbuilder.photometric.train.train_demo` (MAE → SMAPE through the
    training loop :func:`catalogbuilder.training.train.fit`); prints the test scores next to the predict-the-mean baseline as JSON."""
    from pathlib import Path

    from catalogbuilder.photometric.train import TrainingSettings, train_demo

    settings = TrainingSettings(**_given(args, "epochs_mae", "epochs_smape", "batch_size", "learning_rate",
                                         "patience", "seed", "threads"))
    metrics = train_demo(args.apokasc, args.gaia, args.out, args.name or Path(args.out).name, settings)
    print(json.dumps({target: {"test": values["test"], "baseline": values["test_baseline_mean"]}
                      for target, values in metrics["targets"].items()}, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``catalogbuilder train``; exit status 2 with a one-line reason on bad input (nothing written)."""
    import torch

    try:
        kind = check_family_options(args)
        if args.threads and kind != PHOTOMETRIC_FAMILY:  # the photometric trainer sets its own
            torch.set_num_threads(args.threads)
        return run_photometric(args) if kind == PHOTOMETRIC_FAMILY else run_spectral(args)
    except (ValueError, KeyError, FileNotFoundError) as error:  # bad inputs: a one-line reason, no traceback
        print(f"catalogbuilder train: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
