"""Model weights in the official SDSS format: a ``torch.save``d state_dict split byte-wise into ``model_chunk_0..9``.

Reading concatenates the chunks in order (or takes one ``.pt``/``.pth`` file) and ``torch.load``s the bytes with
``weights_only=True``. Writing produces the same layout (parts 0–8 hold size//10 bytes, part 9 the rest), so a model
trained here loads exactly like the official weights. The SHA-256 of the concatenated bytes is the model's
``weights_sha256`` (the provenance key of every result).
"""
from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from catalogbuilder.files import atomic_write

N_CHUNKS: int = 10
HASH_BLOCK_BYTES: int = 8 << 20  # read size while hashing weight files
CHUNK_PREFIX: str = "model_chunk_"
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".pt", ".pth")


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


def read_weight_bytes(path: str | Path) -> bytes:
    """The serialised state_dict: the chunks concatenated in order, or the single file's bytes."""
    return b"".join(part.read_bytes() for part in find_weights(path))


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of serialised weights (the model's ``weights_sha256``)."""
    return hashlib.sha256(data).hexdigest()


def files_sha256(paths: Sequence[str | Path]) -> str:
    """Hex SHA-256 of the files' bytes concatenated in order, read in blocks (no torch, no whole-file copy).

    Cached per (path, size, modification time) of every file — plus inode and change time, so a file replaced within
    the file system's time resolution (``save_state_dict`` renames new files into place) is hashed again — so planning
    a run on weights already hashed in this process costs a few ``stat`` calls."""
    identities = tuple(_file_identity(Path(path)) for path in paths)
    checksum = _known_sha256(identities)
    if checksum is None:
        digest = hashlib.sha256()
        for identity in identities:
            with open(identity[0], "rb") as handle:
                while block := handle.read(HASH_BLOCK_BYTES):
                    digest.update(block)
        checksum = _remember_sha256(identities, digest.hexdigest())
    return checksum


def _file_identity(path: Path) -> tuple[str, int, int, int, int]:
    """(resolved path, size, mtime ns, inode, ctime ns): changes whenever the file's bytes may have changed."""
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns


_HASHES: dict[tuple[tuple[str, int, int, int, int], ...], str] = {}  # file identities → sha256, oldest first
_HASHES_LOCK = threading.Lock()
MAX_KNOWN_HASHES = 64


def _known_sha256(identities: tuple[tuple[str, int, int, int, int], ...]) -> str | None:
    with _HASHES_LOCK:
        return _HASHES.get(identities)


def _remember_sha256(identities: tuple[tuple[str, int, int, int, int], ...], checksum: str) -> str:
    with _HASHES_LOCK:
        _HASHES[identities] = checksum
        while len(_HASHES) > MAX_KNOWN_HASHES:
            del _HASHES[next(iter(_HASHES))]
    return checksum


def weights_sha256(path: str | Path) -> str:
    """The ``weights_sha256`` of a weights file or model directory, without loading the weights (see
    :func:`files_sha256`); equal to the checksum :func:`load_state_dict` returns."""
    return files_sha256(find_weights(path))


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """Load weights (chunked directory or single file) with ``weights_only=True``; returns (state_dict, sha256).

    The checksum is this process's :func:`files_sha256` of the files when they are unchanged from before the read to
    after it and were hashed already (a run plans on it, then its in-process workers load: 0.24 s of SHA-256 for a
    full-size APOGEE Net III), else the SHA-256 of the bytes read."""
    files = find_weights(path)
    before = tuple(_file_identity(part) for part in files)
    data = read_weight_bytes(path)
    unchanged = tuple(_file_identity(part) for part in files) == before
    checksum = (_known_sha256(before) if unchanged else None) or bytes_sha256(data)
    if unchanged:
        _remember_sha256(before, checksum)
    try:
        state_dict = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-weights files
        raise WeightsError(f"{path}: not a loadable torch state_dict ({type(error).__name__}: "
                           f"{_torch_reason(error)})") from error
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: expected a state_dict mapping, got {type(state_dict).__name__}")
    return state_dict, checksum


def _torch_reason(error: Exception) -> str:
    """torch's reason for refusing bytes, in one line and without its advice to load them with ``weights_only=False``
    (never done here: that would run code from the file)."""
    paragraphs = [" ".join(text.split()) for text in str(error).split("\n\n") if text.strip()]
    if len(paragraphs) > 2 and paragraphs[0].startswith("Weights only load failed"):
        paragraphs = paragraphs[1:-1]
    return " ".join(paragraphs)


def split_bytes(data: bytes, parts: int = N_CHUNKS) -> list[bytes]:
    """Split bytes like the reference ``chop_model.py``: parts 0..n-2 hold len//n bytes, the last one the rest."""
    size = len(data) // parts
    return [data[index * size:(index + 1) * size] for index in range(parts - 1)] + [data[(parts - 1) * size:]]


def save_state_dict(state_dict: dict[str, torch.Tensor], directory: str | Path) -> str:
    """Write a state_dict as ``model_chunk_0..9`` into ``directory`` (created if needed); returns its sha256.

    Each chunk is written to a temporary file and renamed, so a reader never sees a half-written chunk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in state_dict.items()}, buffer)
    data = buffer.getvalue()
    for chunk_path, part in zip(chunk_paths(directory), split_bytes(data)):
        with atomic_write(chunk_path) as temporary:
            temporary.write_bytes(part)
    return bytes_sha256(data)
