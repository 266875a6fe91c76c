"""The dr19 workflow end to end on the shipped sample: release tables with one row per star (allStar) and per visit
(allVisit) and consistent flags, identical values on a rerun with the same seed, an incremental run equal to a full
run, a change of weights recomputing exactly that model's rows, and a worker killed during inference changing
nothing."""
from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from astropy.table import Table
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from catalogbuilder.config import WorkflowSettings
from catalogbuilder.constants import ERROR_CALIBRATION, FLAG_BAD_MASK, FLAG_WARN_MASK, ResultFlag
from catalogbuilder.crossmatch.cache import MatchCache, MatchConfig
from catalogbuilder.config import resolve_model_dir, shipped_models
from catalogbuilder.models.weights import load_state_dict, save_state_dict
from catalogbuilder.pipeline import run_workflow
from catalogbuilder.release.build import read_table
from catalogbuilder.store import SpectrumStore, expand_inputs
from catalogbuilder.submit import load_workflow

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "catalogbuilder" / "data" / "sample"
SAMPLE_FOLDERS = ("apogee", "boss", "lamost/dr1", "lamost/dr6_dr7")
SHIPPED_CATALOG = REPO_ROOT / "catalogbuilder" / "data" / "catalogs" / "astronn_gaiadr2_apogeedr14_near_sample.ecsv"
TEST_DRAWS = 4
TIMESTAMP_COLUMNS = ["created"]  # the only columns allowed to differ between runs of the same inputs and seed


def sample_files() -> list[str]:
    """Every FITS file of the shipped sample, in the default config's order."""
    return expand_inputs([SAMPLE_DIR / folder for folder in SAMPLE_FOLDERS]).paths


@pytest.fixture(scope="module")
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Private copies of the models of workflows/dr19.yaml when they are shipped, else of the conformance models of
    ../shared (skipped when absent); copies, so that a test may change their weights."""
    with open(REPO_ROOT / "workflows" / "dr19.yaml") as handle:
        defaults: dict[str, list[str]] = yaml.safe_load(handle)["models"]
    if not all(name in shipped_models() for names in defaults.values() for name in names):
        conformance: Path = request.getfixturevalue("conformance_dir")
        defaults = {"apogee": [str(conformance / "apogee_small")], "optical": [str(conformance / "boss_small")]}
    folder = tmp_path_factory.mktemp("models")
    return {
        grid: [shutil.copytree(resolve_model_dir(name), folder / Path(name).name).as_posix() for name in names]
        for grid, names in defaults.items()
    }


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """Two single-threaded worker processes (killable, restarted by their nannies)."""
    torch.set_num_threads(1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def write_config(folder: Path, inputs: list[str], models: dict[str, list[str]], **extra: Any) -> Path:
    """A workflow YAML in ``folder`` that writes ``folder/store`` and ``folder/out``."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {"inputs": inputs, "store": str(folder / "store"), "output": str(folder / "out"), "models": models,
                "draws": TEST_DRAWS, "seed": 0, "catalogs": [str(SHIPPED_CATALOG)], **extra}
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run(client: Client, config_path: Path) -> Any:
    """Run the pipeline on ``client`` with a config file, without progress bars."""
    return run_workflow(client, WorkflowSettings.load(config_path, {"progress": False}))


def read_tables(output: Path) -> dict[str, pd.DataFrame]:
    """Every release table under ``output`` (its Parquet parts together), by its stem (survey/model/name)."""
    stems = sorted({str(part.parent.relative_to(output)) for part in output.glob("*/*/*/part-*.parquet")})
    return {stem: read_table(output, stem) for stem in stems}


def assert_same_tables(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame],
                       ignore: list[str] = TIMESTAMP_COLUMNS) -> None:
    """The same tables with the same rows and values in every column except ``ignore``."""
    assert left and sorted(left) == sorted(right)
    for name, table in left.items():
        pd.testing.assert_frame_equal(table.drop(columns=ignore), right[name].drop(columns=ignore),
                                      check_exact=True, obj=name)


@pytest.fixture(scope="module")
def full_run(client: Client, models: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One complete run over the whole shipped sample: (its folder, its WorkflowResult)."""
    folder = tmp_path_factory.mktemp("full")
    result = run(client, write_config(folder, sample_files(), models))
    return folder, result


def test_release_has_one_row_per_spectrum_and_the_products(full_run: tuple[Path, Any]) -> None:
    folder, result = full_run
    output = folder / "out"
    assert result.ingest.rejected == [] and result.failed_tasks == 0
    store = SpectrumStore.open(folder / "store")
    tables = read_tables(output)
    by_model: dict[str, list[pd.DataFrame]] = {}
    for name, table in tables.items():
        survey, model, stem = name.split("/")
        assert stem in {f"allStar-{model}-{survey}", f"allVisit-{model}-{survey}"}
        assert (table["survey"] == survey).all() and table["spectrum_id"].is_unique
        if stem.startswith("allStar"):
            assert (table["kind"] == "combined").all() and table["source_id"].is_unique, "one row per star"
        fits_rows = Table.read(output / f"{name}.fits.gz")
        assert list(fits_rows["spectrum_id"]) == list(table["spectrum_id"])
        by_model.setdefault(model, []).append(table)
    for report in result.inference:
        rows = pd.concat(by_model[report.model_name], ignore_index=True)
        columns = store.columns(report.grid, ("spectrum_id", "kind"))
        predicted = set(columns.loc[columns["kind"] != "combined-alt", "spectrum_id"].astype(str))
        assert set(rows["spectrum_id"]) == predicted, "every predicted spectrum of the model's grid is released"
        assert report.n_ok + report.n_no_result == len(predicted)
    assert {report.grid for report in result.inference} == {"apogee", "optical"}
    for model in by_model:
        assert (output / f"kiel-{model}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "summary.json").is_file()


def test_flags_are_consistent_with_values(full_run: tuple[Path, Any]) -> None:
    rows = pd.concat(read_tables(full_run[0] / "out").values(), ignore_index=True)
    flags = rows["result_flags"].to_numpy(np.int64)

    def has(bit: ResultFlag) -> np.ndarray:
        return (flags & int(bit)) != 0

    assert np.array_equal(rows["flag_warn"].to_numpy(bool), (flags & int(FLAG_WARN_MASK)) != 0)
    assert np.array_equal(rows["flag_bad"].to_numpy(bool), (flags & int(FLAG_BAD_MASK)) != 0)
    no_result = has(ResultFlag.NO_RESULT)
    assert np.array_equal(no_result, ~np.isfinite(rows[["teff", "logg", "fe_h"]]).all(axis=1).to_numpy())
    assert np.array_equal(no_result, (rows["status"] != "ok").to_numpy())
    result = rows.loc[~no_result]
    log_teff = np.log10(result["teff"].to_numpy())
    bits = result["result_flags"].to_numpy(np.int64)
    assert np.array_equal((bits & int(ResultFlag.TEFF_UNRELIABLE)) != 0, ~((log_teff > 3.1) & (log_teff < 4.7)))
    logg = result["logg"].to_numpy()
    assert np.array_equal((bits & int(ResultFlag.LOGG_UNRELIABLE)) != 0, ~((logg > -1.5) & (logg < 6)))
    fe_h = result["fe_h"].to_numpy()
    assert np.array_equal((bits & int(ResultFlag.FE_H_UNRELIABLE)) != 0, ~((fe_h > -2) & (fe_h < 0.5)) | (log_teff > 3.82))
    for label, (scale, offset) in ERROR_CALIBRATION.items():
        np.testing.assert_allclose(result[f"e_{label}"], scale * result[f"raw_e_{label}"] + offset, rtol=1e-12)
        positive = np.isfinite(result[f"raw_e_{label}"]) & (result[f"raw_e_{label}"] > 0)
        unreliable = (bits & int(ResultFlag[f"E_{label.upper()}_UNRELIABLE"])) != 0
        assert np.array_equal(unreliable, ~positive.to_numpy())
    assert (result["n_draws"] == TEST_DRAWS).all()
    assert np.array_equal(has(ResultFlag.MISSING_PHOTOMETRY), (rows["missing_bands"] != "").to_numpy())
    apogee_stars = rows.loc[(rows["survey"] == "apogee") & (rows["kind"] == "combined")]
    assert (apogee_stars["xmatch_catalog"] == SHIPPED_CATALOG.name).all(), "the shipped catalog covers the APOGEE sample"
    assert (apogee_stars["gaia_sep_arcsec"] < 1.0).all() and np.isfinite(apogee_stars["parallax"]).all()


def test_rerun_with_the_same_seed_gives_identical_tables(
    client: Client, models: dict[str, list[str]], full_run: tuple[Path, Any], tmp_path: Path
) -> None:
    again = run(client, write_config(tmp_path, sample_files(), models))
    assert again.ingest.spectra_added == full_run[1].ingest.spectra_added
    assert_same_tables(read_tables(full_run[0] / "out"), read_tables(tmp_path / "out"))


def test_rerun_in_place_recomputes_nothing(client: Client, full_run: tuple[Path, Any], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(full_run[0], tmp_path / "copy"))
    config = yaml.safe_load((folder / "workflow.yaml").read_text())
    config_path = write_config(folder, config["inputs"], config["models"])
    before = read_tables(folder / "out")
    result = run(client, config_path)
    assert result.ingest.spectra_added == 0 and len(result.ingest.skipped) == len(sample_files())
    assert all(report.n_computed == 0 and report.n_skipped == report.n_spectra for report in result.inference)
    assert_same_tables(before, read_tables(folder / "out"), ignore=[])  # not even a timestamp changes


def test_incremental_run_equals_full_run(
    client: Client, models: dict[str, list[str]], full_run: tuple[Path, Any], tmp_path: Path
) -> None:
    files = sample_files()
    first, rest = files[::2], files[1::2]
    config_path = write_config(tmp_path, first, models)
    first_result = run(client, config_path)
    assert first_result.ingest.files_added == len(first)
    incremental = load_workflow(REPO_ROOT / "workflows" / "incremental.py")
    status = incremental(client, [*rest, "--config", str(config_path), "--no-progress"])
    assert status == 0
    results = SpectrumStore.open(tmp_path / "store").results.read()
    assert not results.duplicated(["model_name", "spectrum_id"]).any(), "no spectrum was predicted twice"
    info = SpectrumStore.open(tmp_path / "store").info()
    assert len(results) == info["total_spectra"] - info["grids"]["apogee"]["by_survey_kind"]["apogee/combined-alt"]
    assert_same_tables(read_tables(full_run[0] / "out"), read_tables(tmp_path / "out"))


class KillWorkerOnInference(SchedulerPlugin):
    """Scheduler plugin: SIGKILLs the worker process that is handed the ``nth`` inference task (test only)."""

    name = "kill-worker-on-inference"

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.seen = 0
        self.killed: list[str] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "processing" or not str(key).startswith("infer-"):
            return
        self.seen += 1
        if self.seen == self.nth and not self.killed:
            worker = self.scheduler.tasks[key].processing_on
            os.kill(worker.pid, signal.SIGKILL)
            self.killed.append(str(key))


def test_killed_worker_does_not_change_the_tables(
    client: Client, models: dict[str, list[str]], full_run: tuple[Path, Any], tmp_path: Path
) -> None:
    client.register_plugin(KillWorkerOnInference(nth=2))
    plugin = client.cluster.scheduler.plugins[KillWorkerOnInference.name]  # the scheduler runs in this process
    try:
        result = run(client, write_config(tmp_path, sample_files(), models, inference={"spectra_per_task": 3}))
    finally:
        client.unregister_scheduler_plugin(KillWorkerOnInference.name)
    assert plugin.killed, "a worker was killed while it held an inference task"
    assert result.failed_tasks == 0
    client.wait_for_workers(2)
    assert_same_tables(read_tables(full_run[0] / "out"), read_tables(tmp_path / "out"))


def test_new_weights_recompute_exactly_that_models_rows(
    client: Client, models: dict[str, list[str]], full_run: tuple[Path, Any], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(full_run[0], tmp_path / "copy"))
    changed = Path(shutil.copytree(models["optical"][0], tmp_path / Path(models["optical"][0]).name))
    state, old_sha = load_state_dict(changed)
    first_weight = next(name for name, tensor in state.items() if tensor.is_floating_point() and tensor.ndim > 1)
    state[first_weight] = state[first_weight] * 1.01
    new_sha = save_state_dict(state, changed)
    assert new_sha != old_sha
    new_models = {"apogee": models["apogee"], "optical": [str(changed)]}
    before = read_tables(folder / "out")
    result = run(client, write_config(folder, sample_files(), new_models))
    reports = {report.grid: report for report in result.inference}
    assert reports["apogee"].n_computed == 0 and reports["apogee"].n_skipped == reports["apogee"].n_spectra
    assert reports["optical"].n_skipped == 0 and reports["optical"].n_computed == reports["optical"].n_spectra
    after = read_tables(folder / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        if name.split("/")[1] == reports["apogee"].model_name:
            pd.testing.assert_frame_equal(before[name], after[name], obj=name)  # untouched, timestamps included
        else:
            assert (after[name]["weights_sha256"] == new_sha).all()
            assert list(after[name]["spectrum_id"]) == list(before[name]["spectrum_id"])
            assert not np.allclose(after[name]["teff"], before[name]["teff"], equal_nan=True)


def test_an_unreadable_file_becomes_a_no_result_row(client: Client, models: dict[str, list[str]], tmp_path: Path) -> None:
    broken = tmp_path / "spec-0266-51602-0099.fits"  # a BOSS file name with bytes that are not FITS
    broken.write_bytes(b"SIMPLE  =  not really a FITS file" * 100)
    boss = sorted(str(path) for path in (SAMPLE_DIR / "boss").glob("spec-*.fits"))
    result = run(client, write_config(tmp_path / "run", [*boss, str(broken)], models))
    assert [path for path, _ in result.ingest.rejected] == [str(broken)]
    tables = read_tables(tmp_path / "run" / "out")
    stars = pd.concat([table for name, table in tables.items() if "/allStar-" in name], ignore_index=True)
    # the boss stars, and the unrecognisable file once in the "unknown" table of each model (no survey covers it)
    assert len(stars) == len(boss) + len(result.inference)
    failed = stars.loc[stars["file"] == str(broken)].iloc[0]
    assert failed["survey"] == "unknown"
    assert failed["status"] == "no_result" and failed["result_flags"] & int(ResultFlag.NO_RESULT)
    assert failed["flag_bad"] and "rejected at ingest" in failed["reason"] and np.isnan(failed["teff"])


def test_photometry_models_run_after_a_cross_match(client: Client, tmp_path: Path) -> None:
    """A workflow listing APOGEE Net II (spectrum + Gaia/2MASS input) cross-matches before inferring: the model sees
    the catalog's parallax and G and the header 2MASS, and the release flags the missing BP/RP."""
    from catalogbuilder.models.apogeenet import write_initialised_model

    net2 = tmp_path / "apogeenet2-random"
    write_initialised_model(net2, "apogeenet2", seed=3)
    apstar = [str(path) for path in sorted((SAMPLE_DIR / "apogee").glob("apStar-*.fits"))]
    folder = tmp_path / "net2"
    result = run(client, write_config(folder, apstar, {"apogee": [str(net2)]}))
    assert not result.failed_tasks
    store = SpectrumStore.open(folder / "store")
    matches = MatchCache(store, MatchConfig((str(SHIPPED_CATALOG),))).read("apogee")  # the run's one cross-match
    results = store.results.read(net2.name).merge(matches.drop(columns="position"), on="spectrum_id")
    assert len(results) == len(matches) > 0 and (results["status"] == "ok").all()
    assert results["gaia_matched"].all(), "the shipped catalog holds the sample's APOGEE stars"
    np.testing.assert_array_equal(results["input_parallax"], results["parallax"])
    np.testing.assert_array_equal(results["input_phot_g_mean_mag"], results["phot_g_mean_mag"])
    np.testing.assert_array_equal(results["input_tmass_h"], results["tmass_h"])
    assert results["input_phot_bp_mean_mag"].isna().all() and (results["missing_photometry"] == 1).all()
    table = pd.concat(read_tables(folder / "out").values())
    assert ((table["result_flags"] & int(ResultFlag.MISSING_PHOTOMETRY)) != 0).all()


def test_photometric_stage_runs_in_the_workflow(client: Client, shared_data: Path, tmp_path: Path) -> None:
    """`photometric.input` adds the photometric stage: real APOKASC stars (no spectra) get their own release table,
    one row per input row, next to the spectroscopic tables."""
    apokasc = Table.read(shared_data / "labels" / "sdss_apogee__data_apokasc_APOKASC_Catalog.v7.1.fits")[:40]
    sources = tmp_path / "apokasc40.fits"
    apokasc.write(sources)
    apstar = [str(path) for path in sorted((SAMPLE_DIR / "apogee").glob("apStar-*.fits"))]
    folder = tmp_path / "phot"
    models = {"apogee": ["anet3-cannon-demo"]}
    result = run(client, write_config(folder, apstar, models, photometric={"input": str(sources)}))
    assert result.photometric_table is not None and result.photometric_table.is_file()
    table = pd.read_parquet(result.photometric_table)
    assert len(table) == len(apokasc) and table["model_name"].eq("sos-photometric-demo").all()
    assert np.isfinite(table.loc[table["status"] == "ok", "teff"]).all() and (table["status"] == "ok").sum() > 30
    assert Table.read(result.photometric_table.with_suffix("").with_suffix(".fits.gz")).colnames[:2] == list(table.columns[:2])
