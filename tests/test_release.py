"""Release tables from real-derived frames and from a real store: one row per spectrum, flags, FITS = Parquet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from catalogbuilder import __version__
from catalogbuilder.calibrate.flags import FlagThresholds
from catalogbuilder.constants import FLAG_BAD_MASK, FLAG_WARN_MASK, ResultFlag
from catalogbuilder.crossmatch.match import CatalogColumns, crossmatch, read_catalog
from catalogbuilder.release.summary import kiel_figure, summarize, write_summary
from catalogbuilder.release.tables import RELEASE_COLUMNS, assemble_release, guess_survey, write_table

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "catalogbuilder/data/sample"
SHIPPED_CATALOG = REPO / "catalogbuilder/data/catalogs/astronn_gaiadr2_apogeedr14_near_sample.ecsv"
WEIGHTS = "5" * 64
NO_RESULT = int(ResultFlag.NO_RESULT)


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> dict[str, pd.DataFrame]:
    """Spectra, results, cross-match and rejects built from 1336 real LAMOST x APOGEE stars (positions and APOGEE
    DR12 labels as the model values); S/N and raw errors are drawn, a few spectra fail in each possible way."""
    labels = Table.read(shared_data / "labels/thecannon_lamost_apogee_dr12_labels.fits")
    labels.convert_bytestring_to_unicode()
    labels = labels.to_pandas()  # native byte order
    rng = np.random.default_rng(12)
    n = len(labels)
    ids = np.array([f"lamost-{i:016x}-{i % 3}" for i in range(n)])
    kind = np.where(np.arange(n) % 10 == 0, "visit", "combined")
    spectra = pd.DataFrame({
        "spectrum_id": ids, "source_id": [name.strip() for name in labels["LAMOST_ID"]], "survey": "lamost", "kind": kind,
        "file": [f"/data/{name.strip()}" for name in labels["LAMOST_ID"]], "file_sha256": "e" * 64, "row": 0,
        "visit": np.where(kind == "visit", 1, 0), "ra": labels["RA"], "dec": labels["Dec"], "snr": rng.uniform(3, 150, n),
        "mjd": 55862.0, "grid": "optical", "good_pixel_fraction": rng.uniform(0.4, 1.0, n), "flux_constant": False,
    })
    results = pd.DataFrame({
        "spectrum_id": ids, "model_name": "bossnet", "weights_sha256": WEIGHTS, "software_version": __version__,
        "created": "2026-11-23T12:00:00+00:00", "n_draws": 20, "seed": 0, "status": "ok", "reason": "",
        "teff": labels["TEFF"], "raw_e_teff": rng.gamma(2, 30, n), "logg": labels["LOGG"], "raw_e_logg": rng.gamma(2, 0.05, n),
        "fe_h": labels["PARAM_M_H"], "raw_e_fe_h": rng.gamma(2, 0.04, n), "rv": rng.normal(0, 40, n), "raw_e_rv": rng.gamma(2, 2, n),
    })
    results.loc[:2, ["status", "reason"]] = ["no_result", "worker died"]  # failed tasks
    results.loc[:2, ["teff", "logg", "fe_h"]] = np.nan
    results.loc[3, "logg"] = np.inf  # a non-finite network output
    results = results.drop(index=[10, 11])  # never inferred
    rejects = pd.DataFrame({"file": ["/data/spec-55862-B6212_sp06-999.fits", "/data/notes.txt"], "sha256": ["a" * 64, "b" * 64],
                            "reason": ["truncated FITS", "not FITS"]})
    columns = CatalogColumns.from_mapping({"ra": "RA", "dec": "DEC", "phot_g_mean_mag": "g"})
    matches = crossmatch(spectra, [read_catalog(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz", columns)])
    return {"spectra": spectra, "results": results, "matches": matches, "rejects": rejects}


@pytest.fixture(scope="module")
def tables(frames: dict[str, pd.DataFrame]) -> list:
    return assemble_release(frames["spectra"], frames["results"], frames["matches"], frames["rejects"], created="2026-11-23T13:00:00+00:00")


def test_one_row_per_input_spectrum_including_failures(frames: dict, tables: list) -> None:
    assert {(t.survey, t.level) for t in tables} == {("lamost", "allStar"), ("lamost", "allVisit"), ("unknown", "allStar")}
    released = pd.concat([t.rows for t in tables], ignore_index=True)
    reject_ids = {"lamost-" + "a" * 16 + "-reject", "unknown-" + "b" * 16 + "-reject"}
    assert not released["spectrum_id"].duplicated().any()
    assert set(released["spectrum_id"]) == set(frames["spectra"]["spectrum_id"]) | reject_ids
    by_id = released.set_index("spectrum_id")
    failed = list(frames["spectra"]["spectrum_id"][[0, 1, 2, 3, 10, 11]]) + sorted(reject_ids)
    assert (by_id.loc[failed, "result_flags"] & NO_RESULT).all() and by_id.loc[failed, "flag_bad"].all()
    assert by_id.loc[failed, ["teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h", "rv", "raw_e_teff"]].isna().all().all()
    assert by_id.loc[failed[0], "reason"] == "worker died"
    assert by_id.loc[failed[4], "reason"] == "no result for this model"
    assert by_id.loc[min(reject_ids), "reason"] == "rejected at ingest: truncated FITS"
    assert (by_id.loc[failed, "weights_sha256"] == WEIGHTS).all()
    visits = next(t for t in tables if t.level == "allVisit").rows
    assert (visits["kind"] == "visit").all() and len(visits) == (frames["spectra"]["kind"] == "visit").sum()


def test_flags_are_consistent_with_the_values(tables: list) -> None:
    rows = pd.concat([t.rows for t in tables], ignore_index=True)
    flags = rows["result_flags"].to_numpy(np.int64)
    has = {bit: (flags & int(bit)) != 0 for bit in ResultFlag}
    no_value = ~np.isfinite(rows[["teff", "logg", "fe_h"]]).all(axis=1).to_numpy()
    assert np.array_equal(has[ResultFlag.NO_RESULT], no_value)
    with np.errstate(invalid="ignore"):
        log_teff = np.log10(rows["teff"].to_numpy())
        assert np.array_equal(has[ResultFlag.TEFF_UNRELIABLE], ~no_value & ~((log_teff > 3.1) & (log_teff < 4.7)))
        hot_or_out = (log_teff > 3.82) | ~((rows["fe_h"] > -2) & (rows["fe_h"] < 0.5)).to_numpy()
        assert np.array_equal(has[ResultFlag.FE_H_UNRELIABLE], ~no_value & hot_or_out)
        assert np.array_equal(has[ResultFlag.E_LOGG_LARGE], ~no_value & (rows["e_logg"] > 0.3).to_numpy())
        assert np.array_equal(has[ResultFlag.E_TEFF_LARGE], ~no_value & (rows["e_teff"] > 0.05 * rows["teff"]).to_numpy())
    assert np.array_equal(has[ResultFlag.MISSING_PHOTOMETRY], (rows["missing_bands"] != "").to_numpy())
    assert np.array_equal(has[ResultFlag.RESULT_UNRELIABLE], ((rows["snr"] < 10) | (rows["good_pixel_fraction"] < 0.5)).to_numpy())
    assert np.array_equal(rows["flag_warn"], (flags & int(FLAG_WARN_MASK)) != 0)
    assert np.array_equal(rows["flag_bad"], (flags & int(FLAG_BAD_MASK)) != 0)
    ok = ~no_value
    assert np.allclose(rows.loc[ok, "e_teff"], 1.25 * rows.loc[ok, "raw_e_teff"] + 10)
    assert np.allclose(rows.loc[ok, "e_fe_h"], rows.loc[ok, "raw_e_fe_h"] + 0.01)
    assert np.allclose(rows.loc[ok, "e_rv"], rows.loc[ok, "raw_e_rv"])
    assert 1200 < (rows["gaia_sep_arcsec"] < 1).sum() <= 1336  # LAMOST positions of APOGEE stars match the DR14 table


def test_rows_sorted_and_rebuild_is_identical(frames: dict, tables: list) -> None:
    shuffled = {name: frame.sample(frac=1.0, random_state=5) for name, frame in frames.items()}
    again = assemble_release(shuffled["spectra"], shuffled["results"], shuffled["matches"], shuffled["rejects"],
                             created="2026-11-23T13:00:00+00:00")
    for first, second in zip(tables, again):
        assert first.rows["spectrum_id"].is_monotonic_increasing
        pd.testing.assert_frame_equal(first.rows, second.rows)


def test_fits_and_parquet_hold_the_same_table(tables: list, tmp_path: Path) -> None:
    table = next(t for t in tables if t.level == "allStar" and t.survey == "lamost")
    provenance = {"created": "2026-11-23T13:00:00+00:00", "radius_arcsec": "1.0", "catalogs": "astroNN.npz"}
    fits_path, parquet_path = write_table(table, tmp_path, FlagThresholds(), provenance)
    assert fits_path == tmp_path / "lamost/bossnet/allStar-bossnet-lamost.fits.gz" and parquet_path.suffix == ".parquet"
    with fits.open(fits_path) as hdul:
        hdul.verify("exception")  # standard-conforming FITS (what TOPCAT and fitsverify expect)
        header = hdul[1].header
        assert header["MODEL"] == "bossnet" and header["WEIGHTS"] == WEIGHTS and header["SOFTVER"] == __version__
        assert header["CREATED"] == provenance["created"] and header["NROWS"] == len(table.rows)
        assert [header[f"FLAG{bit:02d}"].split(":")[0] for bit in range(12)] == [b.name for b in ResultFlag]
        assert header["CALIB1"] == "e_teff = 1.25*raw_e_teff + 10" and header["FLAGBAD"] == int(FLAG_BAD_MASK)
        units = {column.name: column.unit for column in hdul[1].columns}
        assert units["teff"] == "K" and units["ra"] == "deg" and units["rv"] == "km s-1" and units["gaia_sep_arcsec"] == "arcsec"
        logg_index = [column.name for column in hdul[1].columns].index("logg") + 1
        assert units["logg"] is None and header[f"TCOMM{logg_index}"].startswith("[dex]")
        assert all(column.format[-1] in "AKDL" for column in hdul[1].columns)  # fixed-width strings, no objects
    from_fits = Table.read(fits_path, hdu=1, mask_invalid=False).to_pandas()
    from_parquet = pd.read_parquet(parquet_path)
    assert list(from_fits.columns) == list(from_parquet.columns) == [name for name, _, _ in RELEASE_COLUMNS]
    assert len(from_fits) == len(from_parquet) == len(table.rows)
    for name in from_parquet.columns:
        left, right = from_fits[name], from_parquet[name]
        if name == "gaia_source_id":
            assert left.isna().equals(right.isna())
        elif right.dtype.kind == "f":
            assert np.allclose(left, right, equal_nan=True, rtol=0, atol=0), name
        else:
            assert list(left.astype(str).str.rstrip()) == list(right.astype(str)), name


def test_summary_counts_and_kiel_diagram(tables: list, tmp_path: Path) -> None:
    summary = summarize(tables)
    assert summary["rows"].sum() == sum(len(t.rows) for t in tables)
    lamost = summary.set_index(["survey", "level"]).loc[("lamost", "allStar")]
    star_rows = next(t.rows for t in tables if t.survey == "lamost" and t.level == "allStar")
    assert lamost["NO_RESULT"] == ((star_rows["result_flags"] & NO_RESULT) != 0).sum()
    assert lamost["flag_bad"] == star_rows["flag_bad"].sum()
    figure = kiel_figure(tables, "bossnet")
    axes = figure.axes[0]
    assert axes.xaxis_inverted() and axes.yaxis_inverted()
    grey, coloured = axes.collections[:2]
    rows = pd.concat([t.rows for t in tables])
    plotted = np.isfinite(rows["teff"]) & np.isfinite(rows["logg"])
    assert len(grey.get_offsets()) == (plotted & rows["flag_bad"]).sum()
    assert len(coloured.get_offsets()) == (plotted & ~rows["flag_bad"]).sum() > 1000
    written = write_summary(tables, tmp_path)
    assert (tmp_path / "kiel-bossnet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(written) == 3


def test_rejected_files_go_to_the_table_of_their_survey() -> None:
    assert guess_survey("/x/apStar-dr17-2M19485057+5005279.fits") == "apogee"
    assert guess_survey("spec-3586-55181-0500.fits") == "boss"
    assert guess_survey("spPlate-4055-55359-0020.fits") == "boss"
    assert guess_survey("spec-57287-KP193637N444141V03_sp10-161.fits.gz") == "lamost"
    assert guess_survey("broken.bin") == "unknown"


def test_release_from_a_real_store(conformance_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    """Ingest the shipped sample (plus an unreadable spPlate), infer with the two small reference models, release."""
    import torch
    from distributed import Client, LocalCluster

    from catalogbuilder.cli import main
    from catalogbuilder.inference.graph import run_inference
    from catalogbuilder.store.spectra import SpectrumStore

    torch.set_num_threads(1)
    store_path = tmp_path / "store"
    files = sorted(str(p) for p in SAMPLE.rglob("*.fits*")) + [str(shared_data / "boss/spPlate-4055-55359-0020.fits")]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        SpectrumStore.open(store_path).ingest(files, client=client, progress=False)
        for model in ("apogee_small", "boss_small"):
            run_inference(client, store_path, conformance_dir / model, draws=3, progress=False)
    out = tmp_path / "release"
    assert main(["release", "--store", str(store_path), "--out", str(out), "--catalog", str(SHIPPED_CATALOG)]) == 0
    store = SpectrumStore.open(store_path)
    stored = set()
    for grid in ("apogee", "optical"):
        stored |= set(store.dataset(grid)["spectrum_id"].values.astype(object))
    released = pd.concat([pd.read_parquet(p) for p in sorted(out.rglob("*.parquet")) if p.name != "crossmatch.parquet"])
    assert set(released["spectrum_id"]) == stored | {"boss-" + store.rejects()["sha256"][0][:16] + "-reject"}
    assert not released["spectrum_id"].duplicated().any()
    by_id = released.set_index("spectrum_id")
    zero_row = next(s for s in stored if s.startswith("apogee") and s.endswith("-1"))  # apStar row 1 is entirely 0
    assert by_id.loc[zero_row, "result_flags"] & int(ResultFlag.RESULT_UNRELIABLE) and by_id.loc[zero_row, "good_pixel_fraction"] == 0
    apogee = by_id.loc[by_id["survey"] == "apogee"]
    assert (apogee["gaia_sep_arcsec"] < 0.01).all() and apogee["phot_g_mean_mag"].notna().all()
    assert (out / "apogee/apogee_small/allVisit-apogee_small-apogee.fits.gz").is_file()
    assert (out / "lamost/boss_small/allStar-boss_small-lamost.parquet").is_file()
    assert "rv" in pd.read_parquet(out / "boss/boss_small/allStar-boss_small-boss.parquet").columns
    assert {"kiel-apogee_small.png", "kiel-boss_small.png", "summary.csv", "crossmatch.parquet"} <= {p.name for p in out.iterdir()}
    assert main(["release", "--store", str(store_path), "--out", str(out), "--threshold", "snr_max=3"]) == 2
    matches_path = tmp_path / "matches.parquet"
    assert main(["crossmatch", "--store", str(store_path), "--out", str(matches_path), "--catalog", str(SHIPPED_CATALOG)]) == 0
    matches = pd.read_parquet(matches_path)
    assert set(matches["spectrum_id"]) == stored and set(matches.loc[matches["gaia_matched"], "spectrum_id"]) == set(apogee.index)
    assert main(["crossmatch", "--store", str(store_path), "--out", str(matches_path), "--column", "gmag"]) == 2


def test_release_of_a_store_without_results_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from catalogbuilder.cli import main
    from catalogbuilder.store.spectra import SpectrumStore

    SpectrumStore.open(tmp_path / "empty")
    assert main(["release", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "holds no results" in capsys.readouterr().err


def test_non_ascii_text_is_escaped_in_fits_and_kept_in_parquet(tmp_path: Path) -> None:
    """FITS holds ASCII only: a reject reason with 'Å' (as the LAMOST MRS reason has) or a non-ASCII path is written
    escaped, while the Parquet table keeps the text unchanged."""
    from astropy.table import Table

    from catalogbuilder.release.tables import fits_ready

    table = fits_ready(Table({"reason": np.array(["6500 Å arm", "ok"], dtype=object), "file": ["/data/Ångström.fits", "/d/a.fits"]}))
    assert list(table["reason"]) == ["6500 \\xc5 arm", "ok"] and table["file"][0] == "/data/\\xc5ngstr\\xf6m.fits"
    path = tmp_path / "t.fits"
    table.write(path)
    assert Table.read(path)["reason"][0] == "6500 \\xc5 arm"
