"""Model weights in the official SDSS format: a ``torch.save``d state_dict split byte-wise into ``model_chunk_0..9``.

Reading concatenates the chunks in order (or takes one ``.pt``/``.pth`` file) and ``torch.load``s the bytes with
``weights_only=True``. Writing produces the same layout (parts 0–8 hold size//10 bytes, part 9 the rest), so a model
trained here loads exactly like the official weights. The SHA-256 of the concatenated bytes is the model's
``weights_sha256`` (the provenance key of every result).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch

N_CHUNKS: int = 10
CHUNK_PREFIX: str = "model_chunk_"
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".pt", ".pth")


class WeightsError(Exception):
    """Weights that cannot be found or read; the message says which file and why."""


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


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """Load weights (chunked directory or single file) with ``weights_only=True``; returns (state_dict, sha256)."""
    data = read_weight_bytes(path)
    try:
        state_dict = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-weights files
        raise WeightsError(f"{path}: not a loadable torch state_dict ({type(error).__name__}: {error})") from error
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: expected a state_dict mapping, got {type(state_dict).__name__}")
    return state_dict, bytes_sha256(data)


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
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{chunk_path.name}.")
        with os.fdopen(handle, "wb") as out:
            out.write(part)
        os.replace(temporary, chunk_path)
    return bytes_sha256(data)
