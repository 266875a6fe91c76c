"""``catalogbuilder crossmatch``: match the spectra of a store with Gaia/2MASS catalogs and write the match table."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import dask

from catalogbuilder.cluster import add_cluster_arguments, cluster_requested, connect_from_args
from catalogbuilder.crossmatch.match import DEFAULT_RADIUS_ARCSEC

if TYPE_CHECKING:
    from catalogbuilder.crossmatch.cache import MatchConfig
    from catalogbuilder.crossmatch.match import CatalogColumns


def add_catalog_arguments(parser: argparse.ArgumentParser) -> None:
    """``--catalog``, ``--radius``, ``--column``, ``--epoch``, ``--margin-cache`` and the cluster options (shared with
    ``catalogbuilder release``)."""
    parser.add_argument("--catalog", action="append", default=[], metavar="FILE_OR_HATS",
                        help="Gaia catalog: FITS/ECSV/VOTable/Parquet/CSV/NPZ file or HATS directory; repeat to give "
                        "fall-backs in priority order (default: none, every spectrum MISSING_PHOTOMETRY)")
    parser.add_argument("--radius", type=float, default=DEFAULT_RADIUS_ARCSEC, metavar="ARCSEC",
                        help=f"match radius in arcsec (default {DEFAULT_RADIUS_ARCSEC:g})")
    parser.add_argument("--column", action="append", default=[], metavar="OUTPUT=CATALOG",
                        help="catalog column for an output column, e.g. phot_g_mean_mag=g (default: the alias map of docs/tables.md)")
    parser.add_argument("--epoch", type=float, default=None, metavar="YEAR",
                        help="Julian year of the spectrum positions (e.g. 2000 for 2MASS-based APOGEE positions): catalog "
                        "sources are first moved there by their proper motions (default: compare positions as given)")
    parser.add_argument("--margin-cache", metavar="DIR", help="HATS margin cache of the catalog (if not in its collection)")
    add_cluster_arguments(parser, device="cpu")


def catalog_columns(pairs: list[str]) -> CatalogColumns:
    """:class:`CatalogColumns` from ``OUTPUT=CATALOG`` strings; ``ValueError`` on a malformed pair or unknown name."""
    from catalogbuilder.crossmatch.match import CatalogColumns

    mapping = {}
    for pair in pairs:
        output, separator, name = pair.partition("=")
        if not separator or not output or not name:
            raise ValueError(f"--column wants OUTPUT=CATALOG, got {pair!r}")
        mapping[output.strip()] = name.strip()
    return CatalogColumns.from_mapping(mapping)


def match_config(args: argparse.Namespace) -> MatchConfig:
    """The :class:`~catalogbuilder.crossmatch.cache.MatchConfig` of the options of :func:`add_catalog_arguments`."""
    from catalogbuilder.crossmatch.cache import MatchConfig

    return MatchConfig(tuple(str(Path(c).expanduser().resolve()) for c in args.catalog), args.radius,
                       catalog_columns(args.column), args.margin_cache, args.epoch)


def cluster_or_local(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The cluster named by the options, or Dask's threaded scheduler in this process (explicitly, so that a
    distributed client left open in the same process is never used by accident)."""
    return connect_from_args(args) if cluster_requested(args) else dask.config.set(scheduler="threads")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``crossmatch`` sub-command."""
    parser = subparsers.add_parser(
        "crossmatch", help="match the store's spectra with Gaia/2MASS catalogs (one row per spectrum)",
        description="Nearest catalog source within the radius for every spectrum of the store; writes a Parquet "
        "table with gaia_source_id, gaia_sep_arcsec, G/BP/RP, parallax, 2MASS J/H/K, n_bands and missing_bands.",
    )
    parser.add_argument("--store", required=True, metavar="PATH", help="spectrum store folder")
    parser.add_argument("--out", required=True, metavar="FILE", help="output Parquet file")
    add_catalog_arguments(parser)
    parser.set_defaults(func=run_crossmatch)


def run_crossmatch(args: argparse.Namespace) -> int:
    """Cross-match and write atomically; exit 2 on bad options, an unreadable catalog or no store there, 1 when the
    table or the store's cross-match cache cannot be written (e.g. a full disk)."""
    from catalogbuilder.crossmatch.cache import MatchCache, matches_of
    from catalogbuilder.files import WriteError, atomic_write
    from catalogbuilder.store import SpectrumStore, StoreError
    from catalogbuilder.files import error_line

    try:
        store = SpectrumStore.open(args.store)
        cache = MatchCache(store, match_config(args))
        with cluster_or_local(args):
            cache.update()
        matches = matches_of(cache, store.grids())
    except (ValueError, FileNotFoundError, StoreError) as error:
        print(f"catalogbuilder crossmatch: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the store's cross-match cache could not be written (e.g. a full disk)
        print(f"catalogbuilder crossmatch: cannot write in the store {args.store}: {error_line(error)}; {args.out} is unchanged",
              file=sys.stderr)
        return 1
    try:
        with atomic_write(args.out) as temporary:  # a killed or failed write leaves the previous file as it was
            matches.to_parquet(temporary, index=False)
    except ValueError as error:
        print(f"catalogbuilder crossmatch: {error}", file=sys.stderr)
        return 2
    except WriteError as error:
        print(f"catalogbuilder crossmatch: {error}", file=sys.stderr)
        return 1
    print(f"{int(matches['gaia_matched'].sum())} of {len(matches)} spectra matched within {args.radius:g}\" -> {args.out}")
    return 0
