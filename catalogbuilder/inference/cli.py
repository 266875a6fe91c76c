"""``catalogbuilder infer``: predict every spectrum of a store with one model on a Dask cluster."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from catalogbuilder.cluster import add_cluster_arguments
from catalogbuilder.constants import (
    CONVOLUTION_MODES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DRAWS,
    DEFAULT_RETRIES,
    PRECISIONS,
    ROWS_TUNING_MIN_SPECTRA,
)

log = logging.getLogger(__name__)

EXIT_USAGE = 2  # a cluster or device configuration that cannot run (README: usage or configuration error)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``infer`` sub-command."""
    from catalogbuilder.inference.device import CPU_DEFAULT_ROWS, GPU_DEFAULT_ROWS

    parser = subparsers.add_parser(
        "infer",
        help="predict Teff, log g, [Fe/H] (+RV) for every spectrum of a store (skips what is already done)",
        description=(
            "Map a model over the spectra of its grid in a spectrum store with Dask; per-spectrum results (values, "
            "Monte-Carlo raw errors, provenance) go to STORE/results/<model>/<weights sha256[:16]>/. "
            "Exit status 1 when a task failed for good (its spectra are recorded as no_result)."
        ),
    )
    parser.add_argument("--store", required=True, help="spectrum store directory (from `catalogbuilder ingest`)")
    parser.add_argument("--model", required=True, help="shipped model name or model directory")
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="Monte-Carlo draws per spectrum (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each spectrum's draws use spectrum_seed(id, seed)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="spectra per model call")
    parser.add_argument(
        "--spectra-per-task", type=int, default=None, help="spectra per Dask task (default: the store's chunks)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=None,
        help=f"rows per forward pass (default: measured by each worker when at least {ROWS_TUNING_MIN_SPECTRA} spectra "
        f"per worker slot are pending, else whole spectra's draws within {CPU_DEFAULT_ROWS} rows on CPU, "
        f"{GPU_DEFAULT_ROWS} on GPU)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32",
        help="float32 (default, reproduces the reference), tf32 or bf16 (faster on GPUs, ~1e-3 relative; the GPU "
        "benchmark prints the drift)",
    )
    parser.add_argument(
        "--convolution", choices=CONVOLUTION_MODES, default="auto",
        help="BossNet-family convolutions: auto (default: per layer the faster of torch's convolution and the FFT "
        "form, measured by each worker), direct or fft (forced on every worker: bit-identical across workers)",
    )
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="extra attempts of a failed task")
    parser.add_argument(
        "--photometry", metavar="FILE", default=None,
        help="Parquet table with spectrum_id + Gaia/2MASS columns (the `catalogbuilder crossmatch` output) for models "
        "that read photometry (APOGEE Net II); without it they use the store's header 2MASS and impute Gaia "
        "(rows missing_photometry). Spectra done from other photometry are recomputed. Ignored by other models",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``infer`` and print its summary; 0 when every task succeeded, 1 when some failed for good or results could
    not be written (e.g. a full disk), 2 for a usage error (no store there, unknown model, refused weights, bad
    option or photometry table, a cluster or device configuration that cannot run such as several worker processes on
    one GPU), each with one line."""
    from catalogbuilder.config import resolve_model_dir
    from catalogbuilder.models.weight_files import hash_in_background

    with contextlib.suppress(FileNotFoundError):  # an unknown model is reported by run_inference
        hash_in_background(resolve_model_dir(args.model))  # on a second core while torch and Dask are imported
    from catalogbuilder.cluster import connect_from_args
    from catalogbuilder.inference.graph import ResultsWriteError, run_inference
    from catalogbuilder.store import SpectrumStore, StoreError

    try:
        store = SpectrumStore.open(args.store)
    except StoreError as error:
        print(f"catalogbuilder infer: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # a local CPU cluster runs its workers as threads here: forward passes release the GIL (cluster.py)
        with connect_from_args(args, in_process=True) as client:
            report = run_inference(
                client, store, args.model, draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                spectra_per_task=args.spectra_per_task, device=args.device, max_batch=args.max_batch,
                retries=args.retries, progress=not args.no_progress, photometry=args.photometry,
                precision=args.precision, convolution=args.convolution,
            )
    except ResultsWriteError as error:
        print(f"catalogbuilder infer: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as error:  # ConfigError, WeightsError, GpuPlacementError: ValueErrors
        print(f"catalogbuilder infer: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(report.summary())
    for start, stop, reason in report.failed_chunks:
        print(f"  failed task spectra [{start}, {stop}): {reason}")
    return 1 if report.failed_chunks else 0
