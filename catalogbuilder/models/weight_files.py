"""The files of model weights in the official SDSS format, without torch: finding them, their checksum, reading them.

A ``torch.save``d state_dict is split byte-wise into ``model_chunk_0..9`` (or kept as one ``.pt``/``.pth`` file); the
SHA-256 of the concatenated bytes is the model's ``weights_sha256`` (the provenance key of every result). Loading and
saving state dicts is :mod:`catalogbuilder.models.weights`; this module imports no torch, so a command can start
hashing a model's weights (:func:`hash_in_background`) while it is still importing torch.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import io
import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path

N_CHUNKS: int = 10
HASH_BLOCK_BYTES: int = 8 << 20  # read size while hashing weight files
CHUNK_PREFIX: str = "model_chunk_"
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".pt", ".pth")

FileIdentity = tuple[str, int, int, int, int]  # (resolved path, size, mtime ns, inode, ctime ns)


class WeightsError(ValueError):
    """Weights that cannot be found or read (or are refused: not a plain state_dict); the message says which file and
    why. A ``ValueError``, so every command reports it as a usage error (one line, exit 2)."""


def chunk_paths(directory: str | Path) -> list[Path]:
    """The ``model_chunk_0..9`` paths of a model directory, in concatenation order."""
    return [Path(directory) / f"{CHUNK_PREFIX}{index}" for index in range(N_CHUNKS)]


def find_weights(path: str | Path) -> list[Path]:
    """The file(s) whose concatenated bytes are the serialised state_dict.

    ``path`` is a ``.pt``/``.pth`` file, or a directory holding ``model_chunk_0..9`` (preferred) or exactly one
    ``.pt``/``.pth`` file. Raises :class:`WeightsError` when chunks are missing or the choice is ambiguous.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such weights file or model directory")
    chunks = chunk_paths(path)
    present = [chunk.exists() for chunk in chunks]
    if all(present):
        return chunks
    if any(present):
        missing = [chunk.name for chunk, exists in zip(chunks, present) if not exists]
        raise WeightsError(f"{path}: incomplete chunked weights, missing {missing}")
    singles = sorted(p for p in path.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES and p.is_file())
    if len(singles) != 1:
        raise WeightsError(f"{path}: expected {CHUNK_PREFIX}0..{N_CHUNKS - 1} or exactly one .pt/.pth file, "
                           f"found {[p.name for p in singles] or 'none'}")
    return singles


class ConcatenatedFiles(io.RawIOBase):
    """The files' bytes concatenated in order, as one read-only, seekable binary file that reads straight from the
    files into the caller's buffer (``readinto``): ``torch.load`` reads each tensor's bytes from the page cache into
    the tensor, with no copy of the whole concatenation in between (full-size APOGEE Net III, 277 MB of tensors:
    0.48 → 0.18 s to the loaded state_dict, peak memory 555 → 278 MB). Use it as a context manager (it closes its
    files)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        super().__init__()
        self._files: list[io.FileIO] = []
        try:
            for path in paths:
                self._files.append(io.FileIO(path, "r"))
        except OSError:
            self.close()
            raise
        self._ends = list(itertools.accumulate(os.fstat(handle.fileno()).st_size for handle in self._files))
        self._position = 0

    @property
    def size(self) -> int:
        """Bytes of all files together."""
        return self._ends[-1] if self._ends else 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")  # as io.BytesIO: a corrupt file
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the current position across file boundaries (short only at the end of the last)."""
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target) and self._position < self.size:
            index = bisect.bisect_right(self._ends, self._position)  # the file holding the position
            start = self._ends[index - 1] if index else 0
            wanted = min(len(target) - done, self._ends[index] - self._position)
            got = os.preadv(self._files[index].fileno(), [target[done:done + wanted]], self._position - start)
            if got == 0:  # the file shrank since it was opened
                raise WeightsError(f"{self._files[index].name}: shorter than when it was opened (changed while read)")
            done += got
            self._position += got
        return done

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


def files_sha256(paths: Sequence[str | Path]) -> str:
    """Hex SHA-256 of the files' bytes concatenated in order, read in blocks (no torch, no whole-file copy).

    Cached per (path, size, modification time) of every file — plus inode and change time, so a file replaced within
    the file system's time resolution (``save_state_dict`` renames new files into place) is hashed again — so planning
    a run on weights already hashed in this process costs a few ``stat`` calls. A thread asking for files another
    thread is hashing (:func:`hash_in_background`) waits for that result instead of hashing them again."""
    identities = tuple(file_identity(Path(path)) for path in paths)
    with _HASHES_LOCK:
        known = _HASHES.get(identities)
        if known is not None:
            return known
        pending = _HASHING.get(identities)
        hashing_here = pending is None
        if hashing_here:
            pending = _HASHING[identities] = concurrent.futures.Future()
    if not hashing_here:
        return pending.result()
    try:
        digest = hashlib.sha256()
        for identity in identities:
            with open(identity[0], "rb", buffering=0) as handle:
                while block := handle.read(HASH_BLOCK_BYTES):
                    digest.update(block)  # releases the GIL: other threads go on meanwhile
        checksum = remember_sha256(identities, digest.hexdigest())
    except BaseException as error:
        pending.set_exception(error)
        raise
    finally:
        with _HASHES_LOCK:
            del _HASHING[identities]
    pending.set_result(checksum)
    return checksum


def file_identity(path: Path) -> FileIdentity:
    """(resolved path, size, mtime ns, inode, ctime ns): changes whenever the file's bytes may have changed."""
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns


_HASHES: dict[tuple[FileIdentity, ...], str] = {}  # file identities → sha256, oldest first
_HASHING: dict[tuple[FileIdentity, ...], concurrent.futures.Future] = {}  # being hashed by a thread now
_HASHES_LOCK = threading.Lock()
MAX_KNOWN_HASHES = 64


def known_sha256(identities: tuple[FileIdentity, ...]) -> str | None:
    """The checksum of files with these identities, when this process has hashed them (None otherwise)."""
    with _HASHES_LOCK:
        return _HASHES.get(identities)


def remember_sha256(identities: tuple[FileIdentity, ...], checksum: str) -> str:
    """Record the checksum of files with these identities (the oldest of more than :data:`MAX_KNOWN_HASHES` go)."""
    with _HASHES_LOCK:
        _HASHES[identities] = checksum
        while len(_HASHES) > MAX_KNOWN_HASHES:
            del _HASHES[next(iter(_HASHES))]
    return checksum


def weights_sha256(path: str | Path) -> str:
    """The ``weights_sha256`` of a weights file or model directory, without loading the weights (see
    :func:`files_sha256`); equal to the checksum ``load_state_dict`` returns."""
    return files_sha256(find_weights(path))


def hash_in_background(path: str | Path) -> None:
    """Start hashing the weights of a weights file or model directory in a daemon thread, so that the
    :func:`weights_sha256` a command needs later is ready or under way: SHA-256 and file reads release the GIL, so on a
    second core it overlaps the command's imports (full-size APOGEE Net III: 0.4 s). Errors are left to that later call
    to report; nothing is started for a path that is not a model's weights."""
    try:
        paths = find_weights(path)
    except (OSError, WeightsError):
        return
    threading.Thread(target=_hash_quietly, args=(paths,), name="catalogbuilder-weights-sha256", daemon=True).start()


def _hash_quietly(paths: list[Path]) -> None:
    try:
        files_sha256(paths)
    except OSError:  # reported by the command's own call, which hashes again
        pass
