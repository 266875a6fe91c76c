"""The one release writer: astropy ``Table`` (units, descriptions, header cards in ``meta``) → gzipped FITS + Parquet,
partitioned Parquet tables, one FITS table streamed from a partitioned table in bounded memory, and
:class:`ReleaseTransaction`, which publishes every file of a release at once (staging folder, commit record, moves,
``manifest.json`` last) so that a killed process or a full disk never leaves a mix of two releases.

Layout of a release folder ``OUT``::

    OUT/manifest.json               every file of the release: size, sha256, rows, the commit that wrote it
    OUT/<any>/<stem>.fits.gz        one binary-table HDU; header cards from Table.meta
    OUT/<any>/<stem>.parquet        same rows; units, descriptions and cards in the schema metadata
    OUT/<any>/<stem>/part-<key>.parquet   a partitioned table (parts in key order)
    OUT/.release-staging/           a transaction in progress (COMMIT.json inside once it is committed)
    OUT/.release.lock               one transaction at a time
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy import units as u
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table

from catalogbuilder import __version__
from catalogbuilder.files import ExclusiveLock, WriteError, fsync_dir, write_durably, write_error

log = logging.getLogger(__name__)

# Parquet schema metadata keys (JSON values)
META_CARDS = "catalogbuilder"  # header cards, keyword -> value
META_COMMENTS = "header_comments"  # keyword -> comment
META_UNITS = "units"  # column -> unit string
META_DESCRIPTIONS = "descriptions"  # column -> description
META_NULLABLE = "nullable"  # integer columns that may be null (TNULL in FITS)

FITS_BLOCK = 2880  # bytes; headers and data units are padded to a multiple
BATCH_ROWS = 8_192  # rows per record batch streamed into a FITS file (its memory grows with this, not the table)
ROW_GROUP_ROWS = 32_768  # Parquet row groups, so a streaming reader holds one small group at a time
GZIP_LEVEL = 6  # zlib level of the FITS files: level 9 costs ~2x the time for ~3 % smaller files

MANIFEST_NAME = "manifest.json"
STAGING_NAME = ".release-staging"
COMMIT_NAME = "COMMIT.json"
LOCK_NAME = ".release.lock"
MANIFEST_FORMAT = "catalogbuilder-release/1"
PART_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class ReleaseWriteError(WriteError):
    """A release could not be written or published (full disk, I/O error); the message is one line and says whether
    the previous release is unchanged."""


# --- Table <-> Arrow --------------------------------------------------------------------------------------------

Card = tuple[str, object, str]  # FITS header card: keyword, value, comment


def meta_cards(meta: Mapping[str, object]) -> list[Card]:
    """Header cards of a ``Table.meta``: keyword → value or (value, comment)."""
    return [(key, *value) if isinstance(value, tuple) else (key, value, "") for key, value in meta.items()]


def unit_string(unit: u.UnitBase | str | None) -> str:
    """A unit as written in TUNIT and the Parquet metadata: FITS notation where the FITS standard has the unit."""
    if unit is None or unit == "":
        return ""
    unit = u.Unit(unit)
    try:
        return unit.to_string("fits")
    except ValueError:
        return unit.to_string()


def is_fits_unit(unit: str) -> bool:
    """Whether the FITS standard knows ``unit`` (``dex`` is not)."""
    try:
        u.Unit(unit).to_string("fits")
    except ValueError:
        return False
    return True


def _arrow_type(column: Column) -> pa.DataType:
    kind = column.dtype.kind
    if kind in "UOS":
        return pa.string()
    if kind == "b":
        return pa.bool_()
    if kind in "iu":
        return pa.int64()
    if kind == "f":
        return pa.float64()
    raise ValueError(f"column {column.name!r} has dtype {column.dtype}; the release writer takes str, float, int and bool")


def table_to_arrow(table: Table) -> pa.Table:
    """An Arrow table of ``table``: str → string, int → int64 (masked → null), float → float64, bool; its units,
    descriptions, nullable integer columns and header cards in the schema metadata (pandas reads it back typed)."""
    schema = pa.schema([pa.field(name, _arrow_type(table[name])) for name in table.colnames])
    arrow = pa.Table.from_pandas(table.to_pandas(), schema=schema, preserve_index=False)
    cards = meta_cards(table.meta)
    metadata = {
        META_CARDS: {key: value for key, value, _ in cards},
        META_COMMENTS: {key: comment for key, _, comment in cards if comment},
        META_UNITS: {name: unit_string(table[name].unit) for name in table.colnames if table[name].unit is not None},
        META_DESCRIPTIONS: {name: table[name].description for name in table.colnames if table[name].description},
        META_NULLABLE: [name for name in table.colnames if isinstance(table[name], MaskedColumn) and table[name].dtype.kind in "iu"],
    }
    encoded = {key.encode(): json.dumps(value).encode() for key, value in metadata.items()}
    return arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **encoded})


def _schema_meta(schema: pa.Schema, key: str, default: object) -> object:
    raw = (schema.metadata or {}).get(key.encode())
    return json.loads(raw) if raw is not None else default


def write_parquet(table: Table, path: str | Path) -> Path:
    """Write ``table`` as one Parquet file (row groups of :data:`ROW_GROUP_ROWS`)."""
    pq.write_table(table_to_arrow(table), path, row_group_size=ROW_GROUP_ROWS)
    return Path(path)


# --- FITS, streamed ------------------------------------------------------------------------------------------------

def fits_text(text: str) -> str:
    """``text`` as FITS can hold it (ASCII): other characters as Python escapes (``Å`` → ``\\xc5``)."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _fits_length(column: pa.Array | pa.ChunkedArray) -> int:
    """Longest entry of a string column once written to FITS (escapes included)."""
    longest = pc.max(pc.utf8_length(column)).as_py() or 0
    ascii_only = pc.string_is_ascii(column)
    if pc.all(ascii_only).as_py() is False:
        escaped = column.filter(pc.invert(ascii_only)).to_pylist()
        longest = max(longest, *(len(fits_text(text)) for text in escaped))
    return longest


def _fits_card(key: str, value: object, comment: str) -> fits.Card:
    """A header card; the comment is left out when it would not fit beside the value (long values use CONTINUE)."""
    fits_width = 80 - 10 - 3  # after "KEYWORD = " and " / "
    return fits.Card(key, value, comment if len(repr(value)) + len(comment) <= fits_width - 2 else "")


def _table_header(schema: pa.Schema, widths: Mapping[str, int], nrows: int, extname: str,
                  cards: Sequence[Card]) -> tuple[fits.Header, np.dtype, dict[str, int]]:
    """Header of the binary-table HDU (computed by astropy from an empty table of the final column types), the
    big-endian record dtype of its rows, and the TNULL value of each nullable integer column."""
    nullable = set(_schema_meta(schema, META_NULLABLE, []))
    units = _schema_meta(schema, META_UNITS, {})
    descriptions = _schema_meta(schema, META_DESCRIPTIONS, {})
    template = Table()
    for field in schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            template[field.name] = np.zeros(0, dtype=f"U{widths[field.name]}")
        elif pa.types.is_integer(field.type) and field.name in nullable:
            template[field.name] = MaskedColumn(np.zeros(0, np.int64), mask=np.zeros(0, bool))
        elif pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_boolean(field.type):
            template[field.name] = np.zeros(0, dtype=field.type.to_pandas_dtype())
        else:
            raise ValueError(f"column {field.name!r} has type {field.type}; the release writer takes str, float, int and bool")
    hdu = fits.BinTableHDU(template, name=extname)
    header = hdu.header
    for index, name in enumerate(template.colnames, start=1):
        unit, text = units.get(name, ""), descriptions.get(name, "")
        if unit and not is_fits_unit(unit):  # e.g. dex: said in the column comment instead
            text = f"[{unit}] {text}"
        elif unit:
            header[f"TUNIT{index}"] = unit
        if text:
            header[f"TCOMM{index}"] = text
    for card in cards:
        header.append(_fits_card(*card))
    header["NAXIS2"] = nrows
    dtype = np.dtype([(name, kind.newbyteorder(">") if kind.kind in "iuf" else kind)
                      for name, (kind, _) in hdu.columns.dtype.fields.items()])
    nulls = {column.name: int(column.null) for column in hdu.columns if column.null is not None}
    return header, dtype, nulls


def _records(batch: pa.RecordBatch, dtype: np.dtype, nulls: Mapping[str, int]) -> bytes:
    """The FITS bytes of a batch of rows: big-endian numbers, T/F logicals, NUL-padded ASCII strings."""
    records = np.zeros(batch.num_rows, dtype=dtype)
    for name in dtype.names:
        column = batch.column(name)
        if dtype[name].kind == "S":
            column = column.fill_null("")
            values = column.to_numpy(zero_copy_only=False)
            if pc.all(pc.string_is_ascii(column)).as_py() is False:
                values = np.array([fits_text(text) for text in values], dtype=object)
            records[name] = values
        elif pa.types.is_boolean(column.type):
            records[name] = np.where(column.fill_null(False).to_numpy(zero_copy_only=False), ord("T"), ord("F"))
        elif dtype[name].kind in "iu":
            records[name] = column.fill_null(nulls.get(name, 0)).to_numpy(zero_copy_only=False)
        else:
            records[name] = column.to_numpy(zero_copy_only=False)  # null → NaN
    return records.tobytes()


BatchSource = Callable[[Sequence[str] | None], Iterable[pa.RecordBatch]]  # columns (None: all) → batches in row order


def _stream_fits(schema: pa.Schema, batches: BatchSource, nrows: int, path: str | Path, extname: str,
                 meta: Mapping[str, object] | None, primary_keys: Sequence[str], compresslevel: int) -> int:
    """Two passes over ``batches``: the string columns for their FITS widths, then every column, encoded and gzipped
    batch by batch; the data unit is padded to 2880 bytes. Returns the rows written."""
    string_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    widths = dict.fromkeys(string_columns, 1)
    if string_columns:
        for batch in batches(string_columns):
            for name in string_columns:
                widths[name] = max(widths[name], _fits_length(batch.column(name)))
    comments = _schema_meta(schema, META_COMMENTS, {})
    cards = {key: (value, comments.get(key, "")) for key, value in _schema_meta(schema, META_CARDS, {}).items()}
    cards.update({key: value if isinstance(value, tuple) else (value, "") for key, value in (meta or {}).items()})
    card_list = meta_cards(cards)
    header, dtype, nulls = _table_header(schema, widths, nrows, extname, card_list)
    primary = fits.PrimaryHDU()
    for key, value, comment in card_list:
        if key in primary_keys:
            primary.header.append(_fits_card(key, value, comment))
    written = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0) as stream:
        stream.write(primary.header.tostring().encode("ascii"))
        stream.write(header.tostring().encode("ascii"))
        for batch in batches(None):
            stream.write(_records(batch, dtype, nulls))
            written += batch.num_rows
        stream.write(b"\0" * (-written * dtype.itemsize % FITS_BLOCK))
    if written != nrows:
        raise ValueError(f"{path}: {written} rows read while writing, {nrows} expected (did the input change?)")
    return written


def write_fits(table: Table, path: str | Path, extname: str, primary_keys: Sequence[str] = (),
               compresslevel: int = GZIP_LEVEL) -> Path:
    """Write ``table`` as a gzipped FITS file: an empty primary HDU (with the ``primary_keys`` cards of ``meta``)
    and one binary-table HDU ``extname`` with fixed-width ASCII strings (non-ASCII escaped, see :func:`fits_text`),
    TUNITn (FITS units) and TCOMMn (descriptions; ``[unit]`` first for units FITS lacks), TNULL for masked integers,
    and the ``meta`` cards."""
    arrow = table_to_arrow(table)

    def batches(columns: Sequence[str] | None) -> Iterable[pa.RecordBatch]:
        return (arrow.select(list(columns)) if columns is not None else arrow).to_batches(max_chunksize=BATCH_ROWS)

    _stream_fits(arrow.schema, batches, arrow.num_rows, path, extname, None, primary_keys, compresslevel)
    return Path(path)


def parquet_schema(files: Sequence[str | Path]) -> pa.Schema:
    """The common schema (with the first file's metadata) of Parquet files; ``ValueError`` when their columns differ."""
    if not files:
        raise ValueError("no Parquet files given")
    schemas = [pq.read_schema(path) for path in files]
    for path, schema in zip(files, schemas):
        if not schema.remove_metadata().equals(schemas[0].remove_metadata()):
            raise ValueError(f"{path}: columns differ from {files[0]}: {schema.remove_metadata()} vs {schemas[0].remove_metadata()}")
    return schemas[0]


def parquet_rows(files: Sequence[str | Path]) -> int:
    """Total rows of Parquet files, from their footers."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def write_fits_from_parquet(files: Sequence[str | Path], path: str | Path, extname: str,
                            meta: Mapping[str, object] | None = None, primary_keys: Sequence[str] = (),
                            batch_rows: int = BATCH_ROWS, compresslevel: int = GZIP_LEVEL) -> int:
    """Write the rows of Parquet ``files`` (in the given order, e.g. the parts of a partitioned table) as one gzipped
    FITS table, as :func:`write_fits` would, in memory that does not grow with the rows: one pass over the string
    columns for their widths, one pass that encodes ``batch_rows`` rows at a time. Units, descriptions and header cards
    come from the first file's metadata, cards of ``meta`` (keyword → value or (value, comment)) added or replaced.
    Returns the rows written."""
    files = [Path(file) for file in files]
    schema = parquet_schema(files)

    def batches(columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        for file in files:
            with pq.ParquetFile(file) as reader:
                yield from reader.iter_batches(batch_size=batch_rows, columns=None if columns is None else list(columns))

    return _stream_fits(schema, batches, parquet_rows(files), path, extname, meta, primary_keys, compresslevel)


# --- partitioned Parquet tables ------------------------------------------------------------------------------------

def part_name(key: str) -> str:
    """File name of a part: ``part-<key>.parquet``; keys are letters, digits and ``_.+=-`` (parts are read in key
    order as strings, so zero-pad numeric keys)."""
    if not PART_KEY.match(key):
        raise ValueError(f"partition key {key!r}: use letters, digits and _.+=- (not starting with a symbol)")
    return f"part-{key}.parquet"


def partition_files(folder: str | Path) -> list[Path]:
    """The parts of a published partitioned table, in key order (empty when the folder does not exist)."""
    folder = Path(folder)
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


# --- atomic publication ----------------------------------------------------------------------------------------------

def _publish_error(error: OSError, what: str, consequence: str) -> ReleaseWriteError:
    written = write_error(error, what, consequence)
    return ReleaseWriteError(written.message, written.strerror, written.errno)


def _describe_file(path: Path) -> dict[str, object]:
    """Size, SHA-256 and rows (Parquet, FITS tables; None otherwise) of a staged file, fsynced on the way."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(handle.fileno())
    rows = None
    if path.suffix == ".parquet":
        rows = pq.ParquetFile(path).metadata.num_rows
    elif path.name.endswith((".fits", ".fits.gz")):
        with contextlib.suppress(IndexError, OSError, KeyError):
            rows = int(fits.getheader(path, 1)["NAXIS2"])
    return {"size": path.stat().st_size, "sha256": digest.hexdigest(), "rows": rows}


def _move(source: Path, target: Path) -> None:
    """Move a committed file into place (nothing to do when an earlier, interrupted roll-forward moved it)."""
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    elif not target.exists():
        raise ReleaseWriteError(f"{target}: committed file missing from the staging folder and from the release")


def _roll_forward(out_dir: Path) -> None:
    """Finish a committed transaction (lock held): move its files into place, delete what it deleted, then move its
    ``manifest.json`` in and remove the staging folder. Idempotent, so a kill -9 here is finished by the next call."""
    staging = out_dir / STAGING_NAME
    record = json.loads((staging / COMMIT_NAME).read_text())
    for relative in record["moves"]:
        _move(staging / relative, out_dir / relative)
    for relative in record["deletions"]:
        (out_dir / relative).unlink(missing_ok=True)
    _move(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    fsync_dir(out_dir)
    shutil.rmtree(staging)


def _recover_locked(out_dir: Path) -> bool:
    """With the lock held: roll a committed transaction forward, discard an uncommitted one. True when rolled forward."""
    staging = out_dir / STAGING_NAME
    if (staging / COMMIT_NAME).is_file():
        log.warning("%s: completing a release committed by a process that stopped while publishing it", out_dir)
        _roll_forward(out_dir)
        return True
    if staging.exists():
        log.warning("%s: discarding an unfinished release left by a stopped process", out_dir)
        shutil.rmtree(staging)
    return False


def recover(out_dir: str | Path) -> dict | None:
    """Bring a release folder to a consistent state (waits for a running transaction): a committed but unpublished
    transaction is rolled forward, an uncommitted one discarded. Returns the manifest (None when there is none)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    with ExclusiveLock(out_dir / LOCK_NAME):
        _recover_locked(out_dir)
    return _load_manifest(out_dir)


def _load_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of the published release in ``out_dir`` (None when there is none). When a transaction has been
    committed but not yet published (a writer is moving files, or was killed doing so) it is completed first, so the
    files the manifest lists are the files on disk."""
    out_dir = Path(out_dir)
    if (out_dir / STAGING_NAME / COMMIT_NAME).is_file():
        return recover(out_dir)
    return _load_manifest(out_dir)


def verify_release(out_dir: str | Path, checksums: bool = True) -> list[str]:
    """Problems of a published release (empty when every file of its manifest is there with its size and, with
    ``checksums``, its SHA-256)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        return [f"{out_dir}: no {MANIFEST_NAME}"]
    problems = []
    for relative, entry in manifest["files"].items():
        path = out_dir / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{relative}: {path.stat().st_size} bytes, manifest says {entry['size']}")
        elif checksums and _describe_file(path)["sha256"] != entry["sha256"]:
            problems.append(f"{relative}: SHA-256 differs from the manifest")
    return problems


class ReleaseTransaction:
    """Publish files into a release folder all at once.

    ::

        with ReleaseTransaction(out_dir) as release:
            write_table(table, release, "apogee/m/allStar-m-apogee", "ALLSTAR")  # or write to release.path(name)
            release.delete("old/table.parquet")
            release.commit({"store_snapshot": snapshot_id})

    New and replaced files are written under ``out_dir/.release-staging/``; :meth:`commit` checksums them, stages the
    new ``manifest.json`` (the previous release's files, minus deletions, plus the new ones), then writes
    ``COMMIT.json`` — the commit point — and moves the files into place, deletes, moves ``manifest.json`` last and
    removes the staging folder. A process killed before the commit point leaves the previous release untouched (its
    staging is discarded by the next transaction or :func:`recover`); one killed after it is rolled forward by them.
    Leaving the ``with`` block without :meth:`commit` (or with an error) discards the staging; an OS error (e.g. a
    full disk) becomes a one-line :class:`ReleaseWriteError`. Transactions on a folder run one at a time (file lock).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"{self.out_dir} is a file, not a folder")
        self.staging = self.out_dir / STAGING_NAME
        self._lock = ExclusiveLock(self.out_dir / LOCK_NAME)
        self._staged: dict[str, Path] = {}
        self._deleted: set[str] = set()
        self._open = False

    def __enter__(self) -> ReleaseTransaction:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as error:
            raise _publish_error(error, f"the release in {self.out_dir}", "nothing was changed") from error
        try:
            _recover_locked(self.out_dir)
            self.staging.mkdir()
        except BaseException:
            self._lock.release()
            raise
        self._open = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        if not self._open:
            return
        if error is None:
            log.warning("%s: transaction left without commit(); nothing published", self.out_dir)
        self.abort()
        if isinstance(error, OSError):
            raise _publish_error(error, f"the release in {self.out_dir}", "the previous release is unchanged") from error

    def _relative(self, relative: str | Path) -> str:
        """``relative`` as a normalised POSIX path inside the release; ``ValueError`` for one outside it or hidden."""
        path = PurePosixPath(Path(relative).as_posix())
        if path.is_absolute() or not path.parts or any(part in ("..", ".") or part.startswith(".") for part in path.parts):
            raise ValueError(f"{relative!s}: not a visible path inside the release folder")
        if str(path) in (MANIFEST_NAME, COMMIT_NAME):
            raise ValueError(f"{relative!s} is written by the transaction itself")
        return str(path)

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("the transaction is not open (use it in a with block, before commit)")

    def path(self, relative: str | Path) -> Path:
        """Where to write the file that ``out_dir/relative`` will be after the commit (parent folders created)."""
        self._require_open()
        relative = self._relative(relative)
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._staged[relative] = target
        self._deleted.discard(relative)
        return target

    def final_path(self, relative: str | Path) -> Path:
        """Where ``relative`` is once published."""
        return self.out_dir / self._relative(relative)

    def delete(self, relative: str | Path) -> None:
        """Remove ``out_dir/relative`` from the release at the commit (a file staged under that name is dropped)."""
        self._require_open()
        relative = self._relative(relative)
        staged = self._staged.pop(relative, None)
        if staged is not None:
            staged.unlink(missing_ok=True)
        self._deleted.add(relative)

    def partitions(self, folder: str | Path) -> list[Path]:
        """The parts of the partitioned table ``out_dir/folder`` as the release will hold them after the commit, in
        key order: published parts not replaced or deleted, and the staged ones (feed them to
        :func:`write_fits_from_parquet`)."""
        folder = self._relative(folder)
        parts = {path.name: path for path in partition_files(self.out_dir / folder)
                 if f"{folder}/{path.name}" not in self._deleted}
        parts.update({PurePosixPath(relative).name: path for relative, path in self._staged.items()
                      if str(PurePosixPath(relative).parent) == folder and re.fullmatch(r"part-.+\.parquet", PurePosixPath(relative).name)})
        return [parts[name] for name in sorted(parts)]

    def commit(self, provenance: Mapping[str, object] | None = None) -> dict:
        """Publish: checksum the staged files, record the commit, move everything into place (see the class docs).
        ``provenance`` (JSON-able: store snapshot id, catalogs, ...) is recorded in the manifest with this software
        version. Returns the new manifest."""
        self._require_open()
        try:
            unwritten = sorted(relative for relative, path in self._staged.items() if not path.is_file())
            if unwritten:
                raise ValueError(f"staged but never written: {', '.join(unwritten)}")
            manifest = self._manifest(provenance)
            write_durably(self.staging / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
            record = {"moves": sorted(self._staged), "deletions": sorted(self._deleted)}
            write_durably(self.staging / COMMIT_NAME, json.dumps(record) + "\n")  # the commit point
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError):
                raise _publish_error(error, f"the release in {self.out_dir}", "the previous release is unchanged") from error
            raise
        self._open = False
        try:
            _roll_forward(self.out_dir)
        except OSError as error:
            raise _publish_error(error, f"the release in {self.out_dir}", "it is committed and the next transaction "
                                 "or recover() completes it") from error
        finally:
            self._lock.release()
        return manifest

    def _manifest(self, provenance: Mapping[str, object] | None) -> dict:
        """The manifest after this transaction: previous files minus deletions plus the staged ones."""
        previous = _load_manifest(self.out_dir) or {"commits": {}, "files": {}}
        commit_id = uuid.uuid4().hex
        files = {relative: entry for relative, entry in previous["files"].items() if relative not in self._deleted}
        files.update({relative: {**_describe_file(path), "commit": commit_id} for relative, path in self._staged.items()})
        commits = {**previous["commits"], commit_id: {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "software_version": __version__,
            "provenance": dict(provenance or {}),
        }}
        referenced = {entry["commit"] for entry in files.values()} | {commit_id}
        return {"format": MANIFEST_FORMAT, "commit": commit_id,
                "commits": {key: value for key, value in commits.items() if key in referenced},
                "files": dict(sorted(files.items()))}

    def abort(self) -> None:
        """Discard everything staged and release the lock; the published release stays as it was."""
        if not self._open:
            return
        self._open = False
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._lock.release()


def write_table(table: Table, release: ReleaseTransaction, stem: str, extname: str,
                primary_keys: Sequence[str] = ()) -> tuple[Path, Path]:
    """Stage ``<stem>.fits.gz`` (:func:`write_fits`) and ``<stem>.parquet`` (:func:`write_parquet`) of ``table`` in
    ``release``; returns where both will be once committed."""
    fits_name, parquet_name = f"{stem}.fits.gz", f"{stem}.parquet"
    write_fits(table, release.path(fits_name), extname, primary_keys)
    write_parquet(table, release.path(parquet_name))
    return release.final_path(fits_name), release.final_path(parquet_name)


def write_partitions(release: ReleaseTransaction, folder: str | Path, parts: Mapping[str, Table],
                     delete: Iterable[str] = ()) -> list[Path]:
    """Stage parts of the partitioned table ``folder`` (``part-<key>.parquet``, added or replaced) and delete the
    parts of the ``delete`` keys; other parts stay as published. Returns the staged paths' final locations."""
    for key in delete:
        release.delete(PurePosixPath(Path(folder).as_posix()) / part_name(key))
    written = []
    for key, table in parts.items():
        relative = PurePosixPath(Path(folder).as_posix()) / part_name(key)
        write_parquet(table, release.path(relative))
        written.append(release.final_path(relative))
    return written
