"""``store regrid`` on the shipped real optical spectra: a derived grid filled from the store's native pixels equals
the FITS files interpolated onto it, reproduces the ingest grid bit for bit, grows incrementally and survives an
ingest committing in between."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from catalogbuilder.constants import GRID_OPTICAL, GRID_SPECS
from catalogbuilder.readers import read_spectra
from catalogbuilder.readers.base import interpolate_onto
from catalogbuilder.store import SpectrumStore, StoreError
from catalogbuilder.store import regrid as regrid_module
from catalogbuilder.store.layout import derived_grid
from catalogbuilder.store.regrid import regrid, regrid_positions
from catalogbuilder.store.resample import survey_mask

SAMPLE = Path(__file__).resolve().parents[1] / "catalogbuilder" / "data" / "sample"
FIRST = sorted((SAMPLE / "lamost" / "dr1").glob("spec-*.fits"))[:5]
LATER = [*sorted((SAMPLE / "boss").glob("spec-*.fits")), *sorted((SAMPLE / "lamost" / "dr6_dr7").glob("spec-*"))]
WIDE = derived_grid("optical-wide", GRID_OPTICAL, start=3650.0, stop=9300.0, pixels=2825)


@pytest.fixture(scope="module")
def first_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("regrid") / "store"
    report = SpectrumStore.open(path, create=True).ingest(FIRST, progress=False)
    assert report.added[GRID_OPTICAL] == len(FIRST)
    return path


@pytest.fixture
def store(first_store: Path, tmp_path: Path) -> SpectrumStore:
    return SpectrumStore.open(shutil.copytree(first_store, tmp_path / "store"))


def expected_on(spec, paths: list[Path]) -> dict[str, np.ndarray]:
    """The files read again and interpolated onto ``spec`` here, independently of the store."""
    rows = []
    for path in paths:
        for spectrum in read_spectra(path):
            rows.append(interpolate_onto(np.asarray(spectrum.wavelength, np.float32),
                                         np.asarray(spectrum.flux, np.float32), np.asarray(spectrum.error, np.float32),
                                         survey_mask(spectrum).astype(np.int64), spec.wavelength(), spec.no_coverage))
    return {name: np.stack(values) for name, values in zip(("flux", "error", "mask"), zip(*rows))}


def test_a_derived_grid_with_the_ingest_wavelengths_reproduces_the_ingest_arrays_bit_for_bit(store) -> None:
    same = derived_grid("optical-copy", GRID_OPTICAL, start=3800.0, stop=8900.0, pixels=3900)
    report = regrid(store, same, progress=False)
    assert (report.added, report.total, report.of, report.commits) == (5, 5, 5, 1)
    positions = np.arange(5)
    ingest, copy = store.pixels(GRID_OPTICAL, positions), store.pixels("optical-copy", positions)
    for name in ("flux", "error", "mask"):
        assert copy[name].dtype == ingest[name].dtype
        np.testing.assert_array_equal(copy[name], ingest[name])
    assert store.check() == []


def test_a_wider_grid_equals_the_files_interpolated_onto_it(store) -> None:
    regrid(store, WIDE, progress=False)
    stored = store.pixels("optical-wide", np.arange(5))
    expected = expected_on(WIDE, FIRST)
    for name in ("flux", "error", "mask"):
        np.testing.assert_array_equal(stored[name], expected[name])
    outside = WIDE.wavelength() < 3700  # LAMOST starts near 3700 Å: edge values held, flagged as not covered
    assert (stored["mask"][:, outside] & WIDE.no_coverage).all()
    dataset = store.dataset("optical-wide")
    np.testing.assert_array_equal(dataset["wavelength"].values, WIDE.wavelength().astype(np.float64))
    assert store.grid_spec("optical-wide") == WIDE and store.base_grid("optical-wide") == GRID_OPTICAL
    assert store.grids() == [GRID_OPTICAL] and list(store.derived_grids()) == ["optical-wide"]
    # the derived grid's spectra are the base grid's: same columns at the same positions
    columns = ["spectrum_id", "source_id", "active", "snr"]
    assert store.columns("optical-wide", columns).equals(store.columns(GRID_OPTICAL, columns))
    info = store.info()
    assert info["derived_grids"]["optical-wide"]["spectra"] == info["derived_grids"]["optical-wide"]["of"] == 5
    assert info["total_spectra"] == 5  # a derived grid adds no spectra
    assert store.check() == []


def test_regrid_is_incremental_and_a_rerun_does_nothing(store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regrid_module, "REGRID_TASK_SPECTRA", 2)  # several tasks and commits on a small sample
    monkeypatch.setattr(regrid_module, "COMMIT_SPECTRA", 2)
    assert regrid(store, WIDE, progress=False).commits == 3
    before = store.pixels("optical-wide", np.arange(5))
    added = store.ingest(LATER, progress=False).added[GRID_OPTICAL]
    assert store.length("optical-wide") == 5 and store.length(GRID_OPTICAL) == 5 + added
    assert store.columns("optical-wide").index.tolist() == list(range(5))  # only what is regridded so far
    report = regrid(store, WIDE, progress=False)
    assert (report.added, report.total, report.of) == (added, 5 + added, 5 + added)
    after = store.pixels("optical-wide", np.arange(5 + added))
    expected = expected_on(WIDE, [*FIRST, *LATER])
    for name in ("flux", "error", "mask"):
        np.testing.assert_array_equal(after[name][:5], before[name])
        np.testing.assert_array_equal(after[name], expected[name])
    assert regrid(store, WIDE, progress=False).added == 0
    assert store.check() == []


def test_a_regrid_commit_lands_on_top_of_an_ingest_committed_meanwhile(store) -> None:
    writer = store.writer()  # a regrid session opened before the ingest below commits
    writer.append_spectra(regrid_positions(store.ref(), WIDE, 0, 5), WIDE)
    added = store.ingest(LATER, progress=False).added[GRID_OPTICAL]
    writer.commit("regrid", {}, rebase=True)
    assert store.length(GRID_OPTICAL) == 5 + added and store.length("optical-wide") == 5
    assert store.check() == []


def test_a_grid_name_holds_one_set_of_wavelengths(store) -> None:
    regrid(store, WIDE, progress=False)
    other = derived_grid("optical-wide", GRID_OPTICAL, start=3650.0, stop=9300.0, pixels=2000)
    with pytest.raises(StoreError, match="already holds a grid 'optical-wide' with other wavelengths"):
        regrid(store, other, progress=False)
    with pytest.raises(ValueError, match="has no grid 'optical-narrow'.*store regrid"):
        store.grid_spec("optical-narrow")


def test_only_grids_with_native_pixels_can_be_derived_and_names_stay_clear_of_the_store_groups() -> None:
    with pytest.raises(ValueError, match="base 'apogee' keeps no native pixels"):
        derived_grid("apogee-wide", "apogee", start=4.17, step=6e-6, pixels=9000, spacing="log-linear")
    for name in ("optical", "files", "optical_native", "Optical Wide"):
        with pytest.raises(ValueError, match="grid name"):
            derived_grid(name, GRID_OPTICAL, start=3800.0, stop=8900.0, pixels=100)
    assert GRID_SPECS[GRID_OPTICAL].base is None and WIDE.mask_dtype == GRID_SPECS[GRID_OPTICAL].mask_dtype


def test_regrid_on_dask_workers_equals_the_serial_one(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, LocalCluster

    monkeypatch.setattr(regrid_module, "REGRID_TASK_SPECTRA", 2)
    serial = SpectrumStore.open(shutil.copytree(store.path, tmp_path / "serial"))
    regrid(serial, WIDE, progress=False)
    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
          Client(cluster) as client):
        assert regrid(store, WIDE, client=client, progress=False).added == 5
    for name, values in store.pixels("optical-wide", np.arange(5)).items():
        np.testing.assert_array_equal(values, serial.pixels("optical-wide", np.arange(5))[name])


# --- a model on its own grid: infer asks for the regrid, predicts there, the release lists it ------------------------
def wide_model(folder: Path) -> Path:
    """The shipped optical demo model declared on WIDE (its weights run on any length: the network pools adaptively)."""
    from catalogbuilder.config import SHIPPED_MODELS_DIR

    shutil.copytree(SHIPPED_MODELS_DIR / "bossnet-lamost-demo", folder, ignore=shutil.ignore_patterns("training_report"))
    info = yaml.safe_load((folder / "catalogbuilder.yaml").read_text())
    info.update(name="lamost-demo-wide", grid=WIDE.name,
                grid_wavelengths={"base": WIDE.base, "start": WIDE.start, "stop": WIDE.stop, "pixels": WIDE.pixels})
    (folder / "catalogbuilder.yaml").write_text(yaml.safe_dump(info))
    return folder


def test_a_model_on_its_own_grid_is_regridded_inferred_and_released(store, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from catalogbuilder.cli import main
    from catalogbuilder.config import ConfigError, WorkflowSettings
    from catalogbuilder.models.montecarlo import NativeSpectra, spectrum_seed
    from catalogbuilder.models.registry import describe_model, load_model
    from catalogbuilder.pipeline import check_models

    model = wide_model(tmp_path / "wide")
    assert describe_model(model).grid_spec == WIDE and load_model(model).grid_spec == WIDE
    infer = ["infer", "--store", str(store.path), "--model", str(model), "--draws", "3", "--workers", "1",
             "--no-progress"]
    assert main(infer) == 2
    assert f"catalogbuilder store regrid {store.path} --model {model}" in capsys.readouterr().err
    assert main(["store", "regrid", str(store.path), "--model", str(model), "--no-progress"]) == 0
    assert "5 spectra regridded from optical" in capsys.readouterr().out
    assert main(["store", "regrid", str(store.path), "--model", "bossnet-lamost-demo"]) == 2  # an ingest grid
    assert "nothing to regrid" in capsys.readouterr().err
    assert main(infer) == 0
    assert "5 ok" in capsys.readouterr().out

    # the stored results equal the model run here on the FITS files interpolated onto its grid, same seeds
    results = store.results.read("lamost-demo-wide").set_index("spectrum_id")
    ids = store.columns(GRID_OPTICAL, ("spectrum_id",))["spectrum_id"].astype(str).tolist()
    spectra = [spectrum for path in FIRST for spectrum in read_spectra(path)]
    direct = load_model(model).predict(expected_on(WIDE, FIRST)["flux"], None, draws=3,
                                       seeds=[spectrum_seed(i, 0) for i in ids],
                                       native=NativeSpectra.from_spectra(spectra))
    for name in ("teff", "logg", "fe_h", "rv", "raw_e_teff", "noiseless_teff"):
        np.testing.assert_allclose(results.loc[ids, name], direct[name], rtol=1e-5, err_msg=name)
    assert (results["grid"] == WIDE.name).all()

    # the release reads the spectra's columns and cross-match from the base grid
    out = tmp_path / "release"
    assert main(["release", "--store", str(store.path), "--out", str(out), "--no-progress", "--no-fits"]) == 0
    from catalogbuilder.release.build import read_table

    table = read_table(out, "lamost/lamost-demo-wide/allVisit-lamost-demo-wide-lamost")
    assert sorted(table["spectrum_id"]) == sorted(ids) and np.isfinite(table["teff"]).all()

    # the workflow takes it under its base grid and refuses it elsewhere
    listed = check_models(WorkflowSettings.model_validate({"models": {"optical": [str(model)]}}))
    assert listed[str(model)].grid_spec == WIDE
    with pytest.raises(ConfigError, match="predicts on the 'optical-wide' grid \\(derived from 'optical'\\), listed "
                                          "under 'apogee'"):
        check_models(WorkflowSettings.model_validate({"models": {"apogee": [str(model)]}}))


def test_the_workflow_regrids_new_spectra_before_inference(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from catalogbuilder.config import WorkflowSettings
    from catalogbuilder.pipeline import run_workflow

    model = wide_model(tmp_path / "wide")
    settings = {"store": str(tmp_path / "store"), "output": str(tmp_path / "out"), "draws": 2, "fits": False,
                "models": {"optical": [str(model)]}, "progress": False}
    with (LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
          Client(cluster) as client):
        first = run_workflow(client, WorkflowSettings.model_validate({**settings, "inputs": [str(p) for p in FIRST]}))
        later = run_workflow(client, WorkflowSettings.model_validate({**settings, "inputs": [str(p) for p in LATER]}))
    assert [report.n_ok for report in first.inference] == [5] and "regrid" in first.seconds
    store = SpectrumStore.open(tmp_path / "store")
    assert store.length("optical-wide") == store.length(GRID_OPTICAL) == 5 + later.ingest.added[GRID_OPTICAL]
    assert [report.n_ok for report in later.inference] == [later.ingest.added[GRID_OPTICAL]]  # the new spectra only
    assert store.check() == []
