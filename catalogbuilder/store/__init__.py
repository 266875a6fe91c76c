"""The spectrum store: layout, the single writer, the read handle every stage receives, ingest, lineage and results.

The ingest names are imported on first use (PEP 562): ingest needs the FITS readers and astropy, which inference
never loads.
"""

from __future__ import annotations

import importlib
from typing import Any

from catalogbuilder.store.errors import (
    StoreConflictError,
    StoreError,
    StoreLayoutError,
    StoreWriteError,
)
from catalogbuilder.store.handle import SpectrumStore, StoreRef

_INGEST_NAMES = ("IngestReport", "Inputs", "expand_inputs", "ingest_files")


def __getattr__(name: str) -> Any:
    """``IngestReport``, ``Inputs``, ``expand_inputs``, ``ingest_files`` from :mod:`catalogbuilder.store.ingest`."""
    if name in _INGEST_NAMES:
        return getattr(importlib.import_module("catalogbuilder.store.ingest"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["IngestReport", "Inputs", "SpectrumStore", "StoreConflictError", "StoreError", "StoreLayoutError",
           "StoreRef", "StoreWriteError", "expand_inputs", "ingest_files"]
