"""dask-submit (argument splitting, workflow loading, exit status, script mode), the dr19 YAML (defaults, paths,
errors), incremental's guard, and the README's main command `dask-submit workflows/dr19.py` from a clean folder."""
from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from astropy.table import Table
from distributed import LocalCluster

from catalogbuilder import pipeline, submit
from catalogbuilder.config import ConfigError, WorkflowSettings
from catalogbuilder.config import shipped_models

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
        ("notes.txt", "", "a workflow is a Python file"),
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
    config = WorkflowSettings.load(WORKFLOWS / "dr19.yaml", cwd=tmp_path)
    assert [Path(entry) for entry in config.inputs] == [
        SAMPLE_DIR / folder for folder in ("apogee", "boss", "lamost/dr1", "lamost/dr6_dr7")
    ]
    assert all(Path(entry).is_dir() for entry in config.inputs)
    assert config.output == tmp_path / "catalog-output" and config.store == tmp_path / "catalog-output" / "store"
    assert config.models == {"apogee": ["anet3-cannon-demo"], "optical": ["bossnet-lamost-demo"]}
    assert [Path(catalog).name for catalog in config.catalogs] == ["astronn_gaiadr2_apogeedr14_near_sample.ecsv"]
    assert all(Path(catalog).is_file() for catalog in config.catalogs)
    assert (config.draws, config.seed, config.radius_arcsec) == (20, 0, 1.0)


def test_default_models_are_shipped() -> None:
    config = WorkflowSettings.load(WORKFLOWS / "dr19.yaml")
    assert {name for names in config.models.values() for name in names} <= set(shipped_models())
    pipeline.check_models(config)  # each loads and predicts on the grid it is listed under


def test_command_line_overrides_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = pipeline.build_parser("dr19", "", WORKFLOWS / "dr19.yaml")
    args = parser.parse_args(["--inputs", "night1", "@new.txt", "--draws", "4", "--seed", "9", "--output", "rel",
                              "--no-progress", "--no-fits"])
    config = pipeline.config_from_args(args)
    assert config.fits is False
    assert config.inputs == [str(tmp_path / "night1"), f"@{tmp_path / 'new.txt'}"]
    assert (config.draws, config.seed, config.output, config.progress) == (4, 9, tmp_path / "rel", False)
    assert config.store == tmp_path / "catalog-output" / "store"


def test_a_bad_command_line_value_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert submit.load_workflow(WORKFLOWS / "dr19.py")(None, ["--draws", "-1"]) == 2  # refused before the client is used
    assert capsys.readouterr().err.strip() == "dr19: command line: draws: got -1; allowed: integer >= 0"


def test_a_model_listed_under_the_wrong_grid_is_refused(conformance_dir: Path, tmp_path: Path) -> None:
    module = pipeline
    config = WorkflowSettings.model_validate({"models": {"optical": [str(conformance_dir / "apogee_small")]}})
    with pytest.raises(ConfigError, match="models.optical: model .* predicts on the 'apogee' grid, listed under 'optical'"):
        module.check_models(config)


def test_incremental_needs_an_existing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    incremental = submit.load_workflow(WORKFLOWS / "incremental.py")
    assert incremental(None, [str(SAMPLE_DIR / "boss")]) == 2  # refused before the client is used
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
    assert tables and all(f"{str(path).removesuffix('.fits.gz')}/ (Parquet parts + .fits.gz)" in printed for path in tables)
    kiel = sorted(output.glob("kiel-*.png"))
    assert {path.name for path in kiel} == {"kiel-anet3-cannon-demo.png", "kiel-bossnet-lamost-demo.png"}
    assert all(f"Kiel diagram: {path}" in printed for path in kiel)
    stars = sum(len(Table.read(path)) for path in tables if "/allStar-" in str(path))
    # one allStar row per star: the 10 LAMOST and 2 BOSS spectra are different stars, the apStar dwarf one more
    assert stars == 13
    assert (output / "manifest.json").is_file() and "rejected 0 files" in printed
