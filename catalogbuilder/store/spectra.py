"""The spectrum store: an icechunk repository holding one Zarr v3 group (xarray Dataset) per model grid.

Layout (see docs/store.md): groups ``apogee`` and ``optical`` with dims ``(spectrum, pixel)``, ``files`` (one row per
ingested file: the idempotency ledger) and ``rejects`` (one row per rejected file). Every ingest is one icechunk commit
on branch ``main``, so readers only ever see complete ingests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import icechunk
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from catalogbuilder.constants import GRIDS, grid_wavelength

if TYPE_CHECKING:
    from distributed import Client

    from catalogbuilder.store.ingest import IngestReport

log = logging.getLogger(__name__)

BRANCH = "main"
FILES_GROUP = "files"
REJECTS_GROUP = "rejects"
SPECTRUM_DIM = "spectrum"
PIXEL_DIM = "pixel"
FILE_DIM = "file"
REJECT_DIM = "reject"

# Chunking: 256 spectra x all pixels per data chunk (apogee flux 8.8 MB, optical 4.0 MB uncompressed); the 1-D
# per-spectrum coordinates and the ledger tables use 16 data chunks per chunk so a large store has few tiny objects.
SPECTRUM_CHUNK = 256
COORD_CHUNK = 16 * SPECTRUM_CHUNK
TABLE_CHUNK = 4096
# Flux and error are noise-dominated floats that barely compress (ratio ~1.04 with lz4, ~1.18 with zstd level 3 on
# resampled LAMOST spectra) while the mask compresses >100x either way; lz4 runs ~25x faster than zstd, and the single
# client writer is the ingest's bottleneck, so lz4 with byte shuffle it is.
_PIXEL_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")

# Lock file taken around every commit: icechunk's local-filesystem storage has no atomic compare-and-swap of the
# branch reference, so two processes committing at the same instant could otherwise both "win".
COMMIT_LOCK_NAME = "catalogbuilder-commit.lock"

STRING_COORDS: tuple[str, ...] = (
    "spectrum_id",
    "source_id",
    "survey",
    "kind",
    "file_path",
    "file_sha256",
    "reader_version",
    "ingest_time",
)
INT_COORDS: tuple[str, ...] = ("row", "visit")
PHOTOMETRY_KEYS: tuple[str, ...] = ("tmass_j", "tmass_h", "tmass_k", "e_tmass_j", "e_tmass_h", "e_tmass_k")
FLOAT_COORDS: tuple[str, ...] = ("ra", "dec", "snr", "mjd", *PHOTOMETRY_KEYS)
SPECTRUM_COORDS: tuple[str, ...] = STRING_COORDS + INT_COORDS + FLOAT_COORDS

FILE_COLUMNS: tuple[str, ...] = ("file_path", "file_sha256", "grid", "n_spectra", "reader_version", "ingest_time")
REJECT_COLUMNS: tuple[str, ...] = ("file_path", "file_sha256", "reason", "time", "reader_version")

_ATTRS: dict[str, dict[str, str]] = {
    "flux": {"units": "flux units of the source file (SDSS: 1e-17 erg s-1 cm-2 Angstrom-1)"},
    "error": {"units": "same as flux", "long_name": "1-sigma flux uncertainty"},
    "mask": {"long_name": "survey pixel bitmask, OR of the native pixels bracketing each grid pixel"},
    "wavelength": {"units": "Angstrom", "long_name": "vacuum wavelength of the model grid"},
    "ra": {"units": "deg"},
    "dec": {"units": "deg"},
    "snr": {"long_name": "survey signal-to-noise ratio (NaN if unknown)"},
    "mjd": {"units": "d", "long_name": "modified Julian date of the observation (NaN if unknown)"},
    "ingest_time": {"long_name": "UTC time of the ingest (ISO 8601)"},
    **{
        key: {"units": "mag", "long_name": f"2MASS {key} from the file header (NaN if missing)"}
        for key in PHOTOMETRY_KEYS
    },
}


class StoreError(Exception):
    """The store cannot be opened or written (not a spectrum store, unwritable path, conflicting commits)."""


class StoreConflictError(StoreError):
    """Another ingest committed first and this one could not be redone within its attempts; nothing was committed."""


@dataclasses.dataclass
class GridBlock:
    """Spectra on one model grid, ready to append: ``flux``/``error`` float32 and ``mask`` int64 of shape
    (n, npix), plus one array of length n per name in :data:`SPECTRUM_COORDS`."""

    grid: str
    flux: np.ndarray
    error: np.ndarray
    mask: np.ndarray
    coords: dict[str, np.ndarray]

    def __len__(self) -> int:
        return self.flux.shape[0]

    @classmethod
    def concat(cls, blocks: Sequence[GridBlock]) -> GridBlock:
        """One block holding the rows of ``blocks`` in order (all on the same grid)."""
        return cls(
            grid=blocks[0].grid,
            flux=np.concatenate([b.flux for b in blocks]),
            error=np.concatenate([b.error for b in blocks]),
            mask=np.concatenate([b.mask for b in blocks]),
            coords={name: np.concatenate([b.coords[name] for b in blocks]) for name in SPECTRUM_COORDS},
        )

    def split(self, n: int) -> tuple[GridBlock, GridBlock]:
        """The first ``n`` rows (views) and a copy of the rest, so a kept tail does not pin the whole block."""
        head = GridBlock(
            self.grid, self.flux[:n], self.error[:n], self.mask[:n], {k: v[:n] for k, v in self.coords.items()}
        )
        tail = GridBlock(
            self.grid,
            self.flux[n:].copy(),
            self.error[n:].copy(),
            self.mask[n:].copy(),
            {k: v[n:].copy() for k, v in self.coords.items()},
        )
        return head, tail

    def to_dataset(self) -> xr.Dataset:
        """The rows as an xarray Dataset in the store's layout (without the ``wavelength`` coordinate)."""
        dims = (SPECTRUM_DIM, PIXEL_DIM)
        coords = {name: (SPECTRUM_DIM, _column(name, values)) for name, values in self.coords.items()}
        data = {"flux": (dims, self.flux), "error": (dims, self.error), "mask": (dims, self.mask)}
        dataset = xr.Dataset(data, coords=coords)
        for name, attrs in _ATTRS.items():
            if name in dataset.variables:
                dataset[name].attrs.update(attrs)
        return dataset


def _column(name: str, values: np.ndarray) -> np.ndarray:
    """A per-spectrum column with the store's dtype: object strings, int64 or float64."""
    if name in STRING_COORDS:
        return np.asarray(values, dtype=object)
    if name in INT_COORDS:
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float64)


def table_dataset(rows: Sequence[dict[str, Any]], columns: Sequence[str], dim: str) -> xr.Dataset:
    """A 1-D table (the ``files`` ledger or ``rejects``) as a Dataset; ints stay int64, everything else is str."""
    data = {}
    for column in columns:
        values = [row[column] for row in rows]
        dtype = np.int64 if all(isinstance(v, (int, np.integer)) for v in values) else object
        data[column] = (dim, np.asarray(values if dtype is np.int64 else [str(v) for v in values], dtype=dtype))
    return xr.Dataset(data)


def _chunk_encoding(dataset: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Explicit chunks (and the pixel codec) for every variable of a grid or table Dataset being created."""
    encoding: dict[str, dict[str, Any]] = {}
    for name, variable in dataset.variables.items():
        if variable.dims == (SPECTRUM_DIM, PIXEL_DIM):
            encoding[name] = {"chunks": (SPECTRUM_CHUNK, variable.shape[1]), "compressors": [_PIXEL_CODEC]}
        elif variable.dims == (PIXEL_DIM,):
            encoding[name] = {"chunks": variable.shape}
        elif variable.dims == (SPECTRUM_DIM,):
            encoding[name] = {"chunks": (COORD_CHUNK,)}
        else:
            encoding[name] = {"chunks": (TABLE_CHUNK,)}
    return encoding


def append_dataset(session_store: icechunk.IcechunkStore, group: str, dataset: xr.Dataset, dim: str) -> None:
    """Append ``dataset`` along ``dim`` to ``group``, creating the group (with explicit chunking) if absent."""
    if _has_group(session_store, group):
        dataset.to_zarr(session_store, group=group, append_dim=dim, consolidated=False)
    else:
        dataset.to_zarr(session_store, group=group, mode="w-", encoding=_chunk_encoding(dataset), consolidated=False)


def _has_group(session_store: icechunk.IcechunkStore, group: str) -> bool:
    """Whether the (possibly uncommitted) hierarchy of a session holds ``group``."""
    try:
        root = zarr.open_group(session_store, mode="r", zarr_format=3)
    except zarr.errors.GroupNotFoundError:  # a new, empty repository has no root group yet
        return False
    return group in root.group_keys()


class GridWriter:
    """Buffers the spectra of one grid on the client and appends them in whole chunks (single writer).

    Writes are aligned to :data:`SPECTRUM_CHUNK` so no data chunk is ever read back and rewritten; only the final
    flush of an ingest leaves a partial last chunk, which the next ingest fills first.
    """

    def __init__(self, session_store: icechunk.IcechunkStore, grid: str, existing: int) -> None:
        self.session_store = session_store
        self.grid = grid
        self.length = existing  # spectra in the group, committed + appended in this session
        self.buffer: list[GridBlock] = []
        self.buffered = 0

    def add(self, block: GridBlock) -> None:
        """Queue a block and write every complete chunk that is ready."""
        self.buffer.append(block)
        self.buffered += len(block)
        aligned = (self.length + self.buffered) // SPECTRUM_CHUNK * SPECTRUM_CHUNK - self.length
        if aligned > 0:
            head, tail = GridBlock.concat(self.buffer).split(aligned)
            self._write(head)
            self.buffer, self.buffered = ([tail] if len(tail) else []), len(tail)

    def flush(self) -> None:
        """Write whatever is buffered (end of an ingest)."""
        if self.buffered:
            self._write(GridBlock.concat(self.buffer))
            self.buffer, self.buffered = [], 0

    def _write(self, block: GridBlock) -> None:
        dataset = block.to_dataset()
        if self.length == 0 and not _has_group(self.session_store, self.grid):
            wavelength = np.asarray(grid_wavelength(self.grid), dtype=np.float64)  # the grid's exact values
            dataset = dataset.assign_coords(wavelength=(PIXEL_DIM, wavelength))
            dataset["wavelength"].attrs.update(_ATTRS["wavelength"])
        append_dataset(self.session_store, self.grid, dataset, SPECTRUM_DIM)
        self.length += len(block)


def open_group_dataset(session_store: icechunk.IcechunkStore, group: str, dask: bool = True) -> xr.Dataset | None:
    """The lazy Dataset of ``group``, or None if the group does not exist. With ``dask`` its variables are dask arrays
    with the on-disk chunks; without, lazily indexed arrays read here on access (never sent to a Dask cluster: what
    the store itself reads must not depend on the default scheduler, and a writable session cannot be pickled)."""
    if not _has_group(session_store, group):
        return None
    return xr.open_zarr(session_store, group=group, consolidated=False, chunks={} if dask else None)


class SpectrumStore:
    """A directory holding the icechunk repository of ingested spectra. Create or open with :meth:`open`."""

    def __init__(self, path: str | Path, repository: icechunk.Repository) -> None:
        self.path = Path(path).resolve()
        self.repository = repository

    @classmethod
    def open(cls, path: str | Path) -> SpectrumStore:
        """Open the store at ``path``, creating an empty one if the path does not exist or is an empty folder."""
        root = Path(path).expanduser().resolve()
        _quiet_local_storage_warning()
        try:
            root.mkdir(parents=True, exist_ok=True)
            storage = icechunk.local_filesystem_storage(str(root))
            if not icechunk.Repository.exists(storage) and any(p.name != COMMIT_LOCK_NAME for p in root.iterdir()):
                raise StoreError(f"{root} is a non-empty folder that is not a spectrum store")
            repository = icechunk.Repository.open_or_create(storage)
        except (OSError, icechunk.IcechunkError) as error:
            raise StoreError(f"cannot open spectrum store {root}: {error}") from error
        return cls(root, repository)

    # --- reading -----------------------------------------------------------------------------------------------
    @property
    def snapshot_id(self) -> str:
        """Id of the latest committed snapshot of ``main`` (pass it to workers to pin what they read)."""
        return self.repository.lookup_branch(BRANCH)

    def _readonly_store(self, snapshot: str | None = None) -> icechunk.IcechunkStore:
        session = (
            self.repository.readonly_session(snapshot_id=snapshot)
            if snapshot
            else self.repository.readonly_session(branch=BRANCH)
        )
        return session.store

    def dataset(self, grid: str, snapshot: str | None = None) -> xr.Dataset | None:
        """Read-only lazy Dataset of a model grid (``apogee``/``optical``) chunked along ``spectrum``, at the latest
        commit or at ``snapshot``; None if the grid holds no spectra."""
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
        return open_group_dataset(self._readonly_store(snapshot), grid)

    def files(self, snapshot: str | None = None) -> pd.DataFrame:
        """The ingested-files ledger: one row per file whose spectra are in the store (columns :data:`FILE_COLUMNS`)."""
        return self._table(FILES_GROUP, FILE_COLUMNS, snapshot)

    def rejects(self, snapshot: str | None = None) -> pd.DataFrame:
        """Rejected files: columns ``file``, ``sha256``, ``reason``, ``time`` (ISO UTC) and ``reader_version``."""
        table = self._table(REJECTS_GROUP, REJECT_COLUMNS, snapshot)
        return table.rename(columns={"file_path": "file", "file_sha256": "sha256"})

    def _table(self, group: str, columns: Sequence[str], snapshot: str | None) -> pd.DataFrame:
        dataset = open_group_dataset(self._readonly_store(snapshot), group, dask=False)
        if dataset is None:
            return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})
        return pd.DataFrame({column: plain_strings(dataset[column].values) for column in columns})

    def snapshots(self) -> list[icechunk.SnapshotInfo]:
        """Snapshots of ``main``, newest first (the first one is the repository's creation)."""
        return list(self.repository.ancestry(branch=BRANCH))

    def info(self) -> dict[str, Any]:
        """Counts: spectra per grid and per survey/kind, total, ingested files, rejects, snapshots."""
        grids: dict[str, dict[str, Any]] = {}
        for grid in GRIDS:
            dataset = open_group_dataset(self._readonly_store(), grid, dask=False)
            if dataset is None:
                grids[grid] = {"spectra": 0, "by_survey_kind": {}}
                continue
            keys = (
                pd.Series(plain_strings(dataset["survey"].values))
                + "/"
                + pd.Series(plain_strings(dataset["kind"].values))
            )
            grids[grid] = {
                "spectra": int(dataset.sizes[SPECTRUM_DIM]),
                "by_survey_kind": keys.value_counts().sort_index().to_dict(),
            }
        return {
            "path": str(self.path),
            "snapshot_id": self.snapshot_id,
            "snapshots": len(self.snapshots()),
            "grids": grids,
            "total_spectra": sum(g["spectra"] for g in grids.values()),
            "files": len(self.files()),
            "rejects": len(self.rejects()),
        }

    def check(self, snapshot: str | None = None) -> list[str]:
        """Consistency problems of a snapshot (empty list when consistent): every per-spectrum array of a grid has
        the same length, pixel arrays span the grid, ``spectrum_id`` is unique and matches survey/checksum/row, and
        the files ledger accounts for exactly the spectra of each grid. Reads every coordinate: O(spectra)."""
        store = self._readonly_store(snapshot)
        problems: list[str] = []
        ledger = self.files(snapshot)
        for grid in GRIDS:
            if not _has_group(store, grid):
                if (ledger["grid"] == grid).any():
                    problems.append(f"{grid}: files ledger lists files but the group is missing")
                continue
            problems += _check_grid(zarr.open_group(store, path=grid, mode="r", zarr_format=3), grid, ledger)
        rejects = (
            zarr.open_group(store, mode="r", zarr_format=3)[REJECTS_GROUP] if _has_group(store, REJECTS_GROUP) else None
        )
        if rejects is not None and len({array.shape for _, array in rejects.arrays()}) > 1:
            problems.append("rejects: columns differ in length")
        return problems

    # --- writing -----------------------------------------------------------------------------------------------
    def ingest(
        self,
        files: Sequence[str | Path],
        survey: str = "auto",
        client: Client | None = None,
        progress: bool = True,
        batch_size: int | None = None,
        max_attempts: int = 3,
    ) -> IngestReport:
        """Read, resample and append ``files`` in one commit; see :func:`catalogbuilder.store.ingest.ingest_files`."""
        from catalogbuilder.store.ingest import ingest_files

        return ingest_files(
            self,
            files,
            survey=survey,
            client=client,
            progress=progress,
            batch_size=batch_size,
            max_attempts=max_attempts,
        )

    def garbage_collect(
        self, older_than: datetime.timedelta = datetime.timedelta(days=7), dry_run: bool = False
    ) -> dict[str, int]:
        """Delete objects no commit refers to (left by killed or conflicting ingests) that are older than
        ``older_than``; returns counts of what was (or, with ``dry_run``, would be) deleted. Every snapshot stays
        readable. Chunks of an ingest still running are unreferenced too: keep ``older_than`` above the longest
        ingest, or run it when no ingest is running."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - older_than
        with self.commit_lock():
            summary = self.repository.garbage_collect(cutoff, dry_run=dry_run)
        fields = (
            "chunks_deleted",
            "manifests_deleted",
            "snapshots_deleted",
            "attributes_deleted",
            "transaction_logs_deleted",
            "bytes_deleted",
        )
        return {field: int(getattr(summary, field)) for field in fields}

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Exclusive inter-process lock held while committing (see :data:`COMMIT_LOCK_NAME`)."""
        with open(self.path / COMMIT_LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _check_grid(group: zarr.Group, grid: str, ledger: pd.DataFrame) -> list[str]:
    """Problems of one grid group (see :meth:`SpectrumStore.check`)."""
    problems = []
    arrays = dict(group.arrays())
    lengths = {name: array.shape[0] for name, array in arrays.items() if name != "wavelength"}
    if len(set(lengths.values())) != 1:
        return [f"{grid}: per-spectrum arrays differ in length: {lengths}"]
    n = next(iter(lengths.values()))
    missing = [name for name in (*SPECTRUM_COORDS, "flux", "error", "mask") if name not in arrays]
    if missing:
        return [f"{grid}: missing arrays {missing}"]
    npix = grid_wavelength(grid).size
    if any(arrays[name].shape[1] != npix for name in ("flux", "error", "mask")) or arrays["wavelength"].shape != (
        npix,
    ):
        problems.append(f"{grid}: pixel axis is not the {npix}-pixel grid")
    ids = pd.Series(plain_strings(arrays["spectrum_id"][:]))
    if ids.duplicated().any():
        problems.append(f"{grid}: {int(ids.duplicated().sum())} duplicate spectrum_id values")
    sha = pd.Series(plain_strings(arrays["file_sha256"][:]))
    expected = (
        pd.Series(plain_strings(arrays["survey"][:]))
        + "-"
        + sha.str[:16]
        + "-"
        + pd.Series(arrays["row"][:]).astype(str)
    )
    if not (ids == expected).all():
        problems.append(f"{grid}: spectrum_id does not match survey-sha256[:16]-row")
    mine = ledger[ledger["grid"] == grid]
    if int(mine["n_spectra"].sum()) != n or set(mine["file_sha256"]) != set(sha):
        problems.append(f"{grid}: files ledger ({int(mine['n_spectra'].sum())} spectra) does not match the {n} stored")
    return problems


def plain_strings(values: np.ndarray) -> np.ndarray:
    """Zarr strings come back as numpy StringDType; hand out plain object arrays of ``str``."""
    return values.astype(object) if values.dtype.kind == "T" else values


def _quiet_local_storage_warning() -> None:
    """icechunk warns on every local repository that concurrent commits are unsafe; commits here are serialised
    by :meth:`SpectrumStore.commit_lock`, so that one warning is silenced (others still show)."""
    if "ICECHUNK_LOG" not in os.environ:
        icechunk.set_logs_filter("warn,icechunk::storage::object_store=error")
