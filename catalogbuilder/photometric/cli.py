"""``catalogbuilder photometric`` (predict from a photometry table) and ``catalogbuilder photometric-train``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from catalogbuilder.cluster import add_cluster_arguments, cluster_requested, connect_from_args
from catalogbuilder.config import DEFAULT_PHOTOMETRIC_MODEL, EXIT_CONFIG_ERROR, model_name
from catalogbuilder.constants import DEFAULT_DRAWS

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``photometric`` and ``photometric-train`` sub-commands."""
    run = subparsers.add_parser(
        "photometric",
        help="Teff, log g, [Fe/H] for sources with photometry but no spectrum (Survey-of-Surveys MLP)",
        description="Read a Parquet/FITS/CSV table (columns: docs/tables.md), optionally join parallax and Gaia G "
        "by position from --gaia, predict with a photometric model over Dask row partitions and write "
        "OUT/photometric/MODEL/allStar-MODEL-photometric.{fits.gz,parquet}, one row per input row.",
    )
    run.add_argument("--input", required=True, metavar="TABLE", help="input table (.parquet, .fits[.gz], .csv, .ecsv, .vot)")
    run.add_argument("--model", default=DEFAULT_PHOTOMETRIC_MODEL, metavar="NAME_OR_DIR",
                     help=f"model (default: {DEFAULT_PHOTOMETRIC_MODEL})")
    run.add_argument("--out", required=True, metavar="DIR", help="release folder")
    run.add_argument("--gaia", metavar="TABLE", help="catalogue to fill missing parallax/parallax_error/G by position "
                     "(any table with ra, dec and Gaia columns, or the astroNN APOGEE x Gaia .npz)")
    run.add_argument("--radius", type=float, default=1.0, metavar="ARCSEC", help="join radius for --gaia (default 1)")
    run.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help=f"Monte-Carlo draws (default {DEFAULT_DRAWS}; 0: none)")
    run.add_argument("--seed", type=int, default=0, help="run seed; a row's draws depend on it and its object_id only")
    run.add_argument("--partition-rows", type=int, default=50_000, help="rows per Dask partition (default 50000)")
    add_cluster_arguments(run, device="cpu")
    run.set_defaults(func=run_photometric_command)

    train = subparsers.add_parser(
        "photometric-train",
        help="train the photometric MLP on APOKASC x Gaia DR2 (the shipped sos-photometric-demo)",
        description="Join the APOKASC catalogue to the astroNN APOGEE x Gaia DR2 parallax table by position, split by "
        "star (80/10/10), train one network per target (MAE then SMAPE) and write the model directory + metrics.json.",
    )
    train.add_argument("--apokasc", required=True, metavar="FITS", help="APOKASC_Catalog.v7.1.fits")
    train.add_argument("--gaia", required=True, metavar="NPZ", help="astroNN_gaiadr2_apogeedr14_parallax.npz")
    train.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    train.add_argument("--name", default=DEFAULT_PHOTOMETRIC_MODEL, type=model_name,
                       help=f"model name, one folder name (default {DEFAULT_PHOTOMETRIC_MODEL})")
    train.add_argument("--epochs-mae", type=int, default=None, help="epochs of the MAE phase")
    train.add_argument("--epochs-smape", type=int, default=None, help="epochs of the SMAPE phase")
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    train.set_defaults(func=run_train_command)


def run_photometric_command(args: argparse.Namespace) -> int:
    """Predict and publish the release table; exit 2 on an unreadable input table or model, 1 when the table cannot be
    written (e.g. a full disk; the previous table stays)."""
    from catalogbuilder.photometric.stage import photometric_release
    from catalogbuilder.release.writer import ReleaseWriteError

    options = dict(draws=args.draws, seed=args.seed, partition_rows=args.partition_rows, gaia=args.gaia,
                   radius_arcsec=args.radius)
    try:
        if cluster_requested(args):
            with connect_from_args(args) as client:
                rows, fits_path, parquet_path = photometric_release(args.input, args.model, args.out, client=client, **options)
        else:
            rows, fits_path, parquet_path = photometric_release(args.input, args.model, args.out, **options)
    except ReleaseWriteError as error:  # e.g. a full disk: the previous table is left as it was
        print(f"catalogbuilder photometric: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # tables.TableError is a ValueError
        print(f"catalogbuilder photometric: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    counts = rows["status"].value_counts().to_dict()
    print(json.dumps({"rows": len(rows), "status": counts, "flag_bad": int(rows["flag_bad"].sum()),
                      "flag_warn": int(rows["flag_warn"].sum()), "fits": str(fits_path), "parquet": str(parquet_path)}))
    return 0


def run_train_command(args: argparse.Namespace) -> int:
    """Train and save; prints the test scores (and the predict-the-mean baseline) as JSON."""
    from catalogbuilder.photometric.train import TrainingSettings, train_demo

    settings = TrainingSettings(threads=args.threads)
    if args.epochs_mae is not None:
        settings.epochs_mae = args.epochs_mae
    if args.epochs_smape is not None:
        settings.epochs_smape = args.epochs_smape
    metrics = train_demo(args.apokasc, args.gaia, args.out, args.name, settings)
    print(json.dumps({target: {"test": values["test"], "baseline": values["test_baseline_mean"]}
                      for target, values in metrics["targets"].items()}, indent=1))
    return 0
