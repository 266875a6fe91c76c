"""DR19-style catalog workflow: ingest -> infer (every model that applies) -> cross-match -> calibrate/flag -> release,
on one Dask client, configured by a YAML file (default: ``dr19.yaml`` beside this file).

    dask-submit workflows/dr19.py [--cluster YAML | --address A | ...] [--config dr19.yaml] [--inputs PATH ...]
                [--store DIR] [--output DIR] [--draws N] [--seed N]

With no options: a local cluster, the shipped sample spectra and the shipped models, written to
``./catalog-output/``. Running it again with more inputs is the incremental run: files already in the store are
not read again, and only spectra without a result for the current model weights are predicted.
This file only composes the stage functions; see docs/workflows.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from distributed import Client

from catalogbuilder.constants import DEFAULT_DRAWS, GRIDS
from catalogbuilder.crossmatch.match import DEFAULT_RADIUS_ARCSEC, crossmatch
from catalogbuilder.inference.graph import DEFAULT_BATCH_SIZE, DEFAULT_RETRIES, DEVICES, InferenceReport, run_inference
from catalogbuilder.models.registry import load_model
from catalogbuilder.photometric.stage import photometric_release
from catalogbuilder.readers import SURVEY_CHOICES
from catalogbuilder.release.tables import ReleaseTable, build_release, store_spectra
from catalogbuilder.store import IngestReport, SpectrumStore, expand_inputs

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().with_name("dr19.yaml")
CONFIG_KEYS = frozenset(
    {"inputs", "survey", "store", "output", "models", "draws", "seed", "inference", "catalogs", "radius_arcsec",
     "photometric"}
)
INFERENCE_KEYS = frozenset({"device", "batch_size", "spectra_per_task", "retries"})
PHOTOMETRIC_KEYS = frozenset({"input", "model", "gaia"})
DEFAULT_PHOTOMETRIC_MODEL = "sos-photometric-demo"


class WorkflowConfigError(ValueError):
    """A workflow YAML or option that cannot be run; the message names the key."""


@dataclasses.dataclass(frozen=True)
class WorkflowConfig:
    """A resolved workflow configuration: every path absolute, models per grid in run order."""

    inputs: tuple[str, ...]
    store: Path
    output: Path
    models: dict[str, tuple[str, ...]]  # grid -> shipped model names or model folders
    survey: str = "auto"
    draws: int = DEFAULT_DRAWS
    seed: int = 0
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    spectra_per_task: int | None = None
    retries: int = DEFAULT_RETRIES
    catalogs: tuple[str, ...] = ()
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC
    photometric_input: str | None = None  # table of sources with photometry but no spectrum (docs/other_models.md)
    photometric_model: str = DEFAULT_PHOTOMETRIC_MODEL
    photometric_gaia: str | None = None  # catalog filling parallax/Gaia bands of those tables by position
    progress: bool = True


@dataclasses.dataclass
class WorkflowResult:
    """What one run did: the ingest, one inference report per model run, and the release tables written."""

    output: Path
    ingest: IngestReport
    inference: list[InferenceReport]
    tables: list[ReleaseTable]
    photometric_table: Path | None = None  # Parquet path of the photometric stage's release table
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time per step: check, ingest, ...

    @property
    def failed_tasks(self) -> int:
        """Inference tasks that failed for good (their spectra are NO_RESULT rows)."""
        return sum(len(report.failed_chunks) for report in self.inference)


def _relative_to(base: Path, entry: str) -> str:
    """``entry`` as an absolute path when it is relative (``@list.txt`` keeps its ``@``)."""
    prefix, text = ("@", entry[1:]) if entry.startswith("@") else ("", entry)
    path = Path(text).expanduser()
    return prefix + str(path if path.is_absolute() else (base / path).resolve())


def _model_entry(base: Path, entry: str) -> str:
    """A model folder relative to the YAML, or the name of a shipped model as given."""
    candidate = base / Path(entry).expanduser()
    return str(candidate.resolve()) if candidate.is_dir() else entry


def _str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise WorkflowConfigError(f"{key} must be a list of strings, got {value!r}")
    return value


def parse_config(document: dict[str, Any], base: Path, cwd: Path | None = None) -> WorkflowConfig:
    """Validate a loaded workflow YAML. ``base``: folder that inputs, model folders and catalogs are relative to;
    ``cwd``: folder that ``store`` and ``output`` are relative to (default: the current directory)."""
    cwd = cwd or Path.cwd()
    if not isinstance(document, dict):
        raise WorkflowConfigError("a workflow config is a mapping of the keys in docs/workflows.md")
    unknown = set(document) - CONFIG_KEYS
    if unknown:
        raise WorkflowConfigError(f"unknown workflow keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    inference = document.get("inference") or {}
    unknown = set(inference) - INFERENCE_KEYS
    if unknown:
        raise WorkflowConfigError(f"unknown inference keys {sorted(unknown)}; known: {sorted(INFERENCE_KEYS)}")
    models = document.get("models") or {}
    if not isinstance(models, dict) or not set(models) <= set(GRIDS):
        raise WorkflowConfigError(f"models must map model grids {GRIDS} to model names, got {models!r}")
    survey = document.get("survey", "auto")
    if survey not in SURVEY_CHOICES:
        raise WorkflowConfigError(f"survey must be one of {SURVEY_CHOICES}, got {survey!r}")
    device = inference.get("device", "auto")
    if device not in DEVICES:
        raise WorkflowConfigError(f"inference.device must be one of {DEVICES}, got {device!r}")
    for key in ("store", "output"):
        if not isinstance(document.get(key), str):
            raise WorkflowConfigError(f"{key} (a folder) is required")
    draws = int(document.get("draws", DEFAULT_DRAWS))
    if draws < 0:
        raise WorkflowConfigError(f"draws must be >= 0, got {draws}")
    spectra_per_task = inference.get("spectra_per_task")
    photometric = document.get("photometric") or {}
    if not isinstance(photometric, dict) or set(photometric) - PHOTOMETRIC_KEYS:
        raise WorkflowConfigError(f"photometric must be a mapping of {sorted(PHOTOMETRIC_KEYS)}, got {photometric!r}")
    return WorkflowConfig(
        inputs=tuple(_relative_to(base, entry) for entry in _str_list(document.get("inputs", []), "inputs")),
        store=(cwd / Path(document["store"]).expanduser()).resolve(),
        output=(cwd / Path(document["output"]).expanduser()).resolve(),
        models={grid: tuple(_model_entry(base, name) for name in _str_list(names, f"models.{grid}"))
                for grid, names in models.items() if names},
        survey=survey,
        draws=draws,
        seed=int(document.get("seed", 0)),
        device=device,
        batch_size=int(inference.get("batch_size", DEFAULT_BATCH_SIZE)),
        spectra_per_task=None if spectra_per_task is None else int(spectra_per_task),
        retries=int(inference.get("retries", DEFAULT_RETRIES)),
        catalogs=tuple(_relative_to(base, entry) for entry in _str_list(document.get("catalogs", []), "catalogs")),
        radius_arcsec=float(document.get("radius_arcsec", DEFAULT_RADIUS_ARCSEC)),
        photometric_input=_relative_to(base, str(photometric["input"])) if photometric.get("input") else None,
        photometric_model=_model_entry(base, str(photometric.get("model", DEFAULT_PHOTOMETRIC_MODEL))),
        photometric_gaia=_relative_to(base, photometric["gaia"]) if photometric.get("gaia") else None,
    )


def load_config(path: str | Path = DEFAULT_CONFIG, cwd: Path | None = None) -> WorkflowConfig:
    """Read a workflow YAML (relative paths as described in :func:`parse_config`)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WorkflowConfigError(f"workflow config not found: {path}")
    with open(path) as handle:
        return parse_config(yaml.safe_load(handle), base=path.parent, cwd=cwd)


def check_models(config: WorkflowConfig) -> set[str]:
    """Every configured model loads and predicts on the grid it is listed under (fails before any work is done);
    returns the models that also need photometry (APOGEE Net II), which are run after a cross-match."""
    needs_photometry = set()
    for grid, names in config.models.items():
        for name in names:
            try:
                model = load_model(name, device="cpu")
            except (FileNotFoundError, ValueError) as error:
                raise WorkflowConfigError(f"models.{grid}: {error}") from error
            if model.grid != grid:
                raise WorkflowConfigError(f"model {name!r} predicts on the {model.grid!r} grid, listed under {grid!r}")
            if model.needs_photometry:
                needs_photometry.add(name)
    return needs_photometry


def photometry_table(config: WorkflowConfig) -> Path:
    """Cross-match the store with the configured catalogs into ``<output>/crossmatch.parquet`` before inference, for
    the models that take Gaia/2MASS photometry as input (the release repeats the same match for its flags)."""
    spectra = store_spectra(config.store, input_quality=False)  # positions and header 2MASS only
    path = Path(config.output) / "crossmatch.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    crossmatch(spectra, config.catalogs, config.radius_arcsec).to_parquet(path, index=False)
    return path


def run_workflow(client: Client, config: WorkflowConfig) -> WorkflowResult:
    """Ingest the inputs (new files only), run every model whose grid holds spectra (new spectra or new weights
    only), then cross-match, calibrate, flag and write the release tables from everything in the store."""
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    needs_photometry = check_models(config)
    seconds["check"] = time.perf_counter() - began
    store = SpectrumStore.open(config.store)
    ingest = store.ingest(expand_inputs(config.inputs), survey=config.survey, client=client, progress=config.progress)
    log.info("ingest: %s", ingest.summary())
    seconds["ingest"] = time.perf_counter() - began - sum(seconds.values())
    photometry = photometry_table(config) if needs_photometry else None
    reports = []
    for grid, names in config.models.items():
        if store.dataset(grid) is None:
            log.info("no %s spectra in the store: skipping %s", grid, ", ".join(names))
            continue
        for name in names:
            reports.append(
                run_inference(
                    client, config.store, name, draws=config.draws, seed=config.seed, batch_size=config.batch_size,
                    spectra_per_task=config.spectra_per_task, device=config.device, retries=config.retries,
                    progress=config.progress, photometry=photometry if name in needs_photometry else None,
                )
            )
    seconds["infer"] = time.perf_counter() - began - sum(seconds.values())
    tables = build_release(config.store, config.output, catalogs=config.catalogs, radius_arcsec=config.radius_arcsec)
    seconds["release"] = time.perf_counter() - began - sum(seconds.values())
    photometric_table = None
    if config.photometric_input:  # its own stage and table: sources with photometry but no spectrum
        photometric_table = photometric_release(
            config.photometric_input, config.photometric_model, config.output, config.draws, config.seed,
            client=client, gaia=config.photometric_gaia, radius_arcsec=config.radius_arcsec,
        )[2]
        seconds["photometric"] = time.perf_counter() - began - sum(seconds.values())
    return WorkflowResult(config.output, ingest, reports, tables, photometric_table, seconds)


def describe(result: WorkflowResult) -> str:
    """What a run did and where its products are (printed at the end of a run)."""
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in result.seconds.items())
    lines = [f"wall time: {steps}", result.ingest.summary()]
    lines += [report.summary() for report in result.inference]
    lines.append(f"release tables in {result.output}:")
    for table in result.tables:
        stem = result.output / table.survey / table.model_name / table.stem
        lines.append(f"  {len(table.rows):6d} rows  {stem}.fits.gz  (+ .parquet)")
    for model in sorted({table.model_name for table in result.tables}):
        lines.append(f"Kiel diagram: {result.output / f'kiel-{model}.png'}")
    lines.append(f"summary: {result.output / 'summary.json'}")
    if result.photometric_table:
        lines.append(f"photometric table: {result.photometric_table}  (+ .fits.gz)")
    if result.failed_tasks:
        lines.append(f"WARNING: {result.failed_tasks} inference task(s) failed for good; their spectra are NO_RESULT rows")
    return "\n".join(lines)


def build_parser(prog: str = "dr19") -> argparse.ArgumentParser:
    """Options of the workflow (after dask-submit's own); each overrides its key of the YAML."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="workflow YAML (default: %(default)s)")
    parser.add_argument("--inputs", nargs="+", metavar="PATH", help="FITS files, folders or @list.txt (replaces inputs)")
    parser.add_argument("--store", help="spectrum store folder")
    parser.add_argument("--output", help="release folder")
    parser.add_argument("--draws", type=int, help="Monte-Carlo draws per spectrum")
    parser.add_argument("--seed", type=int, help="run seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> WorkflowConfig:
    """The YAML named by ``--config`` with the command-line overrides applied."""
    config = load_config(args.config)
    overrides: dict[str, Any] = {"progress": not args.no_progress}
    if args.inputs:
        overrides["inputs"] = tuple(_relative_to(Path.cwd(), entry) for entry in args.inputs)
    for key in ("store", "output"):
        if getattr(args, key):
            overrides[key] = Path(getattr(args, key)).expanduser().resolve()
    for key in ("draws", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return dataclasses.replace(config, **overrides)


def main(client: Client, argv: Sequence[str]) -> int:
    """dask-submit entry point: run the workflow, print where the tables and the Kiel diagram are; exit status 1
    when an inference task failed for good."""
    args = build_parser().parse_args(list(argv))
    try:
        result = run_workflow(client, config_from_args(args))
    except WorkflowConfigError as error:
        print(f"dr19: {error}", file=sys.stderr)
        return 2
    print(describe(result))
    return 1 if result.failed_tasks else 0


if __name__ == "__main__":
    from catalogbuilder.submit import script_main

    sys.exit(script_main(main))
