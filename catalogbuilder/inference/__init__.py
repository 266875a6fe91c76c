"""Inference stage: a Dask graph over the spectrum store's chunks (graph.py) writing per-spectrum results (results.py).

Heavy modules (torch, distributed) are imported by the functions that need them, so ``import catalogbuilder.inference``
stays cheap; use ``from catalogbuilder.inference.graph import run_inference`` to run it.
"""
from catalogbuilder.inference.results import STATUS_NO_RESULT, STATUS_OK, ResultsStore

__all__ = ["STATUS_NO_RESULT", "STATUS_OK", "ResultsStore"]
