"""``catalogbuilder ingest`` and ``catalogbuilder store info``: fill a spectrum store and look into it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any

from catalogbuilder.cluster import add_cluster_arguments, cluster_requested, connect_from_args

log = logging.getLogger(__name__)

# Documented survey values of read_spectra (validated again by the ingest against the installed readers).
SURVEY_VALUES: tuple[str, ...] = ("auto", "apogee", "apogee-visit", "boss", "lamost")
# Without cluster options, inputs up to this many files are ingested in this process; more start a local cluster.
SERIAL_MAX_FILES = 100
EXIT_FAILED = 2
EXIT_CONFLICT = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` and ``store`` sub-commands."""
    ingest = subparsers.add_parser(
        "ingest",
        help="read FITS spectra into a spectrum store (idempotent, one atomic commit)",
        description="Read, resample and append FITS spectra to the store in one atomic commit. Files whose bytes are "
        "already in the store are skipped; unreadable files are recorded as rejects and do not stop the run. "
        f"Without cluster options, up to {SERIAL_MAX_FILES} files are read in this process, more on a local Dask "
        "cluster.",
    )
    ingest.add_argument("--store", required=True, metavar="PATH", help="store folder (created if missing)")
    ingest.add_argument(
        "--survey", choices=SURVEY_VALUES, default="auto", help="file format (default: detect per file)"
    )
    ingest.add_argument(
        "inputs", nargs="+", metavar="FILES_OR_@LIST", help="FITS files, folders of *.fits[.gz], or @list.txt"
    )
    ingest.add_argument(
        "--batch-size", type=int, default=None, help="files per Dask batch (default: 4 per worker thread)"
    )
    ingest.add_argument("--serial", action="store_true", help="read in this process, without Dask")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cluster_arguments(ingest)
    ingest.set_defaults(func=run_ingest)

    store = subparsers.add_parser("store", help="inspect a spectrum store")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    info = store_commands.add_parser("info", help="counts per grid, survey and kind; files, rejects, snapshots")
    info.add_argument("path", help="store folder")
    info.add_argument("--json", action="store_true", help="print the counts as JSON")
    info.add_argument("--rejects", action="store_true", help="also list every rejected file with its reason")
    info.set_defaults(func=run_info)
    check = store_commands.add_parser("check", help="verify the store is consistent (exit 1 listing problems if not)")
    check.add_argument("path", help="store folder")
    check.set_defaults(func=run_check)
    gc = store_commands.add_parser(
        "gc",
        help="delete data left by killed or conflicting ingests (only when no ingest older than --hours is running)",
    )
    gc.add_argument("path", help="store folder")
    gc.add_argument("--hours", type=float, default=24 * 7, help="only delete objects older than this (default: 168)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    gc.set_defaults(func=run_gc)


def _wants_cluster(args: argparse.Namespace, n_files: int) -> bool:
    """Dask when asked for (any cluster option) or when the input is large; never with ``--serial``."""
    if args.serial:
        return False
    return cluster_requested(args) or n_files > SERIAL_MAX_FILES


def run_ingest(args: argparse.Namespace) -> int:
    """Ingest; exit 0 when the run completed (rejects included), non-zero when nothing could be done."""
    from catalogbuilder.store import SpectrumStore, StoreConflictError, StoreError, expand_inputs

    try:
        paths = expand_inputs(args.inputs)
        store = SpectrumStore.open(args.store)
    except (OSError, StoreError) as error:
        print(f"catalogbuilder ingest: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not paths:
        print("catalogbuilder ingest: no input files found", file=sys.stderr)
        return EXIT_FAILED
    cluster = connect_from_args(args) if _wants_cluster(args, len(paths)) else contextlib.nullcontext(None)
    try:
        with cluster as client:
            report = store.ingest(
                paths, survey=args.survey, client=client, progress=not args.no_progress, batch_size=args.batch_size
            )
    except StoreConflictError as error:
        print(f"catalogbuilder ingest: {error}", file=sys.stderr)
        return EXIT_CONFLICT
    except (OSError, ValueError, StoreError) as error:
        print(f"catalogbuilder ingest: nothing committed: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(report.summary())
    return 0


def format_info(info: dict[str, Any]) -> str:
    """The ``store info`` text: one line per grid and per survey/kind, then totals."""
    lines = [f"store {info['path']} (snapshot {info['snapshot_id']}, {info['snapshots']} snapshots)"]
    for grid, counts in info["grids"].items():
        lines.append(f"  {grid:8s} {counts['spectra']:10d} spectra")
        lines += [f"    {key:22s} {n:10d}" for key, n in counts["by_survey_kind"].items()]
    lines.append(
        f"  total    {info['total_spectra']:10d} spectra from {info['files']} files; {info['rejects']} rejected files"
    )
    return "\n".join(lines)


def _open_existing(args: argparse.Namespace) -> Any:
    """The store at ``args.path`` (never created here), or None after printing why not."""
    from pathlib import Path

    from catalogbuilder.store import SpectrumStore, StoreError

    if not Path(args.path).is_dir():
        print(f"catalogbuilder store {args.store_command}: no store at {args.path}", file=sys.stderr)
        return None
    try:
        return SpectrumStore.open(args.path)
    except StoreError as error:
        print(f"catalogbuilder store {args.store_command}: {error}", file=sys.stderr)
        return None


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 when the latest snapshot is consistent, 1 (listing the problems) when not."""
    store = _open_existing(args)
    if store is None:
        return EXIT_FAILED
    problems = store.check()
    print("\n".join(problems) if problems else f"{store.path}: consistent (snapshot {store.snapshot_id})")
    return 1 if problems else 0


def run_gc(args: argparse.Namespace) -> int:
    """Garbage-collect unreferenced objects older than ``--hours``."""
    import datetime

    store = _open_existing(args)
    if store is None:
        return EXIT_FAILED
    summary = store.garbage_collect(datetime.timedelta(hours=args.hours), dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{store.path}: {verb} "
        + ", ".join(f"{value} {key.removesuffix('_deleted')}" for key, value in summary.items())
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the store's counts (text or JSON)."""
    store = _open_existing(args)
    if store is None:
        return EXIT_FAILED
    info = store.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    if args.rejects:
        for row in store.rejects().itertuples(index=False):
            print(f"  rejected {row.file} ({row.sha256[:16] or 'unreadable'}, {row.time}): {row.reason}")
    return 0
