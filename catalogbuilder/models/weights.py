"""Model weights in the official SDSS format: a ``torch.save``d state_dict split byte-wise into ``model_chunk_0..9``.

Reading ``torch.load``s the chunks' bytes in order (or one ``.pt``/``.pth`` file) with ``weights_only=True``; finding
the files, their checksum and reading them without torch is :mod:`catalogbuilder.models.weight_files`. Writing
produces the same layout (parts 0–8 hold size//10 bytes, part 9 the rest), so a model trained here loads exactly like
the official weights. The SHA-256 of the concatenated bytes is the model's ``weights_sha256`` (the provenance key of
every result).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from catalogbuilder.files import atomic_write
from catalogbuilder.models.weight_files import (
    N_CHUNKS,
    ConcatenatedFiles,
    WeightsError,
    chunk_paths,
    file_identity,
    files_sha256,
    find_weights,
)

LOAD_ATTEMPTS = 3  # reads of weight files that changed while being read, before giving up


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of serialised weights (the model's ``weights_sha256``)."""
    return hashlib.sha256(data).hexdigest()


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """Load weights (chunked directory or single file) with ``weights_only=True``; returns (state_dict, sha256).

    The checksum is :func:`~catalogbuilder.models.weight_files.files_sha256` of the files (this process's cached one
    when it hashed them already, as a run does when it plans); the tensors are read straight from the files
    (:class:`~catalogbuilder.models.weight_files.ConcatenatedFiles`). Files that change while being read are read
    again, up to :data:`LOAD_ATTEMPTS` times (then :class:`WeightsError`), so the checksum is always that of the bytes
    loaded."""
    files = find_weights(path)
    for _ in range(LOAD_ATTEMPTS):
        before = tuple(file_identity(part) for part in files)
        checksum = files_sha256(files)
        try:
            with ConcatenatedFiles(files) as reader:
                state_dict = torch.load(reader, map_location=map_location, weights_only=True)
        except OSError:  # the files could not be read: the operating system's reason, unchanged
            raise
        except Exception as error:  # torch raises several types for corrupt or non-weights files
            if tuple(file_identity(part) for part in files) != before:
                continue  # bytes of two versions were mixed (e.g. a file shrank under the reader): read again
            raise WeightsError(f"{path}: not a loadable torch state_dict ({type(error).__name__}: "
                               f"{_torch_reason(error)})") from error
        if tuple(file_identity(part) for part in files) == before:
            break
    else:
        raise WeightsError(f"{path}: the weight files kept changing while they were read ({LOAD_ATTEMPTS} attempts)")
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
