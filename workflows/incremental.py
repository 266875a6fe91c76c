"""Incremental (nightly) run: add new spectra to an existing catalog and rebuild its release tables.

    dask-submit workflows/incremental.py [cluster options] NEW_PATH ... [--config dr19.yaml] [--draws N] [--seed N]

It is the dr19 workflow with the new files as its inputs, on the store and output of the config: files whose bytes
are already in the store are skipped, only spectra without an ``ok`` result for the current model weights are
predicted (all of a model's spectra after its weights changed, none of the others'), and the tables are rebuilt
from the whole store. Use the same ``draws`` and ``seed`` as the full run so that old and new rows agree.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from distributed import Client


def _dr19() -> ModuleType:
    """The dr19 workflow module beside this file (imported here, on the client, not when workers load this file)."""
    from catalogbuilder.submit import import_workflow

    return sys.modules.get("dr19") or import_workflow(Path(__file__).resolve().with_name("dr19.py"))


def build_parser() -> argparse.ArgumentParser:
    """The dr19 options, with the new inputs as positional arguments."""
    dr19 = _dr19()
    parser = argparse.ArgumentParser(prog="incremental", description=__doc__.split("\n\n")[0])
    parser.add_argument("new_inputs", nargs="+", metavar="NEW_PATH", help="new FITS files, folders or @list.txt")
    parser.add_argument("--config", default=str(dr19.DEFAULT_CONFIG), help="workflow YAML of the catalog")
    parser.add_argument("--store", help="spectrum store folder (default: the config's)")
    parser.add_argument("--output", help="release folder (default: the config's)")
    parser.add_argument("--draws", type=int, help="Monte-Carlo draws per spectrum (keep the full run's)")
    parser.add_argument("--seed", type=int, help="run seed (keep the full run's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(client: Client, argv: Sequence[str]) -> int:
    """dask-submit entry point: ingest and predict what is new, rebuild the tables, print what was new."""
    dr19 = _dr19()
    args = build_parser().parse_args(list(argv))
    args.inputs = args.new_inputs
    try:
        config = dr19.config_from_args(args)
    except dr19.WorkflowConfigError as error:
        print(f"incremental: {error}", file=sys.stderr)
        return 2
    if not config.store.is_dir():
        print(f"incremental: no store at {config.store}; run workflows/dr19.py first (or give --store)", file=sys.stderr)
        return 2
    try:
        result = dr19.run_workflow(client, config)
    except dr19.WorkflowConfigError as error:
        print(f"incremental: {error}", file=sys.stderr)
        return 2
    new_spectra = result.ingest.spectra_added
    predicted = sum(report.n_computed for report in result.inference)
    print(f"incremental: {new_spectra} new spectra ingested, {predicted} predictions computed, "
          f"{sum(report.n_skipped for report in result.inference)} kept from earlier runs")
    print(dr19.describe(result))
    return 1 if result.failed_tasks else 0


if __name__ == "__main__":
    from catalogbuilder.submit import script_main

    sys.exit(script_main(main))
