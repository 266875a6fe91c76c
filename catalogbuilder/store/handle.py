"""The spectrum store handle: what every stage receives to read spectra, their columns, ledgers and results.

``SpectrumStore.open(path)`` opens an existing store (``create=True`` only from ingest); ``store.at(snapshot)`` pins a
snapshot; ``store.ref()`` is the small picklable :class:`StoreRef` (path + snapshot id) that Dask tasks get instead of a
handle. Reads go straight to the Zarr arrays of one icechunk snapshot and never through a Dask scheduler, so they are
the same on the client, in a task and in a test. Layout: store/layout.py and docs/store.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import icechunk
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from catalogbuilder.constants import GRIDS, KIND_COMBINED_ALT, GridSpec
from catalogbuilder.store.layout import (
    BRANCH,
    FILE_ACTIVE,
    FILE_COLUMNS,
    FILE_DIM,
    FILE_STATUS_NAMES,
    FILES_GROUP,
    GRID_ATTR,
    LAYOUT_ATTR,
    LAYOUT_VERSION,
    NATIVE_GROUPS,
    REJECT_COLUMNS,
    REJECT_CURRENT,
    REJECT_DIM,
    REJECT_STATUS_NAMES,
    REJECTS_GROUP,
    SPECTRUM_CHUNK,
    SPECTRUM_DIM,
    grid_columns,
    grid_spec,
    read_arrays,
    spec_from_attrs,
)
from catalogbuilder.files import error_line
from catalogbuilder.store.errors import StoreError, StoreLayoutError
from catalogbuilder.store.writer import COMMIT_LOCK_NAME, StoreWriter, commit_lock, group_length, has_group

if TYPE_CHECKING:
    from distributed import Client

    from catalogbuilder.store.ingest import IngestReport
    from catalogbuilder.store.results import ResultsStore


@dataclasses.dataclass(frozen=True)
class StoreRef:
    """A store path and a snapshot id: what a Dask task receives to open the store exactly as the client saw it."""

    path: str
    snapshot: str

    def open(self) -> SpectrumStore:
        """The store pinned to this snapshot (the path must be visible on this machine)."""
        if not Path(self.path).is_dir():  # never create a store where a worker does not see it
            raise FileNotFoundError(f"this worker does not see the store {self.path} (not on a shared filesystem?)")
        return SpectrumStore.open(self.path).at(self.snapshot)


class SpectrumStore:
    """A folder holding the icechunk repository of ingested spectra (and, beside it, ``results/``)."""

    def __init__(self, path: Path, repository: icechunk.Repository, snapshot: str | None = None) -> None:
        self.path = path
        self.repository = repository
        self.snapshot = snapshot  # None: every read sees the latest commit of ``main``
        self._sessions: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> SpectrumStore:
        """Open the store at ``path``. Only ``create=True`` (the ingest) makes a new store, in a missing or empty
        folder; raises :class:`StoreError` for a missing store, a folder that is not one, or a file, and
        :class:`StoreLayoutError` for a store of another layout version."""
        root = Path(path).expanduser().resolve()
        _quiet_local_storage_warning()
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a spectrum store folder")
        if not root.exists() and not create:
            raise StoreError(f"no spectrum store at {root}")
        try:
            storage = icechunk.local_filesystem_storage(str(root))
            exists = root.is_dir() and icechunk.Repository.exists(storage)
            if not exists and root.is_dir() and any(p.name != COMMIT_LOCK_NAME for p in root.iterdir()):
                raise StoreError(f"{root} is a non-empty folder that is not a spectrum store")
            if not exists and not create:
                raise StoreError(f"no spectrum store at {root}")
            root.mkdir(parents=True, exist_ok=True)
            repository = icechunk.Repository.open_or_create(storage)
        except (OSError, icechunk.IcechunkError) as error:
            raise StoreError(f"cannot open spectrum store {root}: {error_line(error)}") from error
        store = cls(root, repository)
        store._check_layout()
        return store

    def _check_layout(self) -> None:
        try:
            attrs = dict(zarr.open_group(self._zstore(), mode="r", zarr_format=3).attrs)
        except zarr.errors.GroupNotFoundError:  # a repository without commits yet
            return
        version = attrs.get(LAYOUT_ATTR)
        if version != LAYOUT_VERSION:
            raise StoreLayoutError(
                f"{self.path} is a spectrum store of layout {version or 1}; this catalogbuilder reads layout "
                f"{LAYOUT_VERSION}. Copy it into the new layout with `catalogbuilder store upgrade {self.path} NEW_PATH` "
                "(re-reads the recorded files) or ingest the files again into a new store")

    def at(self, snapshot: str | None) -> SpectrumStore:
        """This store with every read pinned to ``snapshot`` (None: the latest commit at each read)."""
        return SpectrumStore(self.path, self.repository, snapshot)

    def ref(self) -> StoreRef:
        """Path and snapshot (the pinned one, else the latest) for Dask tasks."""
        return StoreRef(str(self.path), self.snapshot or self.snapshot_id)

    # --- snapshots -----------------------------------------------------------------------------------------------
    @property
    def snapshot_id(self) -> str:
        """The pinned snapshot, else the id of the latest commit of ``main``."""
        return self.snapshot or self.repository.lookup_branch(BRANCH)

    def snapshots(self) -> list[icechunk.SnapshotInfo]:
        """Snapshots of ``main``, newest first (the first one is the repository's creation)."""
        return list(self.repository.ancestry(branch=BRANCH))

    def _zstore(self, snapshot: str | None = None) -> Any:
        snapshot = snapshot or self.snapshot_id
        if snapshot not in self._sessions:
            self._sessions[snapshot] = self.repository.readonly_session(snapshot_id=snapshot).store
        return self._sessions[snapshot]

    # --- grids and spectra ---------------------------------------------------------------------------------------
    def grids(self) -> list[str]:
        """Ingest grids holding spectra, in :data:`~catalogbuilder.constants.GRIDS` order (each spectrum is on exactly
        one of them; :meth:`derived_grids` lists the model grids filled from them)."""
        return [grid for grid in GRIDS if has_group(self._zstore(), grid)]

    def derived_grids(self) -> dict[str, GridSpec]:
        """The derived grids of the snapshot (filled by ``store regrid``), by name."""
        try:
            root = zarr.open_group(self._zstore(), mode="r", zarr_format=3)
        except zarr.errors.GroupNotFoundError:
            return {}
        return {name: spec_from_attrs(dict(group.attrs)[GRID_ATTR]) for name, group in root.groups()
                if GRID_ATTR in group.attrs}

    def grid_spec(self, grid: str) -> GridSpec:
        """The spec of an ingest grid or of a derived grid of this store; ``ValueError`` for any other name."""
        if grid in GRIDS:
            return grid_spec(grid)
        derived = self.derived_grids()
        if grid not in derived:
            raise ValueError(f"the store {self.path} has no grid {grid!r} (grids: {', '.join([*GRIDS, *derived])}); "
                             "a model's own grid is filled with `catalogbuilder store regrid`")
        return derived[grid]

    def base_grid(self, grid: str) -> str:
        """The ingest grid holding the spectra (columns, native pixels) of ``grid``: itself, or a derived grid's base."""
        return self.grid_spec(grid).base or grid

    def length(self, grid: str) -> int:
        """Spectra stored on ``grid`` (0 when none; on a derived grid, those regridded so far: positions below)."""
        return group_length(self._zstore(), grid, SPECTRUM_DIM)

    def dataset(self, grid: str) -> xr.Dataset | None:
        """Lazy Dataset of a grid's group (dask arrays with the on-disk chunks), None if the grid holds no spectra."""
        self.grid_spec(grid)
        if not has_group(self._zstore(), grid):
            return None
        return xr.open_zarr(self._zstore(), group=grid, consolidated=False, chunks={})

    def columns(self, grid: str, names: Sequence[str] | None = None, start: int = 0, stop: int | None = None,
                positions: np.ndarray | None = None) -> pd.DataFrame:
        """Per-spectrum columns of a grid (all by default, see ``store.layout.grid_columns``) for spectra
        [start, stop) or at sorted ``positions``; index = position in the grid. A derived grid's spectra are its
        base grid's at the same positions: their columns come from there, up to the derived grid's length."""
        base = self.base_grid(grid)
        names = list(names or grid_columns(grid_spec(base)))
        if not has_group(self._zstore(), base) or not has_group(self._zstore(), grid):
            return pd.DataFrame({name: pd.Series(dtype=object) for name in names})
        stop = self.length(grid) if stop is None else stop
        selection: slice | np.ndarray = slice(start, stop) if positions is None else np.asarray(positions, np.int64)
        index = np.arange(start, stop) if positions is None else np.asarray(positions, np.int64)
        return pd.DataFrame(read_arrays(self._zstore(), base, names, selection), index=index)

    def pixels(self, grid: str, positions: np.ndarray) -> dict[str, np.ndarray]:
        """``flux``, ``error`` (float32) and ``mask`` (the grid's mask dtype), (n, pixels), of the spectra at sorted
        ``positions``, read one data chunk at a time (only the chunks holding them)."""
        positions = np.asarray(positions, dtype=np.int64)
        names = ("flux", "error", "mask")
        if positions.size == 0:
            return {name: np.zeros((0, self.grid_spec(grid).pixels)) for name in names}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        chunk = positions // SPECTRUM_CHUNK
        for value in np.unique(chunk):
            wanted = positions[chunk == value]
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            block = read_arrays(self._zstore(), grid, names, slice(first, last))
            for name in names:
                parts[name].append(block[name][wanted - first])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def native(self, grid: str, positions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Native pixels of the spectra at sorted ``positions``: flat ``wavelength``/``flux``/``error``/``mask``
        arrays and offsets (n + 1; spectrum i is values[offsets[i]:offsets[i+1]]). Only grids with native arrays
        and the grids derived from them."""
        grid = self.base_grid(grid)
        if grid not in NATIVE_GROUPS:
            raise ValueError(f"the {grid} grid keeps no native arrays (its spectra are stored on their own grid)")
        where = self.columns(grid, ("native_offset", "native_length"), positions=positions)
        starts, lengths = where["native_offset"].to_numpy(np.int64), where["native_length"].to_numpy(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if not len(starts):
            return {name: np.zeros(0, np.float32) for name in ("wavelength", "flux", "error", "mask")}, offsets
        first, last = int(starts.min()), int((starts + lengths).max())
        block = read_arrays(self._zstore(), NATIVE_GROUPS[grid], ("wavelength", "flux", "error", "mask"),
                            slice(first, last))
        take = np.concatenate([np.arange(s - first, s - first + n) for s, n in zip(starts, lengths)])
        return {name: values[take] for name, values in block.items()}, offsets

    # --- ledgers -------------------------------------------------------------------------------------------------
    def files(self) -> pd.DataFrame:
        """The files ledger (columns ``store.layout.FILE_COLUMNS`` plus ``status_name``), one row per ingested file
        and grid, whatever its status."""
        table = self._table(FILES_GROUP, FILE_COLUMNS, FILE_DIM)
        table["status_name"] = table["status"].map(FILE_STATUS_NAMES)
        return table

    def rejects(self, current_only: bool = True) -> pd.DataFrame:
        """Rejected inputs (columns ``store.layout.REJECT_COLUMNS`` plus ``status_name``): by default only the
        current ones — one per path, its latest — that the release lists as NO_RESULT rows."""
        table = self._table(REJECTS_GROUP, REJECT_COLUMNS, REJECT_DIM)
        table["status_name"] = table["status"].map(REJECT_STATUS_NAMES)
        if current_only:
            table = table.loc[table["status"] == REJECT_CURRENT].drop_duplicates("file_path", keep="last")
        return table.reset_index(drop=True)

    def _table(self, group: str, columns: dict[str, str], dim: str) -> pd.DataFrame:
        if not has_group(self._zstore(), group):
            return pd.DataFrame({name: pd.Series(dtype=object if kind == "str" else kind)
                                 for name, kind in columns.items()})
        return pd.DataFrame(read_arrays(self._zstore(), group, list(columns)))

    @property
    def results(self) -> ResultsStore:
        """The model results kept with this store (``<store>/results``)."""
        from catalogbuilder.store.results import ResultsStore

        return ResultsStore(self.path / "results")

    # --- summaries and checks ------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counts: spectra per grid (active and in total) and per survey/kind, files by status, current rejects."""
        grids: dict[str, dict[str, Any]] = {}
        for grid in GRIDS:
            frame = self.columns(grid, ("survey", "kind", "active"))
            keys = frame["survey"].astype(str) + "/" + frame["kind"].astype(str)
            grids[grid] = {"spectra": len(frame), "active": int(frame["active"].astype(bool).sum()),
                           "by_survey_kind": keys.value_counts().sort_index().to_dict()}
        derived = {name: {"base": spec.base, "spectra": self.length(name), "of": self.length(spec.base),
                          "pixels": spec.pixels, "wavelength": [float(w) for w in spec.wavelength()[[0, -1]]]}
                   for name, spec in self.derived_grids().items()}
        files = self.files()
        return {
            "path": str(self.path),
            "snapshot_id": self.snapshot_id,
            "snapshots": len(self.snapshots()),
            "grids": grids,
            "derived_grids": derived,
            "total_spectra": sum(g["spectra"] for g in grids.values()),
            "active_spectra": sum(g["active"] for g in grids.values()),
            "files": files["status_name"].value_counts().to_dict() if len(files) else {},
            "rejects": len(self.rejects()),
        }

    def check(self) -> list[str]:
        """Consistency problems of the snapshot (empty list when consistent): equal lengths of every per-spectrum
        array, the grid's pixel axis, unique well-formed ``spectrum_id``, the files ledger accounting for exactly
        the stored spectra at their positions with matching ``active`` flags, native offsets inside the native
        arrays. Reads every per-spectrum column: O(spectra)."""
        from catalogbuilder.store.checks import check_store

        return check_store(self)

    # --- writing -------------------------------------------------------------------------------------------------
    def writer(self) -> StoreWriter:
        """A new writable session on ``main`` (the single writer; see store/writer.py)."""
        return StoreWriter(self.path, self.repository)

    def ingest(self, files: Sequence[str | Path], survey: str = "auto", client: Client | None = None,
               progress: bool = True, **options: Any) -> IngestReport:
        """Read, resample and append ``files`` in one commit; see :func:`catalogbuilder.store.ingest.ingest_files`."""
        from catalogbuilder.store.ingest import ingest_files

        return ingest_files(self, files, survey=survey, client=client, progress=progress, **options)

    def garbage_collect(self, older_than: datetime.timedelta = datetime.timedelta(days=7),
                        dry_run: bool = False) -> dict[str, int]:
        """Delete objects no commit refers to (left by killed or conflicting writers) that are older than
        ``older_than``; returns counts of what was (or, with ``dry_run``, would be) deleted. Every snapshot stays
        readable. Keep ``older_than`` above the longest ingest, or run it when no ingest is running."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - older_than
        with commit_lock(self.path):
            summary = self.repository.garbage_collect(cutoff, dry_run=dry_run)
        fields = ("chunks_deleted", "manifests_deleted", "snapshots_deleted", "attributes_deleted",
                  "transaction_logs_deleted", "bytes_deleted")
        return {field: int(getattr(summary, field)) for field in fields}


def predicted(kinds: pd.Series | np.ndarray) -> np.ndarray:
    """True for the spectra the models predict and the release lists (every kind but apStar row 1)."""
    return np.asarray(kinds, dtype=object) != KIND_COMBINED_ALT


def active_files(files: pd.DataFrame) -> pd.DataFrame:
    """The rows of a files ledger that are active."""
    return files.loc[files["status"] == FILE_ACTIVE]


def _quiet_local_storage_warning() -> None:
    """icechunk warns on every local repository that concurrent commits are unsafe; commits here are serialised
    by the commit lock (store/writer.py), so that one warning is silenced (others still show)."""
    if "ICECHUNK_LOG" not in os.environ:
        icechunk.set_logs_filter("warn,icechunk::storage::object_store=error")
