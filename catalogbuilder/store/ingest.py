"""Parallel, idempotent, transactional ingest of FITS spectra into a :class:`~catalogbuilder.store.SpectrumStore`.

Workers (Dask, or this process when no client is given) hash, read and resample files in batches; the client is the
single writer (store/writer.py): it appends whole chunks, records the files' lineage (store/lineage.py) and rejects,
and commits once at the end. See docs/store.md.
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
import pandas as pd
from tqdm.auto import tqdm

from catalogbuilder import __version__
from catalogbuilder.constants import GRIDS
from catalogbuilder.readers import READERS, SURVEY_CHOICES, read_spectra
from catalogbuilder.readers.base import READER_VERSION, ReaderError, Spectrum, file_sha256
import catalogbuilder.store.lineage as lineage
from catalogbuilder.files import error_line
from catalogbuilder.store.errors import StoreConflictError, StoreError, StoreWriteError
from catalogbuilder.store.layout import (
    FILE_ACTIVE,
    FILE_COLUMNS,
    FILE_DIM,
    FILES_GROUP,
    NATIVE_GROUPS,
    PHOTOMETRY_KEYS,
    REJECT_COLUMNS,
    REJECT_CURRENT,
    REJECT_DIM,
    REJECT_RESOLVED,
    REJECT_RETIRED,
    REJECTS_GROUP,
    GridBlock,
    NativeBlock,
    read_arrays,
    sha_key,
    stable_key,
    star_key,
)
from catalogbuilder.store.quality import flux_constant, good_pixel_fraction
from catalogbuilder.store.resample import survey_mask, to_model_grid
from catalogbuilder.store.writer import StoreWriter, group_length

if TYPE_CHECKING:
    from distributed import Client

    from catalogbuilder.store.handle import SpectrumStore

log = logging.getLogger(__name__)

FITS_PATTERNS: tuple[str, ...] = ("*.fits", "*.fits.gz")
SURVEY_OF_CHOICE: dict[str, str] = {reader.survey: reader.spectra_survey for reader in READERS}
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- inputs ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
    """Expanded inputs: file paths in order (unreadable entries included, they become rejects), and the
    subfolders of input folders that were not searched (the search is not recursive)."""

    paths: list[str]
    subfolders: list[str] = dataclasses.field(default_factory=list)


def expand_inputs(items: Iterable[str | Path]) -> Inputs:
    """Absolute file paths from files, folders (their ``*.fits``/``*.fits.gz`` entries, sorted, not recursive) and
    ``@list.txt`` files (one path per line, blank lines and ``#`` comments ignored, relative paths taken from the
    current directory). Order is kept; repeated paths are dropped. Paths that cannot be read — missing, dangling or
    looping symlinks (also inside folders), unlistable folders — are kept, and rejected with the reason. Raises
    ``OSError`` for an unreadable ``@list``."""
    paths: dict[str, None] = {}
    subfolders: list[str] = []
    for item in items:
        text = str(item)
        if text.startswith("@"):
            lines = Path(text[1:]).expanduser().read_text().splitlines()
            nested = expand_inputs(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
            paths.update(dict.fromkeys(nested.paths))
            subfolders += nested.subfolders
            continue
        path = Path(text).expanduser().absolute()
        if not path.is_dir():
            paths[str(path)] = None
            continue
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError:  # an unlistable folder is one unreadable input
            paths[str(path)] = None
            continue
        for entry in entries:
            if _is_dir(entry):
                subfolders.append(entry.path)
            elif any(Path(entry.name).match(pattern) for pattern in FITS_PATTERNS):
                paths[entry.path] = None
    return Inputs(list(paths), subfolders)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


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
    """A file read and put on its model grid(s), or the reason it was rejected (and the survey it was recognised as,
    ``caller`` when the reason is the survey asked for)."""

    path: str
    sha256: str
    blocks: list[GridBlock]
    reason: str | None = None
    survey: str = ""
    caller: bool = False
    product_key: str = ""
    reduction: str = ""
    reduction_date: str = ""


def file_signature(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns): changes whenever the file is rewritten."""
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def hash_file(path: str) -> HashResult:
    """Hash one file (worker task); an unreadable path gives an empty checksum and the OS error as reason."""
    try:
        if os.path.isdir(path):
            os.scandir(path).close()  # a folder is only an input when it cannot be listed: say why
            return HashResult(path, "", "cannot read folder")
        signature = file_signature(path)
        return HashResult(path, file_sha256(path), signature=signature)
    except OSError as error:
        return HashResult(path, "", f"cannot read file: {error.strerror or error}")


def describe_error(error: BaseException) -> str:
    """The reason recorded for a rejected file: a ReaderError's message, else the exception type and text."""
    if isinstance(error, ReaderError) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def load_file(path: str, sha256: str, signature: tuple[int, int], survey: str, ingest_time: str) -> FileResult:
    """Read one file hashed as ``sha256`` when its size and mtime were ``signature`` and put it on its grid(s)
    (worker task). Any exception becomes a rejection reason; never raises."""
    try:
        spectra = read_spectra(path, survey=survey)
        if not spectra:
            raise ReaderError("the reader returned no spectra")
        blocks = spectra_to_blocks(spectra, path, sha256, ingest_time)
        if file_signature(path) != tuple(signature):
            raise ReaderError("file changed while being ingested (size or modification time differ from when hashed)",
                              survey=spectra[0].survey)
    except Exception as error:  # noqa: BLE001 - every failure of a file is recorded as a reject, never fatal
        return FileResult(path, sha256, [], describe_error(error), getattr(error, "survey", ""),
                          getattr(error, "caller", False))
    first = spectra[0]
    return FileResult(path, sha256, blocks, survey=first.survey, product_key=first.product_key,
                      reduction=first.reduction, reduction_date=first.reduction_date)


def spectra_to_blocks(spectra: Sequence[Spectrum], path: str, sha256: str, ingest_time: str) -> list[GridBlock]:
    """Put the spectra of one file on their grids and pack them, with their per-spectrum columns (quality included)
    and, for grids that keep them, their native pixels, into one block per grid."""
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
        flux, error, mask = (np.stack(arrays) for arrays in zip(*(to_model_grid(s) for s in members)))
        columns = {
            "spectrum_id": [f"{s.survey}-{sha256[:16]}-{s.row}" for s in members],
            "source_id": [s.object_id for s in members],
            "survey": [s.survey for s in members],
            "kind": [s.kind for s in members],
            "file_path": [path] * len(members),
            "file_sha256": [sha256] * len(members),
            "reader_version": [str(s.meta.get("reader_version", READER_VERSION)) for s in members],
            "ingest_time": [ingest_time] * len(members),
            "row": [s.row for s in members],
            "visit": [s.visit for s in members],
            **{name: [float(getattr(s, name)) for s in members] for name in ("ra", "dec", "snr", "mjd")},
            **{key: [float(s.meta.get(key, np.nan)) for s in members] for key in PHOTOMETRY_KEYS},
            "star_key": [star_key(s.survey, s.object_id) for s in members],
            "good_pixel_fraction": good_pixel_fraction(flux, error),
            "flux_constant": flux_constant(flux),
            "active": [True] * len(members),
        }
        native = None
        if grid in NATIVE_GROUPS:
            native = NativeBlock(
                wavelength=np.concatenate([np.asarray(s.wavelength, np.float32) for s in members]),
                flux=np.concatenate([np.asarray(s.flux, np.float32) for s in members]),
                error=np.concatenate([np.asarray(s.error, np.float32) for s in members]),
                mask=np.concatenate([survey_mask(s) for s in members]),
                lengths=np.asarray([np.asarray(s.flux).size for s in members], dtype=np.int64),
            )
        blocks.append(GridBlock(grid, flux, error, mask, {k: np.asarray(v) for k, v in columns.items()}, native))
    return blocks


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


# --- the report ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class IngestReport:
    """What one ingest did. ``added`` is spectra per grid; ``skipped`` lists (path, path already holding the same
    bytes) for files not read again; ``rejected`` lists (path, reason) of this run's new rejects; ``superseded``,
    ``retired``, ``reactivated`` list (path, reason) of files whose lineage changed."""

    store: str
    files_given: int = 0
    subfolders_skipped: list[str] = dataclasses.field(default_factory=list)
    added: dict[str, int] = dataclasses.field(default_factory=lambda: {grid: 0 for grid in GRIDS})
    files_added: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    spectra_skipped: int = 0
    previously_rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    still_rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    superseded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    retired: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reactivated: list[str] = dataclasses.field(default_factory=list)
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
        if self.subfolders_skipped:
            lines.append(f"  {len(self.subfolders_skipped)} subfolders of input folders not searched (not recursive)")
        if self.previously_rejected:
            lines.append(f"  skipped {len(self.previously_rejected)} files rejected before (same bytes, same reader "
                         "version; --retry-rejects reads them again)")
        for title, entries in (("superseded", self.superseded), ("retired", self.retired)):
            if entries:
                lines.append(f"  {title} {len(entries)} files")
                lines += [f"    {path}: {reason}" for path, reason in entries]
        if self.reactivated:
            lines.append(f"  reactivated {len(self.reactivated)} files")
        lines.append(f"  rejected {len(self.rejected)} files")
        lines += [f"    {path}: {reason}" for path, reason in self.rejected]
        if self.still_rejected:
            lines.append(f"  {len(self.still_rejected)} files still unreadable (recorded before)")
            lines += [f"    {path}: {reason}" for path, reason in self.still_rejected]
        return "\n".join(lines)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- what the store knows: ledgers read by number, rows read only where needed ----------------------------------
class _Ledger:
    """The files ledger and rejects of a session's base snapshot, read as 64-bit keys; full rows on demand."""

    def __init__(self, writer: StoreWriter) -> None:
        self.zstore = writer.session_store
        self.n_files = group_length(self.zstore, FILES_GROUP, FILE_DIM)
        keys = ("sha_key", "path_key", "product_hash", "status")
        numbers = read_arrays(self.zstore, FILES_GROUP, keys) if self.n_files else {
            key: np.zeros(0, np.uint64) for key in keys}
        self.sha_keys, self.path_keys, self.product_hashes, self.status = (numbers[key] for key in keys)
        self.rejects = pd.DataFrame(read_arrays(self.zstore, REJECTS_GROUP, list(REJECT_COLUMNS))) if (
            group_length(self.zstore, REJECTS_GROUP, REJECT_DIM)) else pd.DataFrame(columns=list(REJECT_COLUMNS))
        self._rows: dict[int, dict[str, Any]] = {}

    def row(self, index: int) -> dict[str, Any]:
        """The full ledger row at ``index`` (cached)."""
        if index not in self._rows:
            self._load([index])
        return self._rows[index]

    def _load(self, indices: Iterable[int]) -> None:
        wanted = sorted(set(int(i) for i in indices) - set(self._rows))
        if wanted:
            table = read_arrays(self.zstore, FILES_GROUP, list(FILE_COLUMNS), np.asarray(wanted))
            for position, index in enumerate(wanted):
                self._rows[index] = {name: values[position] for name, values in table.items()}

    def _matching(self, keys: np.ndarray, key: np.uint64, column: str, value: str) -> list[int]:
        candidates = [int(i) for i in np.flatnonzero(keys == key)]
        self._load(candidates)
        return [i for i in candidates if self._rows[i][column] == value]

    def with_sha(self, sha256: str) -> list[int]:
        """Ledger indices of the files with these bytes."""
        return self._matching(self.sha_keys, sha_key(sha256), "file_sha256", sha256)

    def at_path(self, path: str) -> list[int]:
        """Ledger indices of the files recorded at ``path``."""
        return self._matching(self.path_keys, stable_key(path), "file_path", path)

    def of_product(self, product_key: str) -> list[int]:
        """Ledger indices of the reductions of one product."""
        return self._matching(self.product_hashes, stable_key(product_key), "product_key", product_key)


# --- the ingest itself ---------------------------------------------------------------------------------------------
def ingest_files(
    store: SpectrumStore,
    files: Sequence[str | Path] | Inputs,
    survey: str = "auto",
    client: Client | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    max_attempts: int = 3,
    retry_rejects: bool = False,
    sync: bool = False,
) -> IngestReport:
    """Ingest ``files`` (paths, folders, ``@lists``) into ``store`` as one icechunk commit.

    Files whose bytes are already in the store are skipped (also under another path), as are files rejected before
    with the same bytes and reader version (unless ``retry_rejects``; a reject caused by the survey asked for is
    always retried). Unreadable files are recorded in the store's rejects, once. Lineage (store/lineage.py): new
    content at a known path and newer reductions of a known product supersede the older files; with ``sync`` the
    inputs are the complete set and active files not among them are retired. If another process commits first, the
    ingest is redone on top of it (up to ``max_attempts``), else :class:`StoreConflictError`. A store that cannot be
    written (e.g. a full disk) raises :class:`StoreWriteError`; nothing is then committed.
    """
    if survey not in SURVEY_CHOICES:
        raise ValueError(f"unknown survey {survey!r}; expected one of {SURVEY_CHOICES}")
    started = time.perf_counter()
    inputs = files if isinstance(files, Inputs) else expand_inputs(files)
    batch = batch_size or default_batch_size(client)
    hashes = list(tqdm(
        map_in_order(hash_file, inputs.paths, client, batch,
                     lambda path, error: HashResult(path, "", describe_error(error))),
        total=len(inputs.paths), desc="hashing", unit="file", disable=not progress or not inputs.paths))
    for attempt in range(1, max_attempts + 1):
        report = IngestReport(store=str(store.path), files_given=len(inputs.paths), attempts=attempt,
                              subfolders_skipped=list(inputs.subfolders))
        ingest_time = _utc_now()
        try:
            writer = store.writer()
            _Run(writer, survey, ingest_time, report, retry_rejects).run(hashes, client, batch, progress, sync)
            if not writer.has_changes:
                report.seconds = time.perf_counter() - started
                return report
            metadata = {"software_version": __version__, "ingest_time": ingest_time, "added": report.added}
            message = (f"ingest {report.spectra_added} spectra from {report.files_added} files "
                       f"({len(report.rejected)} rejected, {len(report.skipped)} already present, "
                       f"{len(report.superseded)} superseded, {len(report.retired)} retired)")
            report.snapshot_id = writer.commit(message, metadata)
        except icechunk.ConflictError as error:
            log.warning("attempt %d: another ingest committed first (%s); redoing on top of it", attempt, error)
            continue
        except (icechunk.IcechunkError, OSError) as error:
            raise _write_failed(store, error) from error
        report.seconds = time.perf_counter() - started
        return report
    raise StoreConflictError(
        f"{store.path}: other ingests kept committing first; nothing from this run was committed after {max_attempts}"
        " attempts. Run the same command again: files already ingested are skipped."
    )


class _Run:
    """One attempt of an ingest inside one writable session."""

    def __init__(self, writer: StoreWriter, survey: str, ingest_time: str, report: IngestReport,
                 retry_rejects: bool) -> None:
        self.writer = writer
        self.survey = survey
        self.ingest_time = ingest_time
        self.report = report
        self.retry_rejects = retry_rejects
        self.ledger = _Ledger(writer)
        self.known: dict[tuple[str, str], lineage.FileRecord] = {}  # (path, sha256) of files in the ledger touched
        self.known_rows: dict[tuple[str, str], list[int]] = {}  # their ledger rows (one per grid)
        self.new_rows: list[tuple[lineage.FileRecord, dict[str, Any]]] = []  # ledger rows of this run
        self.new_records: list[lineage.FileRecord] = []
        self.new_rejects: list[dict[str, Any]] = []
        self.resolved_paths: set[str] = set()

    def run(self, hashes: Sequence[HashResult], client: Client | None, batch: int, progress: bool,
            sync: bool) -> None:
        to_read = self._plan(hashes)
        task = functools.partial(_load_task, survey=self.survey, ingest_time=self.ingest_time)
        results = map_in_order(task, to_read, client, batch,
                               lambda item, error: FileResult(item.path, item.sha256, [], describe_error(error)))
        for result in tqdm(results, total=len(to_read), desc="ingesting", unit="file",
                           disable=not progress or not to_read):
            self._take(result)
        self.writer.flush()
        self._resolve_lineage()
        if sync:
            self._retire_absent({item.path for item in hashes})
        self._write_ledgers()

    # -- planning: what to read, what is known --
    def _plan(self, hashes: Sequence[HashResult]) -> list[HashResult]:
        seen: dict[str, str] = {}
        to_read = []
        current = self.ledger.rejects.loc[self.ledger.rejects["status"] == REJECT_CURRENT]
        for item in hashes:
            if item.reason is not None:
                self._reject(item.path, "", item.reason, SURVEY_OF_CHOICE.get(self.survey, ""), sticky=True)
            elif known := self.ledger.with_sha(item.sha256):
                self._known_bytes(item, known)
            elif item.sha256 in seen:
                self.report.skipped.append((item.path, seen[item.sha256]))
            elif self.retry_rejects or not self._rejected_before(current, item):
                seen[item.sha256] = item.path
                to_read.append(item)
        return to_read

    def _known_bytes(self, item: HashResult, known: list[int]) -> None:
        """Bytes already in the store: skipped, or offered again when given at their own path while not active."""
        self.resolved_paths.add(item.path)
        rows = [self.ledger.row(index) for index in known]
        if any(row["file_path"] == item.path and row["status"] != FILE_ACTIVE for row in rows):
            self._file(item.path, item.sha256).offered = True
            return
        self.report.skipped.append((item.path, str(rows[0]["file_path"])))
        self.report.spectra_skipped += int(sum(row["n_spectra"] for row in rows))

    def _file(self, path: str, sha256: str) -> lineage.FileRecord:
        """The lineage record of a file of the ledger (all its grid rows together)."""
        key = (path, sha256)
        if key not in self.known:
            rows = [index for index in self.ledger.at_path(path) if self.ledger.row(index)["file_sha256"] == sha256]
            first = self.ledger.row(rows[0])
            self.known_rows[key] = rows
            self.known[key] = lineage.FileRecord(
                path=path, sha256=sha256, product_key=str(first["product_key"]), reduction=str(first["reduction"]),
                reduction_date=str(first["reduction_date"]), sequence=rows[0], status=int(first["status"]),
                index=rows[0])
        return self.known[key]

    def _rejected_before(self, current: pd.DataFrame, item: HashResult) -> bool:
        """A sticky current reject of these bytes by this reader version: skip the file (reported)."""
        match = current.loc[(current["file_sha256"] == item.sha256) & (current["reader_version"] == READER_VERSION)
                            & current["sticky"].astype(bool)]
        if match.empty:
            return False
        self.report.previously_rejected.append((item.path, str(match["reason"].iloc[-1])))
        return True

    # -- reading --
    def _take(self, result: FileResult) -> None:
        if result.reason is not None:
            survey = result.survey or SURVEY_OF_CHOICE.get(self.survey, "")
            self._reject(result.path, result.sha256, result.reason, survey, sticky=not result.caller)
            if result.sha256 and not result.caller:  # new unreadable bytes at a known path replace its file
                self._replace_at_path(result.path, result.sha256)
            return
        self.resolved_paths.add(result.path)
        record = lineage.FileRecord(path=result.path, sha256=result.sha256, product_key=result.product_key,
                                    reduction=result.reduction, reduction_date=result.reduction_date,
                                    sequence=self.ledger.n_files + len(self.new_rows), status=FILE_ACTIVE,
                                    offered=True)
        self.new_records.append(record)
        for block in result.blocks:
            first = self.writer.append_spectra(block)
            self.report.added[block.grid] += len(block)
            self.new_rows.append((record, {
                "file_path": result.path, "file_sha256": result.sha256, "grid": block.grid,
                "survey": result.survey, "n_spectra": len(block), "first_position": first,
                "reader_version": str(block.columns["reader_version"][0]), "ingest_time": self.ingest_time,
                "product_key": result.product_key, "reduction": result.reduction,
                "reduction_date": result.reduction_date, "sha_key": sha_key(result.sha256),
                "path_key": stable_key(result.path), "product_hash": stable_key(result.product_key),
                "status": FILE_ACTIVE, "status_time": self.ingest_time, "status_reason": "",
            }))
        self.report.files_added += 1
        self._replace_at_path(result.path, result.sha256)

    def _replace_at_path(self, path: str, sha256: str) -> None:
        shas = {str(self.ledger.row(index)["file_sha256"]) for index in self.ledger.at_path(path)}
        for record in lineage.replace_paths([self._file(path, sha) for sha in sorted(shas)], sha256):
            self.report.superseded.append((record.path, record.reason))

    def _reject(self, path: str, sha256: str, reason: str, survey: str, sticky: bool) -> None:
        """Record a reject, unless the same input was rejected for the same reason before and still is current."""
        rejects = self.ledger.rejects
        same = rejects.loc[(rejects["status"] == REJECT_CURRENT) & (rejects["file_path"] == path)
                           & (rejects["file_sha256"] == sha256) & (rejects["reason"] == reason)]
        if not same.empty:
            self.report.still_rejected.append((path, reason))
            return
        self.report.rejected.append((path, reason))
        self.new_rejects.append({
            "file_path": path, "file_sha256": sha256, "reason": reason, "time": _utc_now(),
            "reader_version": READER_VERSION, "survey": survey, "requested_survey": self.survey,
            "path_key": stable_key(path), "sticky": sticky, "status": REJECT_CURRENT,
        })

    # -- lineage --
    def _resolve_lineage(self) -> None:
        offered = self.new_records + [record for record in self.known.values() if record.offered]
        for product in sorted({record.product_key for record in offered if record.product_key}):
            shas = {(str(self.ledger.row(i)["file_path"]), str(self.ledger.row(i)["file_sha256"]))
                    for i in self.ledger.of_product(product)}
            members = [self._file(path, sha) for path, sha in sorted(shas)]
            members += [record for record in self.new_records if record.product_key == product]
            for record in lineage.resolve_product(members):
                if record.status != FILE_ACTIVE:
                    self.report.superseded.append((record.path, record.reason))
        for record in self.known.values():  # offered files without a product are simply active again
            if record.offered and not record.product_key:
                record.status, record.reason = FILE_ACTIVE, ""

    def _retire_absent(self, given: set[str]) -> None:
        """``sync``: retire the active files (and current rejects) whose path is not among the inputs."""
        active = [int(i) for i in np.flatnonzero(self.ledger.status == FILE_ACTIVE)]
        absent = {str(self.ledger.row(i)["file_path"]) for i in active} - given
        rejects = self.ledger.rejects
        absent |= set(rejects.loc[rejects["status"] == REJECT_CURRENT, "file_path"].astype(str)) - given
        self.retire_paths(absent, "not in the inputs of a sync ingest")

    def retire_paths(self, paths: set[str], why: str) -> set[str]:
        """Retire the active files and current rejects at ``paths``; returns the paths found in the store."""
        found = set()
        for index in np.flatnonzero(self.ledger.status == FILE_ACTIVE):
            row = self.ledger.row(int(index))
            if str(row["file_path"]) in paths:
                found.add(str(row["file_path"]))
                for record in lineage.retire([self._file(str(row["file_path"]), str(row["file_sha256"]))], why):
                    self.report.retired.append((record.path, record.reason))
        rejects = self.ledger.rejects
        gone = ((rejects["status"] == REJECT_CURRENT) & rejects["file_path"].isin(paths)).to_numpy()
        found |= set(rejects.loc[gone, "file_path"].astype(str))
        self.report.retired += [(path, f"reject retired: {why}") for path in rejects.loc[gone, "file_path"]]
        self.writer.set_values(REJECTS_GROUP, "status", np.flatnonzero(gone), REJECT_RETIRED)
        return found

    def _write_ledgers(self) -> None:
        """Status changes of known files (and their spectra's ``active`` flags), new ledger rows, rejects."""
        for key, record in self.known.items():
            rows = self.known_rows[key]
            if int(self.ledger.row(rows[0])["status"]) == record.status:
                continue
            if record.status == FILE_ACTIVE and record.offered:
                self.report.reactivated.append(record.path)
            for index in rows:
                row = self.ledger.row(index)
                self.writer.set_values(FILES_GROUP, "status", [index], record.status)
                self.writer.set_values(FILES_GROUP, "status_time", [index], self.ingest_time)
                self.writer.set_values(FILES_GROUP, "status_reason", [index], record.reason)
                self._set_active(str(row["grid"]), int(row["first_position"]), int(row["n_spectra"]),
                                 record.status == FILE_ACTIVE)
        rows = []
        for record, row in self.new_rows:
            if record.status != FILE_ACTIVE:
                row.update(status=record.status, status_reason=record.reason)
                self._set_active(row["grid"], row["first_position"], row["n_spectra"], False)
            rows.append(row)
        self.writer.append_rows(FILES_GROUP, rows, FILE_COLUMNS, FILE_DIM)
        rejects = self.ledger.rejects
        resolved = (rejects["status"] == REJECT_CURRENT) & rejects["file_path"].isin(self.resolved_paths)
        self.writer.set_values(REJECTS_GROUP, "status", np.flatnonzero(resolved.to_numpy()), REJECT_RESOLVED)
        self.writer.append_rows(REJECTS_GROUP, self.new_rejects, REJECT_COLUMNS, REJECT_DIM)

    def _set_active(self, grid: str, first: int, count: int, active: bool) -> None:
        self.writer.set_values(grid, "active", np.arange(first, first + count), active)


def _write_failed(store: SpectrumStore, error: BaseException) -> StoreWriteError:
    """The one-line error of a store write that failed (e.g. a full disk; nothing was committed)."""
    return StoreWriteError(f"cannot write to spectrum store {store.path}: {error_line(error)}; nothing was committed")


def _load_task(item: HashResult, survey: str, ingest_time: str) -> FileResult:
    """``load_file`` on a hashed file: the unit of work sent to the workers."""
    return load_file(item.path, item.sha256, item.signature, survey, ingest_time)


def retire_files(store: SpectrumStore, paths: Sequence[str | Path], why: str = "withdrawn by `store retire`"
                 ) -> IngestReport:
    """Withdraw the files at ``paths`` (and their current rejects) in one commit: their spectra stay in the store's
    history but leave inference and the release. Paths not in the store are reported as rejected (not found).
    :class:`StoreWriteError` when the store cannot be written (nothing is then committed)."""
    started = time.perf_counter()
    wanted = [str(Path(path).expanduser().absolute()) for path in paths]
    report = IngestReport(store=str(store.path), files_given=len(wanted))
    try:
        writer = store.writer()
        run = _Run(writer, "auto", _utc_now(), report, retry_rejects=False)
        found = run.retire_paths(set(wanted), why)
        report.rejected = [(path, "not in the store") for path in wanted if path not in found]
        run._write_ledgers()
        if writer.has_changes:
            report.snapshot_id = writer.commit(f"retire {len(report.retired)} files", {"software_version": __version__})
    except (icechunk.IcechunkError, OSError) as error:
        raise _write_failed(store, error) from error
    report.seconds = time.perf_counter() - started
    return report


def recorded_inputs(path: str | Path) -> list[str]:
    """Every file path recorded in a store of any layout version (its files ledger and rejects), in order: what
    ``store upgrade`` ingests again."""
    storage = icechunk.local_filesystem_storage(str(Path(path).expanduser().resolve()))
    if not icechunk.Repository.exists(storage):
        raise StoreError(f"no spectrum store at {path}")
    zstore = icechunk.Repository.open(storage).readonly_session(branch="main").store
    paths: dict[str, None] = {}
    for group in (FILES_GROUP, REJECTS_GROUP):
        if group_length(zstore, group, FILE_DIM if group == FILES_GROUP else REJECT_DIM):
            paths.update(dict.fromkeys(str(p) for p in read_arrays(zstore, group, ["file_path"])["file_path"]))
    return list(paths)
