"""Inference stage: a Dask graph over the spectrum store's chunks (graph.py) writing per-spectrum results to the
store's results (catalogbuilder.store.results).

Heavy modules (torch, distributed) are imported by the functions that need them, so ``import catalogbuilder.inference``
stays cheap; use ``from catalogbuilder.inference.graph import run_inference`` to run it.
"""
