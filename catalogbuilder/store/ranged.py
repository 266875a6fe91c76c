"""Range-partitioned Parquet tables keyed by a spectrum's position in its grid: one file per range of
:data:`RANGE_SPECTRA` positions, rows sorted by position, each file replaced atomically (temporary file + rename).

Used for the compacted model results and the cross-match cache: an update touches only the ranges of the positions it
carries, a reader of a position range opens only the files overlapping it, and row-group statistics on the sorted
``position`` column keep reads of part of a range cheap.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from catalogbuilder.files import atomic_write

POSITION = "position"
RANGE_SPECTRA = 16384  # positions per range file (4 coordinate chunks of the store); also the release partitions
HIDDEN_PREFIXES = [".", "_"]  # files Parquet datasets skip (temporary and metadata files)


def range_of(position: int | np.ndarray) -> int | np.ndarray:
    """The range index of a position."""
    return position // RANGE_SPECTRA


def write_atomically(table: pa.Table, path: Path) -> Path:
    """Write a Parquet file through a hidden temporary file and a rename: readers see the old file or the new one."""
    with atomic_write(path, durable=False) as temporary:
        pq.write_table(table, temporary, row_group_size=RANGE_SPECTRA // 4)
    return path


class RangeTable:
    """A folder of ``range-<k>.parquet`` files holding rows keyed by ``position``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, index: int) -> Path:
        return self.root / f"range-{index:06d}.parquet"

    def ranges(self) -> list[int]:
        """Indices of the ranges that have a file, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.root.glob("range-*.parquet"))

    def read(self, start: int = 0, stop: int | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows with ``start <= position < stop`` (all by default), sorted by position."""
        first = range_of(start)
        last = None if stop is None else range_of(max(stop - 1, start))
        paths = [str(self.path(k)) for k in self.ranges() if k >= first and (last is None or k <= last)]
        if not paths:
            return pd.DataFrame(columns=list(columns) if columns else [POSITION])
        dataset = pads.dataset(paths, format="parquet", schema=unified_schema(paths))
        condition = pads.field(POSITION) >= start
        if stop is not None:
            condition = condition & (pads.field(POSITION) < stop)
        wanted = None if columns is None else list(dict.fromkeys([POSITION, *columns]))
        frame = dataset.to_table(columns=wanted, filter=condition).to_pandas()
        return frame.sort_values(POSITION, kind="stable").reset_index(drop=True)

    def merge(self, rows: pd.DataFrame, keep: Callable[[pd.DataFrame], pd.DataFrame]) -> list[int]:
        """Merge ``rows`` into their ranges: per range, the existing rows plus the new ones reduced by ``keep`` (which
        returns the rows to store, e.g. one per position) are written back sorted. Returns the ranges written."""
        touched = []
        if rows.empty:
            return touched
        for index, new in rows.groupby(range_of(rows[POSITION].to_numpy(np.int64)), sort=True):
            path = self.path(int(index))
            merged = pd.concat([pd.read_parquet(path), new], ignore_index=True) if path.exists() else new
            kept = keep(merged).sort_values(POSITION, kind="stable").reset_index(drop=True)
            write_atomically(pa.Table.from_pandas(kept, preserve_index=False), path)
            touched.append(int(index))
        return touched


def unified_schema(paths: Sequence[str]) -> pa.Schema:
    """One schema for files written with different column sets (a column missing from a file is null there)."""
    return pa.unify_schemas([pq.read_schema(path) for path in paths])
