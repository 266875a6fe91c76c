"""The spectrum store: layout, the single writer, the read handle every stage receives, ingest, lineage and results."""

from __future__ import annotations

from catalogbuilder.store.errors import (
    StoreConflictError,
    StoreError,
    StoreLayoutError,
    StoreWriteError,
)
from catalogbuilder.store.handle import SpectrumStore, StoreRef
from catalogbuilder.store.ingest import IngestReport, Inputs, expand_inputs, ingest_files

__all__ = ["IngestReport", "Inputs", "SpectrumStore", "StoreConflictError", "StoreError", "StoreLayoutError",
           "StoreRef", "StoreWriteError", "expand_inputs", "ingest_files"]
