"""Incremental (nightly) run: add new spectra to an existing catalog and update its release.

    dask-submit workflows/incremental.py [cluster options] NEW_PATH ... [--config dr19.yaml] [--fits]

The dr19 workflow with the new files as its inputs, on the store and output of the config: files whose bytes are
already in the store are skipped (a new version of a known file supersedes it), only spectra without an ``ok`` result
for the current model weights are predicted, only new positions are cross-matched, and only the release partitions
that changed are rewritten — Parquet parts only, unless ``--fits`` (the single FITS files are for data releases).
Use the same ``draws`` and ``seed`` as the full run so that old and new rows agree.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from distributed import Client

from catalogbuilder import pipeline

DEFAULT_CONFIG = Path(__file__).resolve().with_name("dr19.yaml")


def main(client: Client, argv: Sequence[str]) -> int:
    """dask-submit entry point: ingest, match, predict and release what is new."""
    parser = pipeline.build_parser("incremental", __doc__.split("\n\n")[0], DEFAULT_CONFIG, new_inputs=True)
    parser.set_defaults(fits=False)
    return pipeline.main(client, argv, parser, incremental=True)


if __name__ == "__main__":
    from catalogbuilder.submit import script_main

    sys.exit(script_main(main))
