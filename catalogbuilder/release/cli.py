"""``catalogbuilder release``: cross-match, calibrate, flag and write the allStar/allVisit tables and the summary."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from catalogbuilder.crossmatch.cli import add_catalog_arguments, cluster_or_local, match_config

if TYPE_CHECKING:
    from catalogbuilder.calibrate.flags import FlagThresholds


def flag_thresholds(pairs: list[str]) -> FlagThresholds:
    """:class:`FlagThresholds` with ``NAME=VALUE`` overrides; ``ValueError`` on an unknown name or a bad number."""
    from catalogbuilder.calibrate.flags import FlagThresholds

    names = {field.name for field in dataclasses.fields(FlagThresholds)}
    overrides = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or name not in names:
            raise ValueError(f"--threshold wants NAME=VALUE with NAME one of {sorted(names)}, got {pair!r}")
        try:
            overrides[name] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {name} wants a number, got {value!r}") from None
    return FlagThresholds(**overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``release`` sub-command."""
    parser = subparsers.add_parser(
        "release", help="write allStar/allVisit FITS + Parquet tables, summary and Kiel diagrams",
        description="For every model with results in the store and every survey: cross-match new positions with "
        "the catalogs, apply the DR19 error calibration and result flags, and write <out>/<survey>/<model>/"
        "allStar-<model>-<survey>/ (a partitioned Parquet table, one row per star) and allVisit-... (one row per "
        "visit spectrum), failed inputs included, the single .fits.gz of each table, summary.csv/json and "
        "kiel-<model>.png; only partitions whose inputs changed are rewritten; published at once (manifest.json).",
    )
    parser.add_argument("--store", required=True, metavar="PATH", help="spectrum store folder (with results/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="release folder (created; tables overwritten)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="flag threshold override, e.g. snr_min=5 (see docs/release.md)")
    parser.add_argument("--no-fits", dest="fits", action="store_false",
                        help="write only the partitioned Parquet tables (nightly increments); a FITS file whose table "
                        "changed is withdrawn")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_catalog_arguments(parser)
    parser.set_defaults(func=run_release)


def run_release(args: argparse.Namespace) -> int:
    """Build and publish the release; exit 2 on bad options, an unreadable catalog or a store without results, 1 when
    it, or the store's cross-match cache and compacted results it needs, cannot be written (the previous release
    stays)."""
    from catalogbuilder.release.build import ReleaseOptions, build_release
    from catalogbuilder.release.writer import ReleaseWriteError
    from catalogbuilder.store import SpectrumStore, StoreError
    from catalogbuilder.files import error_line

    try:
        options = ReleaseOptions(match_config(args), flag_thresholds(args.threshold), args.fits)
        store = SpectrumStore.open(args.store)
        with cluster_or_local(args):
            report = build_release(store, args.out, options, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, StoreError) as error:
        print(f"catalogbuilder release: {error}", file=sys.stderr)
        return 2
    except ReleaseWriteError as error:  # e.g. a full disk: the previous release is left as it was
        print(f"catalogbuilder release: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the store's cross-match cache or results could not be written (e.g. a full disk)
        print(f"catalogbuilder release: cannot write in the store {args.store}: {error_line(error)}; nothing was published, the "
              "previous release is unchanged", file=sys.stderr)
        return 1
    columns = ["survey", "level", "model", "rows", "with_result", "flag_warn", "flag_bad"]
    print(report.summary()[columns].to_string(index=False))
    print(f"release written to {args.out}: {report.partitions_written} partitions written, {report.partitions_kept} "
          f"unchanged, {len(report.fits_written)} FITS files, {report.seconds:.1f} s")
    return 0
