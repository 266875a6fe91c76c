"""DR19-style catalog workflow: ingest -> cross-match -> infer (every model that applies) -> calibrate/flag -> release,
on one Dask client, configured by ``dr19.yaml`` beside this file (or ``--config``).

    dask-submit workflows/dr19.py [--cluster YAML | --address A | ...] [--config dr19.yaml] [--inputs PATH ...]
                [--store DIR] [--output DIR] [--draws N] [--seed N] [--no-fits]

With no options: a local cluster, the shipped sample spectra and the shipped models, written to
``./catalog-output/``. Running it again with more inputs is an incremental run: files already in the store are
not read again, only spectra without a result for the current model weights are predicted, and only the release
partitions that changed are rewritten. The stages are composed by ``catalogbuilder.pipeline``; see docs/workflows.md.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from distributed import Client

from catalogbuilder import pipeline

DEFAULT_CONFIG = Path(__file__).resolve().with_name("dr19.yaml")


def main(client: Client, argv: Sequence[str]) -> int:
    """dask-submit entry point: the whole pipeline over the configured inputs."""
    parser = pipeline.build_parser("dr19", __doc__.split("\n\n")[0], DEFAULT_CONFIG)
    return pipeline.main(client, argv, parser)


if __name__ == "__main__":
    from catalogbuilder.submit import script_main

    sys.exit(script_main(main))
