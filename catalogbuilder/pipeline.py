"""The pipeline as one function: ingest → one cross-match → inference of every configured model → release, on one Dask
client, configured by a workflow YAML (:class:`~catalogbuilder.config.WorkflowSettings`, docs/workflows.md).

Each stage receives the store handle; the cross-match is computed once per run (only for positions not matched
before) and serves both APOGEE Net II inference and the release; models are checked once, before any work. The files
in ``workflows/`` only pick a configuration and call :func:`main`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import Client

from catalogbuilder.config import EXIT_CONFIG_ERROR, ConfigError, WorkflowSettings, absolute_entry
from catalogbuilder.crossmatch.cache import MatchCache, MatchConfig
from catalogbuilder.inference.graph import InferenceReport, ResultsWriteError, run_inference
from catalogbuilder.models.registry import ModelSummary, describe_model
from catalogbuilder.photometric.stage import describe_photometric_model, photometric_release
from catalogbuilder.release.build import ReleaseOptions, ReleaseReport, build_release
from catalogbuilder.store import IngestReport, SpectrumStore, StoreError, StoreWriteError, expand_inputs
from catalogbuilder.store.regrid import regrid
from catalogbuilder.files import WriteError, error_line

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkflowResult:
    """What one run did: the ingest, one inference report per model run, the release, the photometric table."""

    output: Path
    ingest: IngestReport
    inference: list[InferenceReport]
    release: ReleaseReport
    photometric_table: Path | None = None  # Parquet path of the photometric stage's release table
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time per step: check, ingest, ...

    @property
    def failed_tasks(self) -> int:
        """Inference tasks that failed for good (their spectra are NO_RESULT rows)."""
        return sum(len(report.failed_chunks) for report in self.inference)


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    began = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - began


def check_models(config: WorkflowSettings) -> dict[str, ModelSummary]:
    """Every configured model is readable (its small files and weight files; no weights loaded) and predicts on the
    grid it is listed under or on its own grid derived from it, and the photometric model is one (fails before any
    work is done); returns the spectral models by name."""
    models = {}
    for grid, names in config.models.items():
        for name in names:
            try:
                model = describe_model(name)
            except (FileNotFoundError, ValueError) as error:  # ConfigError and WeightsError are ValueErrors
                raise ConfigError([f"models.{grid}: {line}" for line in str(error).splitlines()]) from error
            spec = model.grid_spec
            if spec is None or (spec.base or spec.name) != grid:
                where = f"{model.grid!r} grid" + (f" (derived from {spec.base!r})" if spec and spec.base else "")
                raise ConfigError([f"models.{grid}: model {name!r} predicts on the {where}, listed under {grid!r}"])
            models[name] = model
    if config.photometric:
        try:
            describe_photometric_model(config.photometric.model)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError([f"photometric.model: {line}" for line in str(error).splitlines()]) from error
    return models


def run_workflow(client: Client, config: WorkflowSettings) -> WorkflowResult:
    """Ingest the inputs (new files only; with ``sync`` retire what is no longer listed), cross-match the positions
    not matched before, put new spectra on the models' own grids (``store regrid``), run every model whose grid holds
    spectra (new spectra or new weights only), then release (only changed partitions are rewritten)."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "check"):
        models = check_models(config)
    inputs = expand_inputs(config.inputs)
    with _timed(seconds, "ingest"):
        try:
            store = SpectrumStore.open(config.store, create=bool(inputs.paths))
        except StoreError as error:
            raise ConfigError([f"store: {error}"]) from error
        ingest = store.ingest(inputs, survey=config.survey, client=client, progress=config.progress, sync=config.sync)
    log.info("ingest: %s", ingest.summary())
    match = MatchConfig(tuple(config.catalogs), config.radius_arcsec)
    with _timed(seconds, "crossmatch"):
        cache = MatchCache(store, match)
        cache.update()
    derived = {model.grid_spec for model in models.values() if model.grid_spec.base is not None}
    if derived:
        with _timed(seconds, "regrid"):
            for spec in sorted(derived, key=lambda spec: spec.name):
                log.info("regrid: %s", regrid(store, spec, client, progress=config.progress).summary())
    reports = []
    with _timed(seconds, "infer"):
        for grid, names in config.models.items():
            if store.length(grid) == 0:
                log.info("no %s spectra in the store: skipping %s", grid, ", ".join(names))
                continue
            for name in names:
                reports.append(run_inference(
                    client, store, name, draws=config.draws, seed=config.seed,
                    batch_size=config.inference.batch_size, spectra_per_task=config.inference.spectra_per_task,
                    device=config.inference.device, precision=config.inference.precision,
                    retries=config.inference.retries, progress=config.progress,
                    photometry=cache.photometry_table(grid) if models[name].needs_photometry else None,
                ))
    with _timed(seconds, "release"):
        release = build_release(store, config.output, ReleaseOptions(match, fits=config.fits), progress=config.progress)
    photometric_table = None
    if config.photometric:  # its own stage and table: sources with photometry but no spectrum
        with _timed(seconds, "photometric"):
            photometric_table = photometric_release(
                config.photometric.input, config.photometric.model, config.output, config.draws, config.seed,
                client=client, gaia=config.photometric.gaia, radius_arcsec=config.radius_arcsec,
            )[2]
    return WorkflowResult(config.output, ingest, reports, release, photometric_table, seconds)


def describe(result: WorkflowResult) -> str:
    """What a run did and where its products are (printed at the end of a run)."""
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in result.seconds.items())
    lines = [f"wall time: {steps}", result.ingest.summary()]
    lines += [report.summary() for report in result.inference]
    release = result.release
    lines.append(f"release in {result.output} ({release.partitions_written} partitions written, "
                 f"{release.partitions_kept} unchanged; manifest.json lists every file):")
    for stem, table in sorted(release.tables.items()):
        fits = " + .fits.gz" if (result.output / f"{stem}.fits.gz").exists() else ""
        lines.append(f"  {table['counts']['rows']:8d} rows  {result.output / stem}/ (Parquet parts{fits})")
    for model in sorted({table["model"] for table in release.tables.values()}):
        lines.append(f"Kiel diagram: {result.output / f'kiel-{model}.png'}")
    lines.append(f"summary: {result.output / 'summary.json'}")
    if result.photometric_table:
        lines.append(f"photometric table: {result.photometric_table}  (+ .fits.gz)")
    if result.failed_tasks:
        lines.append(f"WARNING: {result.failed_tasks} inference task(s) failed for good; their spectra are NO_RESULT rows")
    return "\n".join(lines)


def build_parser(prog: str, description: str, default_config: Path, new_inputs: bool = False) -> argparse.ArgumentParser:
    """Options of a workflow (after dask-submit's own), each overriding its key of the YAML; ``new_inputs``: the
    inputs are positional (the incremental workflow)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=str(default_config), help="workflow YAML (default: %(default)s)")
    if new_inputs:
        parser.add_argument("inputs", nargs="+", metavar="NEW_PATH", help="new FITS files, folders or @list.txt")
    else:
        parser.add_argument("--inputs", nargs="+", metavar="PATH", help="FITS files, folders or @list.txt (replaces inputs)")
    parser.add_argument("--store", help="spectrum store folder")
    parser.add_argument("--output", help="release folder")
    parser.add_argument("--draws", type=int, help="Monte-Carlo draws per spectrum (keep the full run's)")
    parser.add_argument("--seed", type=int, help="run seed (keep the full run's)")
    parser.add_argument("--fits", action=argparse.BooleanOptionalAction, default=None,
                        help="write the single FITS files of the tables (default: the YAML's fits)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace, **fixed: Any) -> WorkflowSettings:
    """The YAML named by ``--config`` with the command-line overrides (and ``fixed`` keys) applied, validated as one
    document (``--inputs`` relative to the current directory, like ``--store`` and ``--output``)."""
    overrides: dict[str, Any] = {"progress": not args.no_progress, **fixed}
    if args.inputs:
        overrides["inputs"] = [absolute_entry(Path.cwd(), entry) for entry in args.inputs]
    for key in ("store", "output", "draws", "seed", "fits"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return WorkflowSettings.load(args.config, overrides)


def main(client: Client, argv: Sequence[str], parser: argparse.ArgumentParser, incremental: bool = False) -> int:
    """Run a workflow from its command line; print what it did and where everything is. Exit status 2 on a
    configuration error (or, for an incremental run, a store that does not exist yet), 1 when an inference task
    failed for good or a step could not write (e.g. a full disk; one line)."""
    args = parser.parse_args(list(argv))
    try:
        config = config_from_args(args)
        if incremental and not config.store.is_dir():
            raise ConfigError([f"store: no store at {config.store}; run the full workflow first (or give --store)"])
        result = run_workflow(client, config)
    except ConfigError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (StoreWriteError, ResultsWriteError, OSError) as error:  # e.g. a full disk (WriteError is an OSError)
        plain_os_error = isinstance(error, OSError) and not isinstance(error, WriteError)
        where = f" ({error.filename})" if plain_os_error and error.filename else ""
        text = f"cannot write: {error_line(error)}{where}" if plain_os_error else str(error)
        print(f"{parser.prog}: {text}", file=sys.stderr)  # what earlier steps committed stays; a rerun goes on
        return 1
    if incremental:
        predicted = sum(report.n_computed for report in result.inference)
        print(f"{parser.prog}: {result.ingest.spectra_added} new spectra ingested, {predicted} predictions computed, "
              f"{sum(report.n_skipped for report in result.inference)} kept from earlier runs")
    print(describe(result))
    return 1 if result.failed_tasks else 0
