"""The store's single writer: one icechunk session that appends spectra in whole chunks, adds ledger rows, updates the
few mutable columns, and commits atomically under the store's commit lock.

Every change of an ingest, a retirement or a regrid goes through one :class:`StoreWriter` and becomes one snapshot of
branch ``main``; nothing is visible to readers before :meth:`StoreWriter.commit`. Only one process writes a given
session, so no two writers ever share a Zarr chunk (zarr-python#3682).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import xarray as xr
import zarr

from catalogbuilder.constants import GridSpec
from catalogbuilder.files import ExclusiveLock
from catalogbuilder.store.layout import (
    ATTRS,
    BRANCH,
    GRID_ATTR,
    LAYOUT_ATTR,
    LAYOUT_VERSION,
    NATIVE_CHUNK,
    NATIVE_DIM,
    NATIVE_GROUPS,
    PIXEL_DIM,
    SPECTRUM_CHUNK,
    SPECTRUM_DIM,
    GridBlock,
    NativeBlock,
    chunk_encoding,
    grid_spec,
    spec_attrs,
    table_dataset,
)

# Lock file taken around every commit: icechunk's local-filesystem storage has no atomic compare-and-swap of the
# branch reference, so two processes committing at the same instant could otherwise both "win".
COMMIT_LOCK_NAME = "catalogbuilder-commit.lock"


def commit_lock(store_path: Path) -> ExclusiveLock:
    """Exclusive inter-process lock of a store, held while committing (see :data:`COMMIT_LOCK_NAME`)."""
    return ExclusiveLock(store_path / COMMIT_LOCK_NAME)


def has_group(session_store: icechunk.IcechunkStore, group: str) -> bool:
    """Whether the (possibly uncommitted) hierarchy of a session holds ``group``."""
    try:
        root = zarr.open_group(session_store, mode="r", zarr_format=3)
    except zarr.errors.GroupNotFoundError:  # a new, empty repository has no root group yet
        return False
    return group in root.group_keys()


def group_length(session_store: icechunk.IcechunkStore, group: str, dim: str) -> int:
    """Length of ``dim`` in ``group`` (0 when the group does not exist)."""
    if not has_group(session_store, group):
        return 0
    arrays = dict(zarr.open_group(session_store, path=group, mode="r", zarr_format=3).arrays())
    for array in arrays.values():
        if array.metadata.dimension_names and array.metadata.dimension_names[0] == dim:
            return int(array.shape[0])
    return 0


def append_dataset(session_store: icechunk.IcechunkStore, group: str, dataset: xr.Dataset, dim: str) -> None:
    """Append ``dataset`` along ``dim`` to ``group``, creating the group (with explicit chunking) if absent."""
    if has_group(session_store, group):
        dataset.to_zarr(session_store, group=group, append_dim=dim, consolidated=False)
    else:
        dataset.to_zarr(session_store, group=group, mode="w-", encoding=chunk_encoding(dataset), consolidated=False)


class _NativeAppender:
    """Buffers the native values of one grid's spectra and appends them in whole :data:`NATIVE_CHUNK` chunks."""

    def __init__(self, session_store: icechunk.IcechunkStore, group: str) -> None:
        self.session_store = session_store
        self.group = group
        self.written = group_length(session_store, group, NATIVE_DIM)
        self.buffer: list[NativeBlock] = []
        self.buffered = 0

    @property
    def length(self) -> int:
        """Native values in the group once everything buffered is written."""
        return self.written + self.buffered

    def add(self, block: NativeBlock) -> None:
        self.buffer.append(block)
        self.buffered += block.n_values
        aligned = (self.length // NATIVE_CHUNK) * NATIVE_CHUNK - self.written
        if aligned > 0:
            merged = NativeBlock.concat(self.buffer)
            head = NativeBlock(*(getattr(merged, f)[:aligned] for f in ("wavelength", "flux", "error", "mask")),
                               np.zeros(0, np.int64))
            tail = NativeBlock(*(getattr(merged, f)[aligned:].copy() for f in ("wavelength", "flux", "error", "mask")),
                               np.zeros(0, np.int64))
            self._write(head)
            self.buffer, self.buffered = ([tail] if tail.n_values else []), tail.n_values

    def flush(self) -> None:
        if self.buffered:
            self._write(NativeBlock.concat(self.buffer))
            self.buffer, self.buffered = [], 0

    def _write(self, block: NativeBlock) -> None:
        dataset = block.to_dataset()
        if self.written == 0 and not has_group(self.session_store, self.group):
            dataset["wavelength"].attrs.update(ATTRS["wavelength"])
        append_dataset(self.session_store, self.group, dataset, NATIVE_DIM)
        self.written += block.n_values


class _GridAppender:
    """Buffers the spectra of one grid and appends them in whole :data:`SPECTRUM_CHUNK` chunks, so no data chunk is
    ever read back and rewritten; only the final flush leaves a partial last chunk, which the next ingest fills first."""

    def __init__(self, session_store: icechunk.IcechunkStore, spec: GridSpec) -> None:
        self.session_store = session_store
        self.spec = spec
        self.grid = spec.name
        self.written = group_length(session_store, self.grid, SPECTRUM_DIM)
        self.buffer: list[GridBlock] = []
        self.buffered = 0
        native_group = NATIVE_GROUPS.get(self.grid)
        self.native = _NativeAppender(session_store, native_group) if native_group else None

    @property
    def length(self) -> int:
        """Spectra in the grid once everything buffered is written (the position the next spectrum gets)."""
        return self.written + self.buffered

    def add(self, block: GridBlock) -> int:
        """Queue a block (assigning its native offsets), write every complete chunk; returns its first position."""
        first = self.length
        if self.native is not None:
            if block.native is None:
                raise ValueError(f"spectra of the {self.grid} grid must come with their native pixels")
            lengths = np.asarray(block.native.lengths, dtype=np.int64)
            block.columns["native_length"] = lengths
            block.columns["native_offset"] = self.native.length + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self.native.add(block.native)
        self.buffer.append(block)
        self.buffered += len(block)
        aligned = self.length // SPECTRUM_CHUNK * SPECTRUM_CHUNK - self.written
        if aligned > 0:
            head, tail = GridBlock.concat(self.buffer).split(aligned)
            self._write(head)
            self.buffer, self.buffered = ([tail] if len(tail) else []), len(tail)
        return first

    def flush(self) -> None:
        if self.buffered:
            self._write(GridBlock.concat(self.buffer))
            self.buffer, self.buffered = [], 0
        if self.native is not None:
            self.native.flush()

    def _write(self, block: GridBlock) -> None:
        dataset = block.to_dataset(self.spec)
        if self.written == 0 and not has_group(self.session_store, self.grid):
            dataset = dataset.assign_coords(wavelength=(PIXEL_DIM, np.asarray(self.spec.wavelength(), dtype=np.float64)))
            dataset["wavelength"].attrs.update(ATTRS["wavelength"])
        if self.spec.base is not None:  # on every write: an append replaces the group's attributes with the dataset's
            dataset.attrs[GRID_ATTR] = spec_attrs(self.spec)
        append_dataset(self.session_store, self.grid, dataset, SPECTRUM_DIM)
        self.written += len(block)


class StoreWriter:
    """A writable session of a store's repository: appends, ledger rows, column updates, one atomic commit."""

    def __init__(self, store_path: Path, repository: icechunk.Repository) -> None:
        self.store_path = store_path
        self.session = repository.writable_session(BRANCH)
        self.session_store = self.session.store
        self._grids: dict[str, _GridAppender] = {}
        self._init_root()

    def _init_root(self) -> None:
        """Give a new repository its root group with the layout version."""
        try:
            zarr.open_group(self.session_store, mode="r", zarr_format=3)
        except zarr.errors.GroupNotFoundError:
            zarr.open_group(self.session_store, mode="w", zarr_format=3, attributes={LAYOUT_ATTR: LAYOUT_VERSION})

    def grid_length(self, grid: str | GridSpec) -> int:
        """Spectra in ``grid`` (a built-in grid's name or any grid's spec) including what this session appended."""
        return self._appender(grid).length

    def _appender(self, grid: str | GridSpec) -> _GridAppender:
        spec = grid if isinstance(grid, GridSpec) else grid_spec(grid)
        if spec.name not in self._grids:
            self._grids[spec.name] = _GridAppender(self.session_store, spec)
        return self._grids[spec.name]

    def append_spectra(self, block: GridBlock, spec: GridSpec | None = None) -> int:
        """Append spectra (chunk-aligned) to their grid (``spec``, needed for a derived grid; a built-in one by
        ``block.grid`` otherwise); returns the position of the first one in the grid."""
        return self._appender(spec or block.grid).add(block)

    def flush(self) -> None:
        """Write every buffered spectrum (before updating columns or committing)."""
        for appender in self._grids.values():
            appender.flush()

    def append_rows(self, group: str, rows: Sequence[dict[str, Any]], columns: dict[str, str], dim: str) -> None:
        """Append ledger rows (``files`` or ``rejects``)."""
        if rows:
            append_dataset(self.session_store, group, table_dataset(rows, columns, dim), dim)

    def set_values(self, group: str, name: str, positions: np.ndarray, values: Any) -> None:
        """Overwrite ``group/name`` at ``positions`` (flush first when they were appended in this session)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return
        array = zarr.open_array(self.session_store, path=f"{group}/{name}", mode="r+", zarr_format=3)
        order = np.argsort(positions, kind="stable")
        values = np.broadcast_to(np.asarray(values, dtype=array.dtype if array.dtype.kind != "T" else object),
                                 positions.shape)
        array.oindex[positions[order]] = np.asarray(values)[order]

    @property
    def has_changes(self) -> bool:
        return self.session.has_uncommitted_changes

    def commit(self, message: str, metadata: dict[str, Any], rebase: bool = False) -> str:
        """Commit everything under the commit lock; returns the new snapshot id. Raises ``icechunk.ConflictError``
        when another writer moved ``main`` since this session started (nothing is then committed) — unless
        ``rebase``: then this session's changes are laid on top of the other commits when they touch no array
        these changes touch (icechunk's conflict detector), and only an overlap raises."""
        self.flush()
        with commit_lock(self.store_path):
            if rebase:
                return self.session.commit(message, metadata=metadata, rebase_with=icechunk.ConflictDetector())
            return self.session.commit(message, metadata=metadata)
