"""dask-submit (argument splitting, workflow loading, exit status, script mode), the dr19 YAML (defaults, paths,
errors), incremental's guard, and the README's main command `dask-submit workflows/dr19.py` from a clean folder."""
from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from astropy.table import Table
from distributed import LocalCluster

from catalogbuilder import submit
from catalogbuilder.models.registry import shipped_models

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO_ROOT / "workflows"
SAMPLE_DIR = REPO_ROOT / "catalogbuilder" / "data" / "sample"

ECHO_WORKFLOW = textwrap.dedent(
    """
    def cube(x):
        return x ** 3

    def main(client, argv):
        total = sum(client.gather(client.map(cube, range(4))))  # cube runs on the workers
        print("ECHO", total, argv, flush=True)
        return int(argv[0]) if argv and argv[0].isdigit() else 0
    """
)


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """An in-process scheduler with one worker thread, for workflows connected with --address."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def dr19():
    return submit.import_workflow(WORKFLOWS / "dr19.py")


@pytest.mark.parametrize(
    ("argv", "ours", "theirs"),
    [
        (["wf.py", "--config", "c.yaml", "--draws", "4"], {}, ["--config", "c.yaml", "--draws", "4"]),
        (["wf.py", "--cluster", "x.yaml", "--seed", "1"], {"cluster": "x.yaml"}, ["--seed", "1"]),
        (["--address", "tcp://h:1", "wf.py", "a", "--", "--workers", "3"], {"address": "tcp://h:1"}, ["a", "--workers", "3"]),
        (["wf.py", "--workers=2", "--runner", "slurm", "--out", "o"], {"workers": 2, "runner": "slurm"}, ["--out", "o"]),
        (["wf.py", "--work", "1"], {"workers": None}, ["--work", "1"]),  # no abbreviations of our options
    ],
)
def test_arguments_are_split_between_dask_submit_and_the_workflow(argv: list[str], ours: dict, theirs: list[str]) -> None:
    args, workflow_argv = submit.split_arguments(submit.build_parser(), argv)
    assert args.workflow == "wf.py"
    assert {key: getattr(args, key) for key in ours} == ours
    assert workflow_argv == theirs


def test_cluster_options_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        submit.split_arguments(submit.build_parser(), ["wf.py", "--cluster", "a.yaml", "--address", "tcp://h:1"])


def test_dask_submit_runs_main_on_the_cluster_and_returns_its_status(tmp_path: Path, cluster_address: str) -> None:
    workflow = tmp_path / "echo.py"
    workflow.write_text(ECHO_WORKFLOW)
    status = submit.main([str(workflow), "--address", cluster_address, "7", "--", "--flag"])
    assert status == 7


def test_dask_submit_console_script_with_a_local_cluster(tmp_path: Path) -> None:
    workflow = tmp_path / "echo.py"
    workflow.write_text(ECHO_WORKFLOW)
    done = subprocess.run(["dask-submit", str(workflow), "--workers", "1", "3", "x"], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert "ECHO 36 ['3', 'x']" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 3


def test_the_workflow_keeps_its_own_file_path(tmp_path: Path, cluster_address: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The in-process scheduler imports the uploaded copy of the file; main must still see the original path."""
    workflow = _write(tmp_path / "where.py", "def main(client, argv):\n    print('FILE', __file__)\n")
    assert submit.main([workflow, "--address", cluster_address]) == 0
    assert f"FILE {workflow}" in capsys.readouterr().out


def test_a_workflow_file_runs_as_a_script_too(tmp_path: Path, cluster_address: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    entry = submit.load_workflow(_write(tmp_path / "echo.py", ECHO_WORKFLOW))
    assert submit.script_main(entry, ["--address", cluster_address, "0", "y"], prog="echo.py") == 0
    assert "ECHO 36 ['0', 'y']" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("nomain.py", "x = 1\n", "defines no main"),
        ("bad-name.py", "def main(client, argv):\n    return 0\n", "named like a module"),
        ("notes.txt", "", "named like a module"),
    ],
)
def test_a_file_that_is_not_a_workflow_is_refused(tmp_path: Path, name: str, text: str, message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        submit.main([_write(tmp_path / name, text)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_workflow_help_needs_no_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        submit.main([str(WORKFLOWS / "incremental.py"), "--", "--help"])
    assert exit_info.value.code == 0
    assert "usage: incremental [-h]" in capsys.readouterr().out


def test_a_missing_workflow_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        submit.main(["no/such/workflow.py"])
    assert "workflow file not found" in capsys.readouterr().err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_default_config_is_the_shipped_sample_models_and_catalog(tmp_path: Path) -> None:
    module = dr19()
    config = module.load_config(module.DEFAULT_CONFIG, cwd=tmp_path)
    assert [Path(entry) for entry in config.inputs] == [
        SAMPLE_DIR / folder for folder in ("apogee", "boss", "lamost/dr1", "lamost/dr6_dr7")
    ]
    assert all(Path(entry).is_dir() for entry in config.inputs)
    assert config.output == tmp_path / "catalog-output" and config.store == tmp_path / "catalog-output" / "store"
    assert config.models == {"apogee": ("anet3-payne-demo",), "optical": ("bossnet-lamost-demo",)}
    assert [Path(catalog).name for catalog in config.catalogs] == ["astronn_gaiadr2_apogeedr14_near_sample.ecsv"]
    assert all(Path(catalog).is_file() for catalog in config.catalogs)
    assert (config.draws, config.seed, config.radius_arcsec) == (20, 0, 1.0)


def test_default_models_are_shipped() -> None:
    module = dr19()
    config = module.load_config(module.DEFAULT_CONFIG)
    assert {name for names in config.models.values() for name in names} <= set(shipped_models())
    module.check_models(config)  # each loads and predicts on the grid it is listed under


def test_command_line_overrides_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = dr19()
    args = module.build_parser().parse_args(["--inputs", "night1", "@new.txt", "--draws", "4", "--seed", "9",
                                             "--output", "rel", "--no-progress"])
    config = module.config_from_args(args)
    assert config.inputs == (str(tmp_path / "night1"), f"@{tmp_path / 'new.txt'}")
    assert (config.draws, config.seed, config.output, config.progress) == (4, 9, tmp_path / "rel", False)
    assert config.store == tmp_path / "catalog-output" / "store"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nights": []}, "unknown workflow keys"),
        ({"inference": {"gpus": 1}}, "unknown inference keys"),
        ({"models": {"infrared": ["m"]}}, "models must map model grids"),
        ({"survey": "gaia"}, "survey must be one of"),
        ({"inference": {"device": "tpu"}}, "inference.device"),
        ({"store": None}, "store (a folder) is required"),
        ({"draws": -1}, "draws must be >= 0"),
        ({"inputs": [3]}, "inputs must be a list of strings"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, change: dict, message: str) -> None:
    module = dr19()
    document = yaml.safe_load(module.DEFAULT_CONFIG.read_text()) | change
    with pytest.raises(module.WorkflowConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module.parse_config(document, base=tmp_path, cwd=tmp_path)


def test_a_model_listed_under_the_wrong_grid_is_refused(conformance_dir: Path, tmp_path: Path) -> None:
    module = dr19()
    document = yaml.safe_load(module.DEFAULT_CONFIG.read_text()) | {"models": {"optical": [str(conformance_dir / "apogee_small")]}}
    config = module.parse_config(document, base=WORKFLOWS, cwd=tmp_path)
    with pytest.raises(module.WorkflowConfigError, match="predicts on the 'apogee' grid, listed under 'optical'"):
        module.check_models(config)


def test_model_folders_are_relative_to_the_yaml(tmp_path: Path) -> None:
    module = dr19()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine").mkdir()
    document = {"store": "s", "output": "o", "models": {"apogee": ["models/mine", "anet3-payne-demo"]}}
    config = module.parse_config(document, base=tmp_path, cwd=tmp_path)
    assert config.models["apogee"] == (str(tmp_path / "models" / "mine"), "anet3-payne-demo")


def test_incremental_needs_an_existing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    incremental = submit.import_workflow(WORKFLOWS / "incremental.py")
    assert incremental.main(None, [str(SAMPLE_DIR / "boss")]) == 2  # refused before the client is used
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "catalog-output").exists()


def test_readme_main_command_from_a_clean_folder(tmp_path: Path) -> None:
    """`dask-submit workflows/dr19.py` with the default config: shipped sample, shipped models, shipped catalog,
    written under ./catalog-output/ of the folder it runs in (fewer draws to keep the test short)."""
    done = subprocess.run(
        ["dask-submit", str(WORKFLOWS / "dr19.py"), "--workers", "2", "--", "--draws", "4", "--no-progress"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    output = tmp_path / "catalog-output"
    printed = done.stdout
    tables = sorted(output.glob("*/*/*.fits.gz"))
    assert tables and all(str(path) in printed for path in tables)
    kiel = sorted(output.glob("kiel-*.png"))
    assert {path.name for path in kiel} == {"kiel-anet3-payne-demo.png", "kiel-bossnet-lamost-demo.png"}
    assert all(f"Kiel diagram: {path}" in printed for path in kiel)
    rows = sum(len(Table.read(path)) for path in tables)
    spectra = sum(int(line.split("added ")[1].split()[0]) for line in printed.splitlines() if "  added " in line)
    assert rows == spectra > 0
