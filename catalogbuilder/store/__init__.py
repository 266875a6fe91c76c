"""The spectrum store: model-grid resampling, the icechunk-backed Zarr store and the parallel ingest."""

from __future__ import annotations

from catalogbuilder.store.ingest import IngestReport, expand_inputs, ingest_files
from catalogbuilder.store.spectra import SpectrumStore, StoreConflictError, StoreError

__all__ = ["IngestReport", "SpectrumStore", "StoreConflictError", "StoreError", "expand_inputs", "ingest_files"]
