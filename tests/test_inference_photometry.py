"""Inference of a spectrum + photometry model (APOGEE Net II, random-initialised) on the real apStar spectra of
../shared/data with the cross-match of the real astroNN APOGEE x Gaia DR2 table: values equal a direct
``model.predict`` with the same photometry and seeds, rows lacking Gaia BP/RP are marked and the release flags them."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster

from catalogbuilder.cli import main as catalogbuilder_main
from catalogbuilder.constants import ResultFlag
from catalogbuilder.crossmatch.match import band_completeness, crossmatch
from catalogbuilder.inference import graph
from catalogbuilder.inference import photometry as phot
from catalogbuilder.calibrate.flags import FlagThresholds
from catalogbuilder.inference.graph import ChunkTask
from catalogbuilder.models.apogeenet import METADATA_KEYS, write_initialised_model
from catalogbuilder.models.montecarlo import spectrum_seed
from catalogbuilder.models.registry import load_model
from catalogbuilder.release.assemble import model_rows
from catalogbuilder.store import SpectrumStore
from catalogbuilder.store.results import STATUS_NO_RESULT, STATUS_OK, value_columns

DRAWS, SEED = 2, 5
MAX_BATCH = DRAWS  # one spectrum per forward pass, in the graph and in the direct call: identical float arithmetic
VALUES = value_columns(("teff", "logg", "fe_h"))
TOLERANCE = 1e-6  # the brief: bit-identical or within 1e-6 (absolute, in the columns' units)
STAR_WITH_BP_RP = "2M19485057+5005279"  # the test gives this star BP/RP (the astroNN table has none)
# Test-made BP/RP (mag) for STAR_WITH_BP_RP: plausible for its G = 12.61 and 2MASS colours; not a catalogue value.
GIVEN_BP, GIVEN_RP = 13.15, 11.92


N_PREDICTED = 5  # the two apStar files hold 7 spectra; apStar rows 1 are stored but never predicted


def run_inference(client: Client, store_path: Path, model: Path, **options: object) -> graph.InferenceReport:
    """The stage function on the store at ``store_path``."""
    return graph.run_inference(client, SpectrumStore.open(store_path), model, **options)


def predicted_columns(store_path: Path) -> pd.DataFrame:
    """Every store column of the store's predicted APOGEE spectra (apStar rows 1 are not), in store order."""
    columns = SpectrumStore.open(store_path).columns("apogee")
    return columns.loc[columns["kind"] != "combined-alt"]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    torch.set_num_threads(1)
    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
          Client(cluster) as dask_client):
        yield dask_client


@pytest.fixture(scope="module")
def net2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An APOGEE Net II model directory with random weights (the published weights do not ship)."""
    directory = tmp_path_factory.mktemp("net2") / "net2-test"
    write_initialised_model(directory, "apogeenet2", seed=0)
    return directory


@pytest.fixture(scope="module")
def crossmatch_table(ingested_store: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`catalogbuilder crossmatch` of the store against the astroNN table (parallax and G; no BP/RP)."""
    out = tmp_path_factory.mktemp("xmatch") / "crossmatch.parquet"
    catalog = shared_data / "gaia" / "astroNN_gaiadr2_apogeedr14_parallax.npz"
    argv = ["crossmatch", "--store", str(ingested_store), "--out", str(out), "--catalog", str(catalog),
            "--column", "phot_g_mean_mag=g"]
    assert catalogbuilder_main(argv) == 0
    table = pd.read_parquet(out)
    assert table["gaia_matched"].all() and table["missing_bands"].eq("phot_bp_mean_mag,phot_rp_mean_mag").all()
    return out


@pytest.fixture(scope="module")
def completed_table(crossmatch_table: Path, ingested_store: Path) -> Path:
    """The cross-match with BP/RP given to the spectra of STAR_WITH_BP_RP (so they have every band)."""
    table = pd.read_parquet(crossmatch_table)
    spectra = predicted_columns(ingested_store)
    star = table["spectrum_id"].isin(spectra.loc[spectra["source_id"] == STAR_WITH_BP_RP, "spectrum_id"])
    assert star.sum() == 1
    table.loc[star, "phot_bp_mean_mag"] = GIVEN_BP
    table.loc[star, "phot_rp_mean_mag"] = GIVEN_RP
    table["n_bands"], table["missing_bands"] = band_completeness(table)
    out = crossmatch_table.with_name("crossmatch-completed.parquet")
    table.to_parquet(out, index=False)
    return out


def store_inputs(store_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """(spectrum ids, flux, error, header 2MASS J/H/K) of the store's predicted APOGEE spectra, in store order."""
    columns = predicted_columns(store_path)
    ids = columns["spectrum_id"].astype(str).to_numpy()
    header = pd.DataFrame({band: columns[band].to_numpy(float) for band in ("tmass_j", "tmass_h", "tmass_k")}, index=ids)
    pixels = SpectrumStore.open(store_path).pixels("apogee", columns.index.to_numpy())
    return ids, pixels["flux"].astype(np.float32), pixels["error"].astype(np.float32), header


def direct_predict(store_path: Path, model_dir: Path, photometry: pd.DataFrame) -> pd.DataFrame:
    """``model.predict`` on every spectrum with ``photometry`` (rows = spectrum ids, columns = metadata keys);
    value columns and ``missing_photometry`` indexed by spectrum id."""
    ids, flux, error, _ = store_inputs(store_path)
    model = load_model(model_dir, max_batch=MAX_BATCH)
    seeds = np.array([spectrum_seed(spectrum_id, SEED) for spectrum_id in ids])
    given = {key: photometry.loc[ids, key].to_numpy() for key in photometry.columns}
    predicted = model.predict(flux, error, draws=DRAWS, seeds=seeds, photometry=given)
    frame = pd.DataFrame({name: predicted[name] for name in VALUES}, index=ids)
    frame["missing_photometry"] = predicted["missing_photometry"].astype(float)
    return frame.sort_index()


def table_photometry(path: Path) -> pd.DataFrame:
    """The metadata keys of a cross-match table, by spectrum id (2MASS there is the header's already)."""
    return pd.read_parquet(path).set_index("spectrum_id")[list(METADATA_KEYS)]


def model_results(store_path: Path, model_dir: Path) -> pd.DataFrame:
    """The release view of the model's results, indexed by spectrum id."""
    return SpectrumStore.open(store_path).results.read(model_dir.name).set_index("spectrum_id").sort_index()


def missing_photometry_bit(store_path: Path, matches: pd.DataFrame) -> pd.Series:
    """Per spectrum id: is MISSING_PHOTOMETRY set in the release tables built from the results and ``matches``."""
    spectra = predicted_columns(store_path)
    results = SpectrumStore.open(store_path).results.read()
    rows = model_rows(str(results["model_name"].iloc[0]), str(results["weights_sha256"].iloc[0]), spectra, results,
                      matches, "2026-12-01T00:00:00+00:00", FlagThresholds())
    assert len(rows) == len(spectra) == N_PREDICTED
    return pd.Series((rows["result_flags"].to_numpy() & int(ResultFlag.MISSING_PHOTOMETRY)) != 0,
                     index=rows["spectrum_id"].to_numpy()).sort_index()


def test_net2_on_the_crossmatch_equals_a_direct_predict_and_the_release_flags_it(
    client: Client, store: Path, net2: Path, crossmatch_table: Path
) -> None:
    report = run_inference(client, store, net2, draws=DRAWS, seed=SEED, max_batch=MAX_BATCH, spectra_per_task=3,
                           progress=False, photometry=crossmatch_table)
    assert (report.n_ok, report.n_no_result, report.failed_chunks) == (N_PREDICTED, 0, [])
    assert report.photometry == str(crossmatch_table.resolve()) and report.n_missing_photometry == N_PREDICTED
    assert len({chunk.worker for chunk in report.chunks}) >= 1 and len(report.chunks) == 2

    rows = model_results(store, net2)
    ids, _, _, _ = store_inputs(store)
    assert sorted(rows.index) == sorted(ids) and (rows["status"] == STATUS_OK).all()
    photometry = table_photometry(crossmatch_table)
    expected = direct_predict(store, net2, photometry)
    for name in VALUES:
        np.testing.assert_allclose(rows[name], expected[name], rtol=0, atol=TOLERANCE, err_msg=name)
    recorded = rows[phot.input_columns(METADATA_KEYS)].to_numpy()
    np.testing.assert_array_equal(recorded, photometry.loc[rows.index].to_numpy())
    assert (rows["missing_photometry"] == 1.0).all()  # no BP/RP in the astroNN table
    # the photometry reached the network: the header-only prediction differs far beyond the tolerance
    header_only = direct_predict(store, net2, store_inputs(store)[3])
    assert (np.abs(header_only["teff"] - rows["teff"]) > 100 * TOLERANCE).all()

    assert missing_photometry_bit(store, pd.read_parquet(crossmatch_table)).all()


def test_changed_photometry_recomputes_exactly_the_spectra_it_changed(
    client: Client, store: Path, net2: Path, crossmatch_table: Path, completed_table: Path
) -> None:
    options = {"draws": DRAWS, "seed": SEED, "max_batch": MAX_BATCH, "progress": False}
    run_inference(client, store, net2, photometry=crossmatch_table, **options)
    before = model_results(store, net2)

    report = run_inference(client, store, net2, photometry=completed_table, **options)
    completed = pd.read_parquet(completed_table).set_index("spectrum_id")
    changed = completed.index[completed["missing_bands"] == ""]
    assert len(changed) == 1
    assert (report.n_photometry_changed, report.n_skipped, report.n_ok, report.n_missing_photometry) == (1, 4, 1, 0)

    after = model_results(store, net2)
    expected = direct_predict(store, net2, table_photometry(completed_table))
    for name in VALUES:
        np.testing.assert_allclose(after[name], expected[name], rtol=0, atol=TOLERANCE, err_msg=name)
    np.testing.assert_array_equal(after["missing_photometry"], expected["missing_photometry"])
    assert set(after.index[after["missing_photometry"] == 0.0]) == set(changed)
    unchanged = after.index.difference(changed)
    pd.testing.assert_frame_equal(after.loc[unchanged], before.loc[unchanged][after.columns])  # not recomputed
    assert (after.loc[changed, "created"] > before.loc[changed, "created"]).all()

    flagged = missing_photometry_bit(store, pd.read_parquet(completed_table))
    assert set(flagged.index[~flagged]) == set(changed)  # flagged: exactly the rows without BP/RP

    again = run_inference(client, store, net2, photometry=completed_table, **options)
    assert (again.n_photometry_changed, again.n_skipped, again.n_computed) == (0, N_PREDICTED, 0)
    without = run_inference(client, store, net2, **options)  # no table never overwrites what a table gave
    assert (without.n_skipped, without.n_computed) == (N_PREDICTED, 0)
    pd.testing.assert_frame_equal(model_results(store, net2), after)


def test_a_parallax_net2_imputes_but_the_policy_keeps_is_flagged_in_the_release(
    client: Client, store: Path, net2: Path, completed_table: Path, tmp_path: Path
) -> None:
    """The star with every band gets a parallax of −5 mas: a measurement for the cross-match (no missing band), but
    APOGEE Net II's reference preprocessing replaces parallaxes ≤ −1 mas; the results column reaches the release
    rows, which flag MISSING_PHOTOMETRY for it (and for the others, which lack BP/RP)."""
    table = pd.read_parquet(completed_table)
    complete = table["missing_bands"] == ""
    table.loc[complete, "parallax"] = -5.0
    table["n_bands"], table["missing_bands"] = band_completeness(table)
    assert complete.sum() == 1 and (table.loc[complete, "missing_bands"] == "").all()
    path = tmp_path / "negative-parallax.parquet"
    table.to_parquet(path, index=False)
    run_inference(client, store, net2, draws=DRAWS, seed=SEED, max_batch=MAX_BATCH, progress=False, photometry=path)
    rows = model_results(store, net2)
    star = table.loc[complete, "spectrum_id"]
    assert (rows.loc[star, "input_parallax"] == -5.0).all() and (rows["missing_photometry"] == 1.0).all()
    assert missing_photometry_bit(store, table).all()


def test_without_a_table_net2_runs_on_header_2mass_and_every_row_is_marked(
    client: Client, store: Path, net2: Path, crossmatch_table: Path
) -> None:
    report = run_inference(client, store, net2, draws=DRAWS, seed=SEED, max_batch=MAX_BATCH, progress=False)
    assert report.photometry == phot.HEADER_FALLBACK and (report.n_ok, report.n_missing_photometry) == (N_PREDICTED,) * 2
    rows = model_results(store, net2)
    header = store_inputs(store)[3]
    expected = direct_predict(store, net2, header)
    for name in VALUES:
        np.testing.assert_allclose(rows[name], expected[name], rtol=0, atol=TOLERANCE, err_msg=name)
    assert (rows["missing_photometry"] == 1.0).all()
    np.testing.assert_array_equal(rows[["input_tmass_j", "input_tmass_h", "input_tmass_k"]], header.loc[rows.index])
    gaia = ["input_parallax", "input_phot_g_mean_mag", "input_phot_bp_mean_mag", "input_phot_rp_mean_mag"]
    assert rows[gaia].isna().all().all()
    spectra = predicted_columns(store)
    assert missing_photometry_bit(store, crossmatch(spectra, [])).all()  # a release without a catalog flags them too

    later = run_inference(client, store, net2, draws=DRAWS, seed=SEED, max_batch=MAX_BATCH, progress=False,
                          photometry=crossmatch_table)  # the cross-match arrives: every spectrum gains Gaia values
    assert (later.n_photometry_changed, later.n_ok) == (N_PREDICTED,) * 2


def test_a_task_reads_its_own_rows_and_falls_back_to_the_header(store: Path, crossmatch_table: Path) -> None:
    ids, _, _, header = store_inputs(store)
    subset = np.array([ids[1], ids[4], "apogee-not-in-the-table-0"])
    header_rows = pd.concat([header.loc[ids[[1, 4]]], pd.DataFrame({"tmass_j": [9.5], "tmass_h": [np.nan],
                                                                    "tmass_k": [8.9]}, index=[subset[2]])])
    inputs = phot.gather_inputs(crossmatch_table, subset, header_rows.reset_index(drop=True), METADATA_KEYS)
    assert list(inputs.index) == list(subset) and list(inputs.columns) == list(METADATA_KEYS)
    table = table_photometry(crossmatch_table)
    np.testing.assert_array_equal(inputs.loc[subset[:2]].to_numpy(), table.loc[subset[:2]].to_numpy())
    absent = inputs.loc[subset[2]]
    assert (absent["tmass_j"], absent["tmass_k"]) == (9.5, 8.9)  # header values for a spectrum the table lacks
    assert absent.drop(["tmass_j", "tmass_k"]).isna().all()


def test_bad_tables_are_refused_before_any_task(client: Client, store: Path, net2: Path, tmp_path: Path,
                                                crossmatch_table: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no photometry table"):
        run_inference(client, store, net2, photometry=tmp_path / "absent.parquet", progress=False)
    pd.DataFrame({"source": ["x"], "parallax": [1.0]}).to_parquet(tmp_path / "no_ids.parquet")
    with pytest.raises(ValueError, match="spectrum_id"):
        phot.check_photometry_table(tmp_path / "no_ids.parquet", METADATA_KEYS)
    table = pd.read_parquet(crossmatch_table)
    pd.concat([table, table.iloc[:1]]).to_parquet(tmp_path / "twice.parquet")
    with pytest.raises(ValueError, match="more than once"):
        phot.check_photometry_table(tmp_path / "twice.parquet", METADATA_KEYS)
    table.to_csv(tmp_path / "table.csv", index=False)
    with pytest.raises(ValueError, match="not readable as Parquet"):
        run_inference(client, store, net2, photometry=tmp_path / "table.csv", progress=False)
    assert not (store / "results").exists()


def test_a_failed_task_part_has_the_photometry_columns(store: Path, net2: Path) -> None:
    model = load_model(net2)
    handle = SpectrumStore.open(store)
    task = ChunkTask(handle.ref(), "apogee", (0, 2), str(net2), model.name, model.weights_sha256, model.outputs,
                     "plugin", DRAWS, SEED, 32, tuple(METADATA_KEYS), None)
    report = graph.InferenceReport(model.name, model.weights_sha256, "apogee", None, n_spectra=2, n_skipped=0)
    summary = graph._record_failed_task(handle, task, RuntimeError("worker lost"), report)
    part = pd.read_parquet(summary.part)
    assert (part["status"] == STATUS_NO_RESULT).all()
    assert set(phot.result_columns(METADATA_KEYS)) <= set(part.columns)


def test_infer_command_with_photometry(client: Client, store: Path, net2: Path, crossmatch_table: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["infer", "--store", str(store), "--model", str(net2), "--draws", "2", "--max-batch", "2",
            "--photometry", str(crossmatch_table), "--address", client.scheduler.address, "--no-progress"]
    assert catalogbuilder_main(argv) == 0
    out = capsys.readouterr().out
    assert "5 ok" in out and f"photometry: {crossmatch_table.resolve()}" in out and "5 missing photometry" in out
