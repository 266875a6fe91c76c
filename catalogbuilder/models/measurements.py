"""Speed measurements shared by every process of a machine: the first one made for a key is the one all use.

Choices made by timing (the convolution form of a layer, the rows per forward pass) change float32 rounding, so two
workers that chose differently would give results differing in the last bits, and so would two runs. Each measured
choice is therefore written to a small JSON file under :func:`measurements_directory`, named by a hash of its key
(which holds the machine — CPU model or GPU name — torch version, thread count and everything measured); the first
process to write a key wins (an atomic hard link), and every later process, run or worker of a machine of that kind
reads the file instead of measuring. Without a writable cache directory each process keeps its own measurement.
Delete the directory to measure again (e.g. after a hardware or driver change the key does not see).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "CATALOGBUILDER_CACHE_DIR"  # overrides $XDG_CACHE_HOME/catalogbuilder (default ~/.cache/catalogbuilder)
FORMAT_VERSION = 2  # part of every key: a new format never reads old files (2: ConvolutionChoice.direct_timed)


def measurements_directory() -> Path:
    """Where shared measurements live: ``$CATALOGBUILDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/catalogbuilder``, else
    ``~/.cache/catalogbuilder``; then ``measurements/``."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get(CACHE_ENV) or cache_home / "catalogbuilder") / "measurements"


@lru_cache(maxsize=8)
def machine_name(device: str) -> str:
    """The kind of processor a device is: the GPU's name for ``cuda…``, else the CPU model (``/proc/cpuinfo``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def first_measurement(kind: str, key: tuple, device: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The shared measurement of ``key`` (JSON values) for ``device``: read if this machine kind has one, else
    ``measure()`` and offer it; if another process offered one first, that one is returned."""
    full_key = [FORMAT_VERSION, kind, machine_name(device), torch.__version__, *map(str, key)]
    path = measurements_directory() / f"{kind}-{hashlib.sha256(json.dumps(full_key).encode()).hexdigest()[:32]}.json"
    shared = _read(path, full_key)
    if shared is not None:
        return shared
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "w") as out:
            json.dump({"key": full_key, "value": value}, out)
        try:
            os.link(temporary, path)  # atomic: fails if another process's measurement is already there
        except FileExistsError:
            value = _read(path, full_key) or value
        finally:
            os.unlink(temporary)
    except OSError as error:  # no writable cache: this process keeps its own measurement
        log.debug("measurement %s not shared: %s", path, error)
    return value


def _read(path: Path, full_key: list) -> dict[str, Any] | None:
    """The value stored at ``path`` for exactly ``full_key`` (None if absent, unreadable or another key's)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored.get("value") if stored.get("key") == full_key else None
