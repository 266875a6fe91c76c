"""``catalogbuilder ingest`` and ``catalogbuilder store info|check|gc|retire|upgrade|regrid``: fill a spectrum store,
look into it, withdraw files, copy an old store into the current layout, and fill models' own grids."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import sys
from typing import Any

from catalogbuilder.cluster import add_cluster_arguments, cluster_requested, connect_from_args

log = logging.getLogger(__name__)

# Without cluster options, inputs up to this many files are ingested in this process; more start a local cluster.
SERIAL_MAX_FILES = 100
SERIAL_MAX_SPECTRA = 65536  # store regrid: more pending spectra start a local cluster (about a minute in one process)
EXIT_FAILED = 1  # the store could not be written (e.g. a full disk); nothing was committed
EXIT_USAGE = 2
EXIT_CONFLICT = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` and ``store`` sub-commands."""
    from catalogbuilder.constants import SURVEY_CHOICES

    ingest = subparsers.add_parser(
        "ingest",
        help="read FITS spectra into a spectrum store (idempotent, one atomic commit)",
        description="Read, resample and append FITS spectra to the store in one atomic commit. Files whose bytes are "
        "already in the store are skipped; unreadable files are recorded as rejects and do not stop the run; new "
        "content at a known path and newer reductions of a known product supersede the older files. "
        f"Without cluster options, up to {SERIAL_MAX_FILES} files are read in this process, more on a local Dask "
        "cluster.",
    )
    ingest.add_argument("--store", required=True, metavar="PATH", help="store folder (created when files are given)")
    ingest.add_argument("--survey", choices=SURVEY_CHOICES, default="auto", help="file format (default: detect per file)")
    ingest.add_argument("inputs", nargs="+", metavar="FILES_OR_@LIST", help="FITS files, folders of *.fits[.gz], or @list.txt")
    ingest.add_argument("--retry-rejects", action="store_true",
                        help="read again files rejected before with the same bytes and reader version")
    ingest.add_argument("--sync", action="store_true",
                        help="the inputs are the complete set: retire every active file (and reject) not among them")
    ingest.add_argument("--batch-size", type=int, default=None, help="files per Dask batch (default: 4 per worker thread)")
    ingest.add_argument("--serial", action="store_true", help="read in this process, without Dask")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cluster_arguments(ingest, device="cpu")
    ingest.set_defaults(func=run_ingest)

    store = subparsers.add_parser("store", help="inspect, check, clean, retire from or upgrade a spectrum store")
    commands = store.add_subparsers(dest="store_command", required=True)
    info = commands.add_parser("info", help="counts per grid, survey and kind; files by status, rejects, snapshots")
    info.add_argument("path", help="store folder")
    info.add_argument("--json", action="store_true", help="print the counts as JSON")
    info.add_argument("--rejects", action="store_true", help="also list every current reject with its reason")
    info.set_defaults(func=run_info)
    check = commands.add_parser("check", help="verify the store is consistent (exit 1 listing problems if not)")
    check.add_argument("path", help="store folder")
    check.set_defaults(func=run_check)
    gc = commands.add_parser("gc", help="delete data left by killed or conflicting writers (older than --hours)")
    gc.add_argument("path", help="store folder")
    gc.add_argument("--hours", type=float, default=24 * 7, help="only delete objects older than this (default: 168)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    gc.set_defaults(func=run_gc)
    retire = commands.add_parser("retire", help="withdraw files: their spectra leave inference and the release")
    retire.add_argument("path", help="store folder")
    retire.add_argument("files", nargs="+", metavar="FILE_OR_@LIST", help="paths of ingested files, or @list.txt")
    retire.set_defaults(func=run_retire)
    upgrade = commands.add_parser("upgrade", help="copy a store of an older layout into a new store at NEW_PATH")
    upgrade.add_argument("path", help="the old store folder (left unchanged)")
    upgrade.add_argument("new_path", help="folder of the new store (must not exist yet)")
    upgrade.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cluster_arguments(upgrade, device="cpu")
    upgrade.set_defaults(func=run_upgrade)
    regrid = commands.add_parser("regrid", help="fill models' own grids from the stored native pixels (new spectra only)")
    regrid.add_argument("path", help="store folder")
    regrid.add_argument("--model", action="append", required=True, metavar="NAME_OR_DIR",
                        help="a model whose catalogbuilder.yaml names its own grid (grid + grid_wavelengths); repeatable")
    regrid.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cluster_arguments(regrid, device="cpu")
    regrid.set_defaults(func=run_regrid)


def _wants_cluster(args: argparse.Namespace, n_files: int) -> bool:
    """Dask when asked for (any cluster option) or when the input is large; never with ``--serial``."""
    if getattr(args, "serial", False):
        return False
    return cluster_requested(args) or n_files > SERIAL_MAX_FILES


def _fail(command: str, error: object) -> int:
    print(f"catalogbuilder {command}: {error}", file=sys.stderr)
    return EXIT_USAGE


def run_ingest(args: argparse.Namespace) -> int:
    """Ingest; exit 0 when the run completed (rejects included), 1 when the store could not be written, 2 on a usage
    error (no input files, no store can be opened or created there), 3 on conflicts."""
    from catalogbuilder.store import SpectrumStore, StoreError, expand_inputs

    try:
        inputs = expand_inputs(args.inputs)
    except OSError as error:
        return _fail("ingest", f"cannot read input list: {error}")
    if not inputs.paths:
        return _fail("ingest", "no input files found (nothing ingested, no store created)")
    try:
        store = SpectrumStore.open(args.store, create=True)
    except StoreError as error:
        return _fail("ingest", error)
    return _ingest(args, store, inputs, "ingest", retry_rejects=args.retry_rejects, sync=args.sync,
                   batch_size=args.batch_size)


def _ingest(args: argparse.Namespace, store: Any, inputs: Any, command: str, **options: Any) -> int:
    from catalogbuilder.store import StoreConflictError, StoreError, StoreWriteError

    cluster = connect_from_args(args) if _wants_cluster(args, len(inputs.paths)) else contextlib.nullcontext(None)
    try:
        with cluster as client:
            report = store.ingest(inputs, survey=getattr(args, "survey", "auto"), client=client,
                                  progress=not args.no_progress, **options)
    except StoreConflictError as error:
        print(f"catalogbuilder {command}: {error}", file=sys.stderr)
        return EXIT_CONFLICT
    except StoreWriteError as error:
        print(f"catalogbuilder {command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError, StoreError) as error:
        return _fail(command, f"nothing committed: {error}")
    print(report.summary())
    return 0


def format_info(info: dict[str, Any]) -> str:
    """The ``store info`` text: one line per grid and per survey/kind, then totals."""
    lines = [f"store {info['path']} (snapshot {info['snapshot_id']}, {info['snapshots']} snapshots)"]
    for grid, counts in info["grids"].items():
        lines.append(f"  {grid:8s} {counts['spectra']:10d} spectra ({counts['active']} active)")
        lines += [f"    {key:22s} {n:10d}" for key, n in counts["by_survey_kind"].items()]
    files = ", ".join(f"{n} {status}" for status, n in sorted(info["files"].items())) or "none"
    lines.append(f"  total    {info['total_spectra']:10d} spectra ({info['active_spectra']} active); files: {files}; "
                 f"{info['rejects']} current rejects")
    return "\n".join(lines)


def _open_existing(args: argparse.Namespace) -> Any:
    """The store at ``args.path`` (never created here), or None after printing why not."""
    from catalogbuilder.store import SpectrumStore, StoreError

    try:
        return SpectrumStore.open(args.path)
    except StoreError as error:
        _fail(f"store {args.store_command}", error)
        return None


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 when the latest snapshot is consistent, 1 (listing the problems) when not."""
    store = _open_existing(args)
    if store is None:
        return EXIT_USAGE
    problems = store.check()
    print("\n".join(problems) if problems else f"{store.path}: consistent (snapshot {store.snapshot_id})")
    return 1 if problems else 0


def run_gc(args: argparse.Namespace) -> int:
    """Garbage-collect unreferenced objects older than ``--hours``."""
    store = _open_existing(args)
    if store is None:
        return EXIT_USAGE
    summary = store.garbage_collect(datetime.timedelta(hours=args.hours), dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{store.path}: {verb} " + ", ".join(f"{value} {key.removesuffix('_deleted')}" for key, value in summary.items()))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the store's counts (text or JSON), and with ``--rejects`` every current reject."""
    store = _open_existing(args)
    if store is None:
        return EXIT_USAGE
    info = store.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    if args.rejects:
        for row in store.rejects().itertuples():
            print(f"  rejected {row.file_path}: {row.reason}")
    return 0


def run_retire(args: argparse.Namespace) -> int:
    """Retire files by path; exit 0, 1 when the store could not be written, 2 when none of them is in the store."""
    from catalogbuilder.store import StoreWriteError
    from catalogbuilder.store.ingest import retire_files

    store = _open_existing(args)
    if store is None:
        return EXIT_USAGE
    try:
        paths = _list_paths(args.files)
    except OSError as error:
        return _fail("store retire", f"cannot read input list: {error}")
    try:
        report = retire_files(store, paths)
    except StoreWriteError as error:
        print(f"catalogbuilder store retire: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(report.summary())
    return EXIT_USAGE if len(report.rejected) == len(paths) else 0


def _list_paths(items: list[str]) -> list[str]:
    """Paths and the lines of ``@list`` files (blank lines and ``#`` comments ignored), in order."""
    from pathlib import Path

    paths = []
    for item in items:
        if item.startswith("@"):
            lines = Path(item[1:]).expanduser().read_text().splitlines()
            paths += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            paths.append(item)
    return paths


def run_upgrade(args: argparse.Namespace) -> int:
    """Ingest every file recorded in the old store into a new store of the current layout."""
    from pathlib import Path

    from catalogbuilder.store import SpectrumStore, StoreError, expand_inputs
    from catalogbuilder.store.ingest import recorded_inputs

    if Path(args.new_path).exists():
        return _fail("store upgrade", f"{args.new_path} exists; give a new folder for the upgraded store")
    try:
        inputs = expand_inputs(recorded_inputs(args.path))
        new = SpectrumStore.open(args.new_path, create=True)
    except (OSError, StoreError) as error:
        return _fail("store upgrade", error)
    print(f"re-ingesting the {len(inputs.paths)} files recorded in {args.path} into {new.path}; run `catalogbuilder "
          "infer` on the new store afterwards (results are computed again)")
    return _ingest(args, new, inputs, "store upgrade")


def run_regrid(args: argparse.Namespace) -> int:
    """Regrid the store's spectra onto each model's own grid; exit 0, 1 when the store could not be written, 2 on a
    usage error (no store, unknown model, a model on an ingest grid, a grid name the store holds with other
    wavelengths)."""
    from catalogbuilder.config import ModelInfoSettings, resolve_model_dir
    from catalogbuilder.store import StoreError, StoreWriteError
    from catalogbuilder.store.layout import derived_grid
    from catalogbuilder.store.regrid import regrid

    store = _open_existing(args)
    if store is None:
        return EXIT_USAGE
    specs = []
    try:
        for model in args.model:
            settings = ModelInfoSettings.read(resolve_model_dir(model))
            if settings.grid_wavelengths is None:
                grid = settings.grid or "the grid its family picks"
                return _fail("store regrid", f"model {model} predicts on an ingest grid ({grid}): nothing to regrid")
            specs.append(derived_grid(settings.grid, **settings.grid_wavelengths.model_dump()))
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        return _fail("store regrid", error)
    pending = sum(store.length(spec.base) - store.length(spec.name) if spec.name in store.derived_grids()
                  else store.length(spec.base) for spec in specs)
    cluster = connect_from_args(args) if cluster_requested(args) or pending > SERIAL_MAX_SPECTRA else (
        contextlib.nullcontext(None))
    try:
        with cluster as client:
            for spec in specs:
                print(regrid(store, spec, client, progress=not args.no_progress).summary())
    except StoreWriteError as error:
        print(f"catalogbuilder store regrid: {error}", file=sys.stderr)
        return EXIT_FAILED
    except StoreError as error:
        return _fail("store regrid", error)
    return 0
