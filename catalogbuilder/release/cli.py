"""``catalogbuilder release``: cross-match, calibrate, flag and write the allStar/allVisit tables and the summary."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from catalogbuilder.crossmatch.cli import add_catalog_arguments, catalog_columns, cluster_or_local

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
        overrides[name] = float(value)
    return FlagThresholds(**overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``release`` sub-command."""
    parser = subparsers.add_parser(
        "release", help="write allStar/allVisit FITS + Parquet tables, summary and Kiel diagrams",
        description="For every model with results in the store and every survey: cross-match with the catalogs, "
        "apply the DR19 error calibration and result flags, and write <out>/<survey>/<model>/allStar-<model>-"
        "<survey>.{fits.gz,parquet} (combined spectra) and allVisit-... (visits), one row per input spectrum "
        "including failed ones, plus crossmatch.parquet, summary.csv/json and kiel-<model>.png.",
    )
    parser.add_argument("--store", required=True, metavar="PATH", help="spectrum store folder (with results/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="release folder (created; tables overwritten)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="flag threshold override, e.g. snr_min=5 (see docs/release.md)")
    add_catalog_arguments(parser)
    parser.set_defaults(func=run_release)


def run_release(args: argparse.Namespace) -> int:
    """Build the release; exit 2 on bad options, an unreadable catalog or a store without results."""
    from catalogbuilder.release.summary import summarize
    from catalogbuilder.release.tables import build_release

    try:
        columns = catalog_columns(args.column)
        thresholds = flag_thresholds(args.threshold)
        with cluster_or_local(args):
            tables = build_release(
                args.store, args.out, args.catalog, args.radius, columns, thresholds, args.margin_cache, args.epoch
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"release: {error}", file=sys.stderr)
        return 2
    print(summarize(tables)[["survey", "level", "model", "rows", "with_result", "flag_warn", "flag_bad"]].to_string(index=False))
    print(f"release written to {args.out}")
    return 0
