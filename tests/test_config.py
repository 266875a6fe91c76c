"""The typed configuration layer (catalogbuilder/config.py): strict workflow YAML with the documented defaults,
cluster YAML and model-info validation, one line per problem naming file, key, value and what is allowed, exit
status 2 from every command, and model names that cannot lead a stage out of its output folder."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from distributed import LocalCluster

from catalogbuilder import __version__, cli, pipeline, submit
from catalogbuilder.store import SpectrumStore
from catalogbuilder.config import (
    DEFAULT_MODELS,
    DEFAULT_PHOTOMETRIC_MODEL,
    MODEL_INFO_FILE,
    SHIPPED_CATALOG,
    ClusterSettings,
    ConfigError,
    ModelInfoSettings,
    WorkflowSettings,
    model_name,
)
from catalogbuilder.constants import DEFAULT_BATCH_SIZE, DEFAULT_DRAWS, DEFAULT_RETRIES
from catalogbuilder.config import SHIPPED_MODELS_DIR, shipped_models
from catalogbuilder.models.registry import ModelInfo, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO_ROOT / "workflows"
CLUSTER_CONFIGS = REPO_ROOT / "cluster_configs"
ESCAPE = "../../escape"
BAD_WORKFLOW_LINES = {  # YAML text -> the problem line after "<file>: "
    "draws: twenty": "draws: got 'twenty'; allowed: integer >= 0",
    "draws: true": "draws: got True; allowed: integer >= 0",
    "draws: -1": "draws: got -1; allowed: integer >= 0",
    "seed: 1.5": "seed: got 1.5; allowed: integer >= 0 and <= 9223372036854775807",
    "radius_arcsec: abc": "radius_arcsec: got 'abc'; allowed: number > 0",
    "radius_arcsec: .nan": "radius_arcsec: got nan; allowed: number > 0",
    "inference: {batch_size: 0}": "inference.batch_size: got 0; allowed: integer > 0",
    "inference: {retries: -1}": "inference.retries: got -1; allowed: integer >= 0",
    "inference: {spectra_per_task: '8'}": "inference.spectra_per_task: got '8'; allowed: integer > 0 or null",
    "inference: {device: tpu}": "inference.device: got 'tpu'; allowed: one of auto, cpu, cuda",
    "inference: {gpus: 1}": "inference.gpus: unknown key; allowed keys here: device, precision, batch_size, spectra_per_task, "
                            "retries",
    "nights: []": "nights: unknown key; allowed keys here: inputs, survey, store, output, models, draws, seed, "
                  "inference, catalogs, radius_arcsec, photometric, sync, fits, progress",
    "survey: gaia": "survey: got 'gaia'; allowed: one of auto, apogee, apogee-visit, boss, lamost",
    "models: {infrared: [m]}": "models.infrared: unknown key; allowed keys here: one of apogee, optical",
    "models: {}": "models: got {}; allowed: mapping of model grids (apogee, optical) to shipped model names or model "
                  "folders, at least one",
    "models: [anet3-cannon-demo]": "models: got ['anet3-cannon-demo']; allowed: mapping of model grids (apogee, "
                                  "optical) to shipped model names or model folders, at least one",
    "models: {optical: []}": "models.optical: got []; allowed: shipped model name or model folder (relative: from the "
                             "YAML's folder), or a list of them (at least 1)",
    "store: null": "store: got None; allowed: folder path (relative: from the current directory)",
    "inputs: [3]": "inputs[0]: got 3; allowed: path of a FITS file, a folder or an @list.txt (relative: from the "
                   "YAML's folder)",
    "photometric: {model: x}": "photometric.input: missing; allowed: path of an existing file or folder (relative: "
                               "from the YAML's folder)",
    "progress: 'no'": "progress: got 'no'; allowed: true or false",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return list(error.value.problems)


@pytest.fixture(scope="module")
def scheduler_address() -> Iterator[str]:
    """An in-process scheduler with one worker thread (stage commands attach with --address, no cluster start)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def escaping_model(source: Path, folder: Path) -> Path:
    """A copy of the model in ``source`` (weights linked) whose catalogbuilder.yaml names it ``../../escape``."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != MODEL_INFO_FILE:
            (folder / path.name).symlink_to(path)
    info = yaml.safe_load((source / MODEL_INFO_FILE).read_text()) | {"name": ESCAPE}
    (folder / MODEL_INFO_FILE).write_text(yaml.safe_dump(info))
    return folder


def escape_line(folder: Path) -> str:
    return (f"{folder / MODEL_INFO_FILE}: name: got '{ESCAPE}'; allowed: one folder name: ASCII letters, digits, "
            "'.', '_', '+', '-', not starting with '.'")


# --- the workflow YAML ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", sorted(BAD_WORKFLOW_LINES))
def test_a_bad_workflow_value_names_file_key_value_and_what_is_allowed(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "site.yaml", text + "\n")
    with pytest.raises(ConfigError) as error:
        WorkflowSettings.load(path)
    assert problems(error) == [f"{path}: {BAD_WORKFLOW_LINES[text]}"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "site.yaml", "draws: twenty\nseed: 1.5\nradius_arcsec: abc\ninference:\n  batch_size: 0\n"
                 "colour: red\ncatalogs: [missing.fits]\n")
    with pytest.raises(ConfigError) as error:
        WorkflowSettings.load(path)
    assert [line.split(": ")[1] for line in problems(error)] == [
        "draws", "seed", "inference.batch_size", "catalogs[0]", "radius_arcsec", "colour"]
    assert f"{path}: catalogs[0]: got 'missing.fits'; allowed: path of an existing file or folder; " \
           f"{tmp_path / 'missing.fits'} does not exist" in problems(error)
    assert str(error.value) == "\n".join(problems(error))


def test_a_missing_key_takes_its_documented_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = WorkflowSettings.load(write(tmp_path / "conf" / "empty.yaml", "# every key left out\n"))
    assert config.models == {grid: list(names) for grid, names in DEFAULT_MODELS.items()}
    assert config.models == {"apogee": ["anet3-cannon-demo"], "optical": ["bossnet-lamost-demo"]}
    assert {name for names in DEFAULT_MODELS.values() for name in names} | {DEFAULT_PHOTOMETRIC_MODEL} <= set(
        shipped_models())
    assert (config.inputs, config.survey, config.draws, config.seed) == ([], "auto", DEFAULT_DRAWS, 0)
    assert config.radius_arcsec == 1.0
    assert (config.store, config.output) == (tmp_path / "catalog-output" / "store", tmp_path / "catalog-output")
    assert config.catalogs == [str(SHIPPED_CATALOG)] and SHIPPED_CATALOG.is_file()
    assert config.inference.model_dump() == {"device": "auto", "precision": "float32", "batch_size": DEFAULT_BATCH_SIZE,
                                             "spectra_per_task": None, "retries": DEFAULT_RETRIES}
    assert config.photometric is None and config.progress is True


def test_a_missing_models_key_runs_the_shipped_models_on_their_grids() -> None:
    dr19 = pipeline
    config = WorkflowSettings.model_validate({"inputs": []})
    models = dr19.check_models(config)  # each default model is readable and predicts on the grid it is listed under
    assert {name: model.grid for name, model in models.items()} == {"anet3-cannon-demo": "apogee",
                                                                    "bossnet-lamost-demo": "optical"}
    assert not any(model.needs_photometry for model in models.values())


def test_paths_are_relative_to_the_yaml_or_to_the_current_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "models" / "mine").mkdir(parents=True)
    write(tmp_path / "conf" / "gaia.ecsv", "")
    write(tmp_path / "conf" / "sources.csv", "")
    path = write(tmp_path / "conf" / "site.yaml", yaml.safe_dump({
        "inputs": "spectra", "store": "s", "output": "~/o", "models": {"apogee": ["models/mine", "anet3-cannon-demo"]},
        "catalogs": "gaia.ecsv", "photometric": {"input": "sources.csv", "gaia": "gaia.ecsv"}}))
    config = WorkflowSettings.load(path)
    assert config.inputs == [str(tmp_path / "conf" / "spectra")]  # a single path is a list of one
    assert (config.store, config.output) == (tmp_path / "s", Path("~/o").expanduser())
    assert config.models == {"apogee": [str(tmp_path / "conf" / "models" / "mine"), "anet3-cannon-demo"]}
    assert config.catalogs == [str(tmp_path / "conf" / "gaia.ecsv")]
    assert (config.photometric.input, config.photometric.model, config.photometric.gaia) == (
        str(tmp_path / "conf" / "sources.csv"), DEFAULT_PHOTOMETRIC_MODEL, str(tmp_path / "conf" / "gaia.ecsv"))


def test_the_shipped_workflow_yaml_parses(tmp_path: Path) -> None:
    config = WorkflowSettings.load(WORKFLOWS / "dr19.yaml", cwd=tmp_path)
    assert all(Path(entry).is_dir() for entry in config.inputs) and len(config.inputs) == 4
    assert config.inference.batch_size == 32 and config.store == tmp_path / "catalog-output" / "store"


def test_a_key_written_twice_and_broken_yaml_are_refused(tmp_path: Path) -> None:
    twice = write(tmp_path / "twice.yaml", "draws: 20\nseed: 1\ndraws: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: .*key 'draws' is written twice.* line 3"):
        WorkflowSettings.load(twice)
    broken = write(tmp_path / "broken.yaml", "models: [apogee\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        WorkflowSettings.load(broken)
    with pytest.raises(ConfigError, match="nothing.yaml: file not found"):
        WorkflowSettings.load(tmp_path / "nothing.yaml")
    listing = write(tmp_path / "list.yaml", "- draws\n")
    with pytest.raises(ConfigError, match=r"list.yaml: \(whole file\): got \['draws'\]; allowed: mapping with keys"):
        WorkflowSettings.load(listing)


@pytest.mark.parametrize("workflow", ["dr19.py", "incremental.py"])
def test_workflows_exit_2_with_the_problem_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workflow: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "site.yaml", "draws: twenty\ninference: {batch_size: 0}\n")
    main = submit.load_workflow(WORKFLOWS / workflow)
    extra = ["new.fits"] if workflow == "incremental.py" else []
    assert main(None, [*extra, "--config", str(path)]) == 2  # refused before the client is used
    prog = workflow.removesuffix(".py")
    assert capsys.readouterr().err.splitlines() == [
        f"{prog}: {path}: draws: got 'twenty'; allowed: integer >= 0",
        f"{path}: inference.batch_size: got 0; allowed: integer > 0"]


# --- cluster YAML -----------------------------------------------------------------------------------------------------

def test_every_shipped_cluster_config_parses() -> None:
    kinds = {path.name: ClusterSettings.load(path).kind for path in sorted(CLUSTER_CONFIGS.glob("*.yaml"))}
    assert kinds == {"local.yaml": "local", "local-gpu.yaml": "local-gpu", "pbs-gpu.yaml": "pbs",
                     "slurm-cpu.yaml": "slurm", "slurm-gpu.yaml": "slurm", "slurm-runner.yaml": "slurm-runner"}
    slurm = ClusterSettings.load(CLUSTER_CONFIGS / "slurm-gpu.yaml")
    assert slurm.jobqueue["job_name"] == "catalogbuilder-gpu" and slurm.scale_jobs == 4 and slurm.adapt is None
    assert ClusterSettings.load(CLUSTER_CONFIGS / "slurm-cpu.yaml").adapt == {"minimum": 0, "maximum": 20}


def test_cluster_keys_are_strict_and_dask_spelling_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", yaml.safe_dump({
        "jobqueue": {"slurm": {"cores": 2, "memory": "4GiB", "job-extra-directives": ["-C gpu"]}},
        "catalogbuilder": {"wait-for-workers": 2, "scale": 3, "options": {"dashboard-address": ":0"}}}))
    config = ClusterSettings.load(path)
    assert (config.kind, config.scale_jobs, config.wait_for_workers, config.source) == ("slurm", 3, 2, path)
    assert config.jobqueue == {"cores": 2, "memory": "4GiB", "job_extra_directives": ["-C gpu"]}
    assert config.options == {"dashboard_address": ":0"}
    bad = write(tmp_path / "bad.yaml", yaml.safe_dump({
        "catalogbuilder": {"kind": "local", "wait_for_workers": True, "adapt": {"minimum": 4, "maximum": 3.0}},
        "distributed": {}}))
    with pytest.raises(ConfigError) as error:
        ClusterSettings.load(bad)
    assert problems(error) == [
        f"{bad}: catalogbuilder.adapt.maximum: got 3.0; allowed: integer > 0 or null",
        f"{bad}: catalogbuilder.wait_for_workers: got True; allowed: integer >= 0 or null",
        f"{bad}: distributed: unknown key; allowed keys here: catalogbuilder, jobqueue"]
    ordered = write(tmp_path / "ordered.yaml", "catalogbuilder: {kind: local, adapt: {minimum: 4, maximum: 3}}\n")
    with pytest.raises(ConfigError, match=r"catalogbuilder.adapt.minimum: got 4; allowed: at most maximum \(3\)"):
        ClusterSettings.load(ordered)


def test_a_bad_cluster_yaml_exits_2_from_dask_submit_and_every_stage(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path / "bad.yaml", "catalogbuilder: {kind: kubernetes}\n")
    line = (f"{bad}: catalogbuilder.kind: got 'kubernetes'; allowed: one of local, local-gpu, slurm, pbs, "
            "slurm-runner (default: the name of the single jobqueue section)")
    workflow = write(tmp_path / "wf.py", "def main(client, argv):\n    return 0\n")
    SpectrumStore.open(tmp_path / "store", create=True)
    assert submit.main([str(workflow), "--cluster", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"dask-submit: {line}"
    for command in (["infer", "--store", str(tmp_path / "store"), "--model", "anet3-cannon-demo"],
                    ["release", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "release")]):
        assert cli.main([*command, "--cluster", str(bad)]) == 2
        assert capsys.readouterr().err.strip().endswith(line)


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "jobqueue: {slurm: {cores: 4}}\n")
    done = subprocess.run([sys.executable, "-m", "catalogbuilder.submit", str(WORKFLOWS / "dr19.py"), "--cluster",
                           str(bad)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"dask-submit: {bad}: jobqueue.slurm: got {{'cores': 4}}; allowed: keyword "
                                   "arguments of dask-jobqueue's slurm cluster, including cores and memory")


@pytest.mark.parametrize(("argv", "status", "stdout"), [
    (["--help"], 0, "help"), (["--version"], 0, "version"), (["bogus"], 2, ""),
    (["infer", "--store", "missing-store", "--model", "anet3-cannon-demo"], 2, ""),
])
def test_the_console_script_exits_promptly_with_its_status_and_whole_output(tmp_path: Path, argv: list[str],
                                                                            status: int, stdout: str) -> None:
    """``python -m catalogbuilder.cli`` ends through ``exit_after`` (no interpreter teardown): the exit status of the
    command or of argparse, and its output delivered whole into a pipe (block-buffered, flushed before the exit)."""
    done = subprocess.run([sys.executable, "-m", "catalogbuilder.cli", *argv], capture_output=True, text=True,
                          check=False, timeout=120, cwd=tmp_path)
    assert done.returncode == status, done.stderr
    expected = {"help": cli.build_parser().format_help(), "version": f"catalogbuilder {__version__}\n", "": ""}[stdout]
    assert done.stdout == expected
    if status:
        assert done.stderr.strip().splitlines()[-1].startswith(("catalogbuilder: error", "catalogbuilder infer: no"))


def test_the_prompt_exit_runs_exit_handlers_and_finalizers(tmp_path: Path) -> None:
    """What libraries leave for the end of the process (atexit handlers, weakref.finalize callbacks such as a Dask
    scheduler removing its scheduler file) still runs before the prompt exit, and the status is the command's."""
    code = ("import atexit, weakref; from pathlib import Path; from catalogbuilder.cli import exit_after\n"
            "class Owner: pass\n"
            "owner = Owner()\n"
            f"weakref.finalize(owner, Path({str(tmp_path / 'finalized')!r}).touch)\n"
            f"atexit.register(Path({str(tmp_path / 'handled')!r}).touch)\n"
            "exit_after(lambda: print('done') or 3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 3 and done.stdout == "done\n", done.stderr
    assert (tmp_path / "finalized").exists() and (tmp_path / "handled").exists()


def test_the_infer_command_does_not_load_the_fits_readers() -> None:
    """`catalogbuilder infer` imports neither the readers nor astropy (0.2-0.3 s of every run): only ingest reads FITS."""
    code = ("import sys; import catalogbuilder.cli, catalogbuilder.inference.graph, catalogbuilder.store;"
            "catalogbuilder.cli.build_parser();"
            "print(sorted(m for m in sys.modules if m.startswith(('astropy', 'catalogbuilder.readers'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"



def test_parsing_a_command_line_and_hashing_weights_import_no_torch() -> None:
    """Building the parser (every command, ``--help``) and hashing a model's weights import no torch (~1.3 s), so
    ``infer`` hashes the weights on a second core while it imports torch."""
    code = ("import sys; import catalogbuilder.cli, catalogbuilder.models.weight_files;"
            "catalogbuilder.cli.build_parser();"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"

# --- model info (catalogbuilder.yaml) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(path.name for path in SHIPPED_MODELS_DIR.iterdir() if path.is_dir()))
def test_every_shipped_model_info_parses(name: str) -> None:
    info = ModelInfo.read(SHIPPED_MODELS_DIR / name)
    assert info.name == name and info.directory == SHIPPED_MODELS_DIR / name
    assert "training" in info.extra  # family keys are kept
    assert all(low < high for low, high in info.domain.values())


def test_official_model_folders_without_model_info_get_defaults(conformance_dir: Path) -> None:
    for folder in ("apogee_small", "boss_small"):
        assert not (conformance_dir / folder / MODEL_INFO_FILE).exists()
        settings = ModelInfoSettings.read(conformance_dir / folder)
        assert (settings.name, settings.family, settings.grid, settings.domain, settings.extra) == (
            folder, "bossnet", None, {}, {})


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"name": ESCAPE}, "name: got '../../escape'; allowed: one folder name"),
        ({"name": ".hidden"}, "name: got '.hidden'; allowed: one folder name"),
        ({"name": "a/b"}, "name: got 'a/b'; allowed: one folder name"),
        ({"name": 7}, "name: got 7; allowed: one folder name"),
        ({"grid": "Infra Red"}, "grid: got 'Infra Red'; allowed: an ingest grid (apogee, optical), or a model's own"),
        ({"grid": "infrared"}, "grid_wavelengths: got None; allowed: absent for the ingest grids (apogee, optical) and "
                               "for no grid; given for any other grid name ('infrared')"),
        ({"grid": "optical-wide", "grid_wavelengths": {"base": "apogee", "start": 3650, "stop": 9300, "pixels": 2825}},
         "grid_wavelengths.base: got 'apogee'; allowed: optical"),
        ({"grid": "optical-wide", "grid_wavelengths": {"base": "optical", "start": 3650, "step": 1.0, "pixels": 2825}},
         "grid_wavelengths.spacing: got {'base': 'optical', 'spacing': 'linear', 'start': 3650.0, 'step': 1.0, "),
        ({"domain": {"teff": [7000, 4000]}}, "domain.teff: got [7000, 4000]; allowed: [low, high] with low < high"),
        ({"domain": {"teff": [4000]}}, "domain.teff: got [4000]; allowed: [low, high] with low < high"),
        ({"domain": {"teff": [4000, "hot"]}}, "domain.teff[1]: got 'hot'; allowed: number"),
        ({"domain": {"feh": [-1, 0]}}, "domain.feh: unknown key; allowed keys here: one of teff, logg, fe_h, rv"),
        ({"description": ["a"]}, "description: got ['a']; allowed: string"),
    ],
)
def test_bad_model_info_is_refused_where_it_is_read(tmp_path: Path, change: dict, line: str) -> None:
    folder = escaping_model(SHIPPED_MODELS_DIR / "bossnet-lamost-demo", tmp_path / "model")
    info = yaml.safe_load((folder / MODEL_INFO_FILE).read_text()) | {"name": "fine"} | change
    (folder / MODEL_INFO_FILE).write_text(yaml.safe_dump(info))
    with pytest.raises(ConfigError) as error:
        load_model(folder)
    assert len(problems(error)) == 1 and problems(error)[0].startswith(f"{folder / MODEL_INFO_FILE}: {line}")


def test_an_unknown_family_and_an_unsafe_folder_name_are_refused(tmp_path: Path) -> None:
    folder = write(tmp_path / "m" / MODEL_INFO_FILE, "family: bossnett\n").parent
    with pytest.raises(ConfigError, match=r"m/catalogbuilder.yaml: family: got 'bossnett'; allowed: one of .*bossnet"):
        load_model(folder)
    unnamed = tmp_path / "my model"
    unnamed.mkdir()
    with pytest.raises(ConfigError, match="name: got 'my model'; allowed: one folder name"):
        ModelInfo.read(unnamed)  # the folder name is the default name; a `name:` key fixes it
    assert model_name("bossnet-v1.0+lamost_dr7") == "bossnet-v1.0+lamost_dr7"
    with pytest.raises(ValueError):
        model_name("..")


def test_infer_refuses_an_escaping_model_name(tmp_path: Path, scheduler_address: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = escaping_model(SHIPPED_MODELS_DIR / "anet3-cannon-demo", tmp_path / "work" / "model")
    store = tmp_path / "work" / "store"
    SpectrumStore.open(store, create=True)
    assert cli.main(["infer", "--store", str(store), "--model", str(folder), "--address", scheduler_address]) == 2
    assert capsys.readouterr().err.strip() == f"catalogbuilder infer: {escape_line(folder)}"
    assert not any(path.name == "escape" for path in tmp_path.rglob("*")) and not (store / "results").exists()


def test_photometric_refuses_an_escaping_model_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = escaping_model(SHIPPED_MODELS_DIR / "sos-photometric-demo", tmp_path / "model")
    sources = tmp_path / "sources.csv"
    pd.DataFrame({"object_id": ["a"], "ra": [10.0], "dec": [-5.0], "tmass_j": [10.9], "tmass_h": [10.4],
                  "tmass_k": [10.3], "phot_g_mean_mag": [12.3], "parallax": [0.5], "parallax_error": [0.03]}
                 ).to_csv(sources, index=False)
    out = tmp_path / "release" / "out"
    assert cli.main(["photometric", "--input", str(sources), "--model", str(folder), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"catalogbuilder photometric: {escape_line(folder)}"
    assert not (tmp_path / "release").exists() and not (tmp_path / "escape").exists()


def test_the_workflow_refuses_an_escaping_model_name_before_any_work(tmp_path: Path) -> None:
    dr19 = pipeline
    spectral = escaping_model(SHIPPED_MODELS_DIR / "bossnet-lamost-demo", tmp_path / "spectral")
    photometric = escaping_model(SHIPPED_MODELS_DIR / "sos-photometric-demo", tmp_path / "photometric")
    write(tmp_path / "sources.csv", "object_id,ra,dec\n")
    config = WorkflowSettings.load(write(tmp_path / "site.yaml", yaml.safe_dump({"models": {"optical": ["spectral"]}})))
    with pytest.raises(ConfigError) as error:
        dr19.check_models(config)
    assert problems(error) == [f"models.optical: {escape_line(spectral)}"]
    config = WorkflowSettings.load(write(tmp_path / "site.yaml", yaml.safe_dump(
        {"photometric": {"input": "sources.csv", "model": "photometric"}})))
    with pytest.raises(ConfigError) as error:
        dr19.check_models(config)
    assert problems(error) == [f"photometric.model: {escape_line(photometric)}"]
