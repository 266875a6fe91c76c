"""The cross-match kept per spectrum in the store, so that every run matches only positions it has not matched yet.

``<store>/crossmatch/<config key>/<grid>/range-<k>.parquet`` (store/ranged.py): one row per matched spectrum (its
``position`` in the grid, ``spectrum_id`` and the :data:`~catalogbuilder.crossmatch.match.MATCH_COLUMNS`). The key
is a hash of the configuration — each catalog's path, size and modification time, the radius, the column mapping, the
epoch — so a changed catalog or radius starts a new cache and matches everything again. The same folder of range
files is the photometry table APOGEE Net II inference reads (a Parquet dataset with ``spectrum_id`` and the Gaia and
2MASS columns), so one cross-match per run serves inference and release.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from catalogbuilder.constants import PREDICTED_KINDS
from catalogbuilder.crossmatch.match import (
    DEFAULT_RADIUS_ARCSEC,
    CatalogColumns,
    crossmatch,
    is_hats_catalog,
    prepare_catalogs,
)
from catalogbuilder.store import SpectrumStore
from catalogbuilder.store.layout import PHOTOMETRY_KEYS
from catalogbuilder.store.ranged import POSITION, RANGE_SPECTRA, RangeTable

CACHE_DIRNAME = "crossmatch"
CACHE_VERSION = 2  # bump when the match columns or their meaning change (2: the missing-value policy of tables.py)
MATCH_BATCH = 4 * RANGE_SPECTRA  # positions matched per call: bounds memory whatever the store size (~0.7 GB peak)


def _identity(catalog: str | Path) -> dict[str, object]:
    """What identifies a catalog's content cheaply: path, size and modification time (of its properties file for a
    HATS folder)."""
    path = Path(catalog).expanduser().resolve()
    probe = next((path / name for name in ("collection.properties", "hats.properties", "properties")
                  if (path / name).is_file()), path) if is_hats_catalog(path) else path
    status = probe.stat()
    return {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """A cross-match configuration: catalogs in priority order, radius (arcsec), column mapping, margin cache, epoch."""

    catalogs: tuple[str, ...] = ()
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC
    columns: CatalogColumns = CatalogColumns()
    margin_cache: str | None = None
    epoch: float | None = None

    def key(self) -> str:
        """Hash of everything that changes the answer (catalog contents by path, size and mtime)."""
        text = json.dumps({
            "version": CACHE_VERSION, "catalogs": [_identity(c) for c in self.catalogs], "radius": self.radius_arcsec,
            "columns": dataclasses.asdict(self.columns), "margin_cache": self.margin_cache, "epoch": self.epoch,
        }, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class MatchCache:
    """The cached cross-match of one store and configuration."""

    def __init__(self, store: SpectrumStore, config: MatchConfig) -> None:
        for catalog in config.catalogs:
            if not Path(catalog).exists():
                raise FileNotFoundError(f"no catalog at {catalog}")
        self.store = store
        self.config = config
        self.root = store.path / CACHE_DIRNAME / config.key()

    def table(self, grid: str) -> RangeTable:
        return RangeTable(self.root / grid)

    def update(self, positions_of: dict[str, np.ndarray] | None = None) -> dict[str, int]:
        """Match every active spectrum the release lists without a cached row (or only ``positions_of[grid]``);
        returns the number
        matched per grid. Catalogs are read once; positions are matched in batches of :data:`MATCH_BATCH`."""
        prepared = None
        counts = {}
        for grid in self.store.grids():
            todo = self._unmatched(grid) if positions_of is None else np.asarray(positions_of.get(grid, []), np.int64)
            counts[grid] = len(todo)
            if not len(todo):
                continue
            prepared = prepared if prepared is not None else prepare_catalogs(
                self.config.catalogs, self.config.columns, self.config.epoch)
            for first in range(0, len(todo), MATCH_BATCH):
                batch = todo[first:first + MATCH_BATCH]
                spectra = self.store.columns(grid, ("spectrum_id", "ra", "dec", *PHOTOMETRY_KEYS), positions=batch)
                matches = crossmatch(spectra, prepared, self.config.radius_arcsec, self.config.columns,
                                     margin_cache=self.config.margin_cache, epoch=self.config.epoch)
                matches.insert(1, POSITION, batch)
                self.table(grid).merge(matches, lambda rows: rows.drop_duplicates(POSITION, keep="last"))
        return counts

    def _unmatched(self, grid: str) -> np.ndarray:
        """Positions of active, predicted spectra (the release's) without a cached row, sorted; read range by range
        (one bool per spectrum is all that is kept)."""
        n = self.store.length(grid)
        wanted = np.zeros(n, dtype=bool)
        for start in range(0, n, MATCH_BATCH):
            columns = self.store.columns(grid, ("active", "kind"), start, min(n, start + MATCH_BATCH))
            wanted[start:start + len(columns)] = (columns["active"].to_numpy(dtype=bool)
                                                  & columns["kind"].isin(PREDICTED_KINDS).to_numpy())
        cached = self.table(grid).read(columns=[POSITION])[POSITION].to_numpy(np.int64)
        wanted[cached[cached < n]] = False
        return np.flatnonzero(wanted)

    def read(self, grid: str, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Cached rows of positions [start, stop) of a grid, sorted by position."""
        return self.table(grid).read(start, stop)

    def photometry_table(self, grid: str) -> Path:
        """The folder of range files of a grid: a Parquet dataset usable as ``infer --photometry``."""
        return self.root / grid


def matches_of(cache: MatchCache, grids: Sequence[str]) -> pd.DataFrame:
    """Every cached row of ``grids`` in one frame (O(spectra): for the ``crossmatch --out`` table and tests)."""
    frames = [cache.read(grid) for grid in grids]
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["spectrum_id", POSITION])
