"""Parallel, idempotent, transactional ingest of FITS spectra into a :class:`SpectrumStore`.

Workers (Dask, or this process when no client is given) hash, read and resample files in batches; the client is the
single writer, appending whole chunks to an icechunk session, and commits once at the end. See docs/store.md.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import icechunk
import numpy as np
from tqdm.auto import tqdm

from catalogbuilder import __version__
from catalogbuilder.constants import GRIDS
from catalogbuilder.readers import SURVEY_CHOICES, read_spectra
from catalogbuilder.readers.base import READER_VERSION, ReaderError, Spectrum, file_sha256
from catalogbuilder.store.resample import to_model_grid
from catalogbuilder.store.spectra import (
    BRANCH,
    FILE_COLUMNS,
    FILE_DIM,
    FILES_GROUP,
    PHOTOMETRY_KEYS,
    REJECT_COLUMNS,
    REJECT_DIM,
    REJECTS_GROUP,
    SPECTRUM_COORDS,
    SPECTRUM_DIM,
    GridBlock,
    GridWriter,
    SpectrumStore,
    StoreConflictError,
    StoreError,
    append_dataset,
    open_group_dataset,
    plain_strings,
    table_dataset,
)

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

FITS_PATTERNS: tuple[str, ...] = ("*.fits", "*.fits.gz")
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- inputs ------------------------------------------------------------------------------------------------------
def expand_inputs(items: Iterable[str | Path]) -> list[str]:
    """Absolute file paths from files, directories (their ``*.fits``/``*.fits.gz``, sorted, not recursive) and
    ``@list.txt`` files (one path per line, blank lines and ``#`` comments ignored, relative paths taken from the
    current directory). Order is kept; repeated paths are dropped. Paths that do not exist are kept (and rejected)."""
    paths: dict[str, None] = {}
    for item in items:
        text = str(item)
        if text.startswith("@"):
            lines = Path(text[1:]).expanduser().read_text().splitlines()
            entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            paths.update(dict.fromkeys(expand_inputs(entries)))
            continue
        path = Path(text).expanduser().absolute()
        if path.is_dir():
            found = sorted({p for pattern in FITS_PATTERNS for p in path.glob(pattern) if p.is_file()})
            paths.update(dict.fromkeys(str(p) for p in found))
        else:
            paths[str(path)] = None
    return list(paths)


# --- worker side ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HashResult:
    """SHA-256 of a file's bytes and its (size, mtime in ns) when hashed, or why it could not be read."""

    path: str
    sha256: str
    reason: str | None = None
    signature: tuple[int, int] = (0, 0)


@dataclasses.dataclass
class FileResult:
    """A file read and resampled onto its model grid(s), or the reason it was rejected."""

    path: str
    sha256: str
    blocks: list[GridBlock]
    reason: str | None = None


def file_signature(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns): changes whenever the file is rewritten."""
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def hash_file(path: str) -> HashResult:
    """Hash one file (worker task); an unreadable path gives an empty checksum and the OS error as reason."""
    try:
        signature = file_signature(path)
        return HashResult(path, file_sha256(path), signature=signature)
    except OSError as error:
        return HashResult(path, "", f"cannot read file: {error}")


def describe_error(error: BaseException) -> str:
    """The reason recorded for a rejected file: a ReaderError's message, else the exception type and text."""
    if isinstance(error, ReaderError) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def load_file(path: str, sha256: str, signature: tuple[int, int], survey: str, ingest_time: str) -> FileResult:
    """Read and resample one file (worker task) hashed as ``sha256`` when its size and mtime were ``signature``.
    Any exception becomes a rejection reason; never raises."""
    try:
        spectra = read_spectra(path, survey=survey)
        if not spectra:
            raise ReaderError("the reader returned no spectra")
        blocks = spectra_to_blocks(spectra, path, sha256, ingest_time)
        if file_signature(path) != tuple(signature):
            raise ReaderError("file changed while being ingested (size or modification time differ from when hashed)")
    except Exception as error:  # noqa: BLE001 - every failure of a file is recorded as a reject, never fatal
        return FileResult(path, sha256, [], describe_error(error))
    return FileResult(path, sha256, blocks)


def spectra_to_blocks(spectra: Sequence[Spectrum], path: str, sha256: str, ingest_time: str) -> list[GridBlock]:
    """Resample the spectra of one file and pack them, with their per-spectrum coordinates, into one block per grid."""
    rows = [spectrum.row for spectrum in spectra]
    if len(set(rows)) != len(rows):
        raise ReaderError(f"the reader returned duplicate rows {sorted(rows)}")
    by_grid: dict[str, list[Spectrum]] = collections.defaultdict(list)
    for spectrum in spectra:
        if spectrum.grid not in GRIDS:
            raise ReaderError(f"row {spectrum.row}: unknown model grid {spectrum.grid!r}")
        by_grid[spectrum.grid].append(spectrum)
    blocks = []
    for grid, members in by_grid.items():
        resampled = [to_model_grid(spectrum) for spectrum in members]
        coords = {
            name: np.asarray([_coordinate(s, name, path, sha256, ingest_time) for s in members])
            for name in SPECTRUM_COORDS
        }
        blocks.append(
            GridBlock(
                grid=grid,
                flux=np.stack([r[0] for r in resampled]),
                error=np.stack([r[1] for r in resampled]),
                mask=np.stack([r[2] for r in resampled]),
                coords=coords,
            )
        )
    return blocks


def _coordinate(spectrum: Spectrum, name: str, path: str, sha256: str, ingest_time: str) -> Any:
    """Value of one per-spectrum coordinate (see docs/store.md for the meaning of each)."""
    if name == "spectrum_id":
        return f"{spectrum.survey}-{sha256[:16]}-{spectrum.row}"
    if name in PHOTOMETRY_KEYS:
        return float(spectrum.meta.get(name, np.nan))
    computed = {
        "source_id": spectrum.object_id,
        "file_path": path,
        "file_sha256": sha256,
        "reader_version": str(spectrum.meta.get("reader_version", READER_VERSION)),
        "ingest_time": ingest_time,
    }
    if name in computed:
        return computed[name]
    return getattr(spectrum, name)


# --- execution: Dask workers or this process, results always in input order --------------------------------------
def map_in_order(
    func: Callable[[_T], _R],
    items: Sequence[_T],
    client: Client | None,
    batch_size: int,
    on_failure: Callable[[_T, BaseException], _R],
) -> Iterator[_R]:
    """``func`` over ``items`` on the cluster in batches (at most two batches in flight, so memory does not grow with
    ``len(items)``), yielding results in input order; without a client, serially here. A task that fails on the
    cluster (e.g. its worker died) yields ``on_failure(item, exception)``."""
    if client is None:
        yield from (func(item) for item in items)
        return
    in_flight: collections.deque[tuple[Sequence[_T], list[Any]]] = collections.deque()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        in_flight.append((batch, client.map(func, batch, pure=False)))
        if len(in_flight) > 1:
            yield from _collect(*in_flight.popleft(), on_failure)
    while in_flight:
        yield from _collect(*in_flight.popleft(), on_failure)


def _collect(batch: Sequence[_T], futures: list[Any], on_failure: Callable[[_T, BaseException], _R]) -> Iterator[_R]:
    for item, future in zip(batch, futures):
        try:
            yield future.result()
        except Exception as error:  # noqa: BLE001 - a lost task is one rejected file, not a failed ingest
            yield on_failure(item, error)
        finally:
            future.release()


def default_batch_size(client: Client | None) -> int:
    """Files per batch: 4 per worker thread (at least 8), enough to keep workers busy while the client writes."""
    if client is None:
        return 8
    threads = sum(client.nthreads().values())
    return max(8, 4 * threads)


# --- the ingest itself ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class IngestReport:
    """What one ingest did. ``added`` is spectra per grid; ``skipped`` lists (path, path already holding the same
    bytes) for files not read again; ``rejected`` lists (path, reason)."""

    store: str
    files_given: int = 0
    added: dict[str, int] = dataclasses.field(default_factory=lambda: {grid: 0 for grid in GRIDS})
    files_added: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    spectra_skipped: int = 0
    previously_rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    snapshot_id: str | None = None
    attempts: int = 0
    seconds: float = 0.0

    @property
    def spectra_added(self) -> int:
        """Spectra added over all grids."""
        return sum(self.added.values())

    @property
    def same_bytes_other_path(self) -> list[tuple[str, str]]:
        """Skipped files whose bytes were ingested under another path."""
        return [(path, first) for path, first in self.skipped if path != first]

    def summary(self) -> str:
        """Human-readable summary printed by the CLI."""
        per_grid = ", ".join(f"{grid} {n}" for grid, n in self.added.items())
        lines = [
            f"store {self.store}: {self.files_given} files given",
            f"  added {self.spectra_added} spectra ({per_grid}) from {self.files_added} files"
            + (f" in snapshot {self.snapshot_id}" if self.snapshot_id else " (no new snapshot)"),
            f"  skipped {len(self.skipped)} files ({self.spectra_skipped} spectra) already present",
        ]
        lines += [f"    same bytes as {first}: {path}" for path, first in self.same_bytes_other_path]
        if self.previously_rejected:
            lines.append(
                f"  skipped {len(self.previously_rejected)} files rejected before (same bytes, same reader version)"
            )
        lines.append(f"  rejected {len(self.rejected)} files")
        lines += [f"    {path}: {reason}" for path, reason in self.rejected]
        return "\n".join(lines)


@dataclasses.dataclass
class _StoreState:
    """What the session's base snapshot already holds: files by checksum, rejects and grid lengths."""

    file_by_sha: dict[str, tuple[str, int]]  # sha256 -> (first path, spectra)
    rejected: dict[tuple[str, str], str]  # (sha256, reader_version) -> reason
    lengths: dict[str, int]


def _store_state(session: icechunk.Session) -> _StoreState:
    files = open_group_dataset(session.store, FILES_GROUP, dask=False)
    file_by_sha: dict[str, tuple[str, int]] = {}
    if files is not None:
        for sha, path, count in zip(
            plain_strings(files["file_sha256"].values),
            plain_strings(files["file_path"].values),
            files["n_spectra"].values,
        ):
            first, total = file_by_sha.get(sha, (path, 0))
            file_by_sha[sha] = (first, total + int(count))
    rejects = open_group_dataset(session.store, REJECTS_GROUP, dask=False)
    rejected = {}
    if rejects is not None:
        keys = zip(
            plain_strings(rejects["file_sha256"].values),
            plain_strings(rejects["reader_version"].values),
            plain_strings(rejects["reason"].values),
        )
        rejected = {(sha, version): reason for sha, version, reason in keys if sha}
    lengths = {}
    for grid in GRIDS:
        dataset = open_group_dataset(session.store, grid, dask=False)
        lengths[grid] = 0 if dataset is None else int(dataset.sizes[SPECTRUM_DIM])
    return _StoreState(file_by_sha, rejected, lengths)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def ingest_files(
    store: SpectrumStore,
    files: Sequence[str | Path],
    survey: str = "auto",
    client: Client | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    max_attempts: int = 3,
) -> IngestReport:
    """Ingest ``files`` (paths, directories, ``@lists``) into ``store`` as one icechunk commit.

    Files whose bytes are already in the store are skipped (also under another path), as are files rejected before
    with the same bytes and reader version. Unreadable files are recorded in the store's rejects. If another process
    commits first, the ingest is redone on top of it (up to ``max_attempts``), else :class:`StoreConflictError`.
    """
    if survey not in SURVEY_CHOICES:
        raise ValueError(f"unknown survey {survey!r}; expected one of {SURVEY_CHOICES}")
    started = time.perf_counter()
    paths = expand_inputs(files)
    batch = batch_size or default_batch_size(client)
    hashes = list(
        tqdm(
            map_in_order(
                hash_file, paths, client, batch, lambda path, error: HashResult(path, "", describe_error(error))
            ),
            total=len(paths),
            desc="hashing",
            unit="file",
            disable=not progress or not paths,
        )
    )
    for attempt in range(1, max_attempts + 1):
        report = IngestReport(store=str(store.path), files_given=len(paths), attempts=attempt)
        ingest_time = _utc_now()
        try:
            session = store.repository.writable_session(BRANCH)
            new_files, new_rejects = _write_session(
                session, hashes, survey, ingest_time, client, batch, progress, report
            )
        except (icechunk.IcechunkError, OSError) as error:
            raise StoreError(f"cannot write to spectrum store {store.path}; nothing was committed: {error}") from error
        if not session.has_uncommitted_changes:
            report.seconds = time.perf_counter() - started
            return report
        message = (
            f"ingest {report.spectra_added} spectra from {len(new_files)} files"
            f" ({len(new_rejects)} rejected, {len(report.skipped)} already present)"
        )
        metadata = {"software_version": __version__, "ingest_time": ingest_time, "added": report.added}
        try:
            with store.commit_lock():
                report.snapshot_id = session.commit(message, metadata=metadata)
        except icechunk.ConflictError as error:
            log.warning("attempt %d: another ingest committed first (%s); redoing on top of it", attempt, error)
            continue
        except (icechunk.IcechunkError, OSError) as error:
            raise StoreError(f"cannot commit to spectrum store {store.path}; nothing was committed: {error}") from error
        report.seconds = time.perf_counter() - started
        return report
    raise StoreConflictError(
        f"{store.path}: other ingests kept committing first; nothing from this run was committed after {max_attempts}"
        " attempts. Run the same command again: files already ingested are skipped."
    )


def _write_session(
    session: icechunk.Session,
    hashes: Sequence[HashResult],
    survey: str,
    ingest_time: str,
    client: Client | None,
    batch: int,
    progress: bool,
    report: IngestReport,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Plan (skip known bytes), read and append into ``session``; returns the new ledger and reject rows."""
    state = _store_state(session)
    new_rejects: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    to_read: list[HashResult] = []
    for item in hashes:
        if item.reason is not None:
            new_rejects.append(_reject_row(item.path, item.sha256, item.reason))
        elif item.sha256 in state.file_by_sha:
            first, count = state.file_by_sha[item.sha256]
            report.skipped.append((item.path, first))
            report.spectra_skipped += count
        elif item.sha256 in seen:
            report.skipped.append((item.path, seen[item.sha256]))
        elif (item.sha256, READER_VERSION) in state.rejected:
            report.previously_rejected.append((item.path, state.rejected[item.sha256, READER_VERSION]))
        else:
            seen[item.sha256] = item.path
            to_read.append(item)

    writers = {grid: GridWriter(session.store, grid, state.lengths[grid]) for grid in GRIDS}
    new_files: list[dict[str, Any]] = []
    task = functools.partial(_load_task, survey=survey, ingest_time=ingest_time)
    results = map_in_order(
        task, to_read, client, batch, lambda item, error: FileResult(item.path, item.sha256, [], describe_error(error))
    )
    for result in tqdm(results, total=len(to_read), desc="ingesting", unit="file", disable=not progress or not to_read):
        if result.reason is not None:
            new_rejects.append(_reject_row(result.path, result.sha256, result.reason))
            continue
        for block in result.blocks:
            writers[block.grid].add(block)
            report.added[block.grid] += len(block)
            new_files.append(
                {
                    "file_path": result.path,
                    "file_sha256": result.sha256,
                    "grid": block.grid,
                    "n_spectra": len(block),
                    "reader_version": str(block.coords["reader_version"][0]),
                    "ingest_time": ingest_time,
                }
            )
        report.files_added += 1
    for writer in writers.values():
        writer.flush()
    if new_files:
        append_dataset(session.store, FILES_GROUP, table_dataset(new_files, FILE_COLUMNS, FILE_DIM), FILE_DIM)
    if new_rejects:
        append_dataset(session.store, REJECTS_GROUP, table_dataset(new_rejects, REJECT_COLUMNS, REJECT_DIM), REJECT_DIM)
    report.rejected = [(row["file_path"], row["reason"]) for row in new_rejects]
    return new_files, new_rejects


def _load_task(item: HashResult, survey: str, ingest_time: str) -> FileResult:
    """``load_file`` on a hashed file: the unit of work sent to the workers."""
    return load_file(item.path, item.sha256, item.signature, survey, ingest_time)


def _reject_row(path: str, sha256: str, reason: str) -> dict[str, Any]:
    return {
        "file_path": path,
        "file_sha256": sha256,
        "reason": reason,
        "time": _utc_now(),
        "reader_version": READER_VERSION,
    }
