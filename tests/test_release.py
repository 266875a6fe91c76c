"""Release rows from real-derived frames (one row per spectrum and model, flags, one allStar row per star) and a
release built from a real store (tables per survey and level, FITS = Parquet, manifest, summary, incremental)."""
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
from catalogbuilder.release import assemble
from catalogbuilder.release.build import read_table, table_parts
from catalogbuilder.release.schema import RV_COLUMNS, SPECTRAL_COLUMNS
from catalogbuilder.release.summary import kiel_figure, table_counts
from catalogbuilder.release.writer import read_manifest, verify_release

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "catalogbuilder/data/sample"
SHIPPED_CATALOG = REPO / "catalogbuilder/data/catalogs/astronn_gaiadr2_apogeedr14_near_sample.ecsv"
WEIGHTS = "5" * 64
NO_RESULT = int(ResultFlag.NO_RESULT)
CREATED = "2026-11-23T13:00:00+00:00"


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> dict[str, pd.DataFrame]:
    """Spectra, results, cross-match and rejects built from 1336 real LAMOST x APOGEE stars (positions and APOGEE
    DR12 labels as the model values); S/N and raw errors are drawn, a few spectra fail in each possible way, and every
    fifth star has a second, later spectrum."""
    labels = Table.read(shared_data / "labels/thecannon_lamost_apogee_dr12_labels.fits")
    labels.convert_bytestring_to_unicode()
    labels = labels.to_pandas()  # native byte order
    rng = np.random.default_rng(12)
    n = len(labels)
    ids = np.array([f"lamost-{i:016x}-0" for i in range(n)])
    source = np.array([name.strip() for name in labels["LAMOST_ID"]], dtype=object)
    source[1::5] = source[::5][: len(source[1::5])]  # star 5k observed twice: rows 5k and 5k + 1
    spectra = pd.DataFrame({
        "spectrum_id": ids, "source_id": source, "survey": "lamost", "kind": "combined",
        "file_path": [f"/data/{name.strip()}" for name in labels["LAMOST_ID"]], "file_sha256": "e" * 64, "row": 0,
        "visit": 0, "ra": labels["RA"], "dec": labels["Dec"], "snr": rng.uniform(3, 150, n), "mjd": 55862.0,
        "good_pixel_fraction": rng.uniform(0.4, 1.0, n), "flux_constant": False,
    })
    results = pd.DataFrame({
        "spectrum_id": ids, "grid": "optical", "position": np.arange(n), "model_name": "bossnet",
        "weights_sha256": WEIGHTS, "software_version": __version__, "created": "2026-11-23T12:00:00+00:00",
        "n_draws": 20, "seed": 0, "status": "ok", "reason": "",
        "teff": labels["TEFF"], "raw_e_teff": rng.gamma(2, 30, n), "logg": labels["LOGG"], "raw_e_logg": rng.gamma(2, 0.05, n),
        "fe_h": labels["PARAM_M_H"], "raw_e_fe_h": rng.gamma(2, 0.04, n), "rv": rng.normal(0, 40, n), "raw_e_rv": rng.gamma(2, 2, n),
    })
    results.loc[:2, ["status", "reason"]] = ["no_result", "worker died"]  # failed tasks
    results.loc[:2, ["teff", "logg", "fe_h"]] = np.nan
    results.loc[3, "logg"] = np.inf  # a non-finite network output
    results = results.drop(index=[10, 11])  # never inferred
    rejects = pd.DataFrame({"file_path": ["/data/spec-55862-B6212_sp06-999.fits", "/data/notes.txt"],
                            "file_sha256": ["a" * 64, ""], "path_key": [1, 0xB0B], "survey": ["lamost", ""],
                            "reason": ["truncated FITS", "cannot read file: Permission denied"]})
    columns = CatalogColumns.from_mapping({"ra": "RA", "dec": "DEC", "phot_g_mean_mag": "g"})
    matches = crossmatch(spectra, [read_catalog(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz", columns)])
    return {"spectra": spectra, "results": results, "matches": matches, "rejects": rejects}


@pytest.fixture(scope="module")
def rows(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every row of the model: spectra and rejected inputs, calibrated and flagged."""
    inputs = pd.concat([frames["spectra"], assemble.reject_rows(frames["rejects"])], ignore_index=True)
    return assemble.model_rows("bossnet", WEIGHTS, inputs, frames["results"], frames["matches"], CREATED,
                               FlagThresholds())


def test_one_row_per_input_including_failures(frames: dict, rows: pd.DataFrame) -> None:
    reject_ids = {"lamost-" + "a" * 16 + "-reject", "unknown-" + f"{0xB0B:016x}" + "-reject"}
    assert not rows["spectrum_id"].duplicated().any()
    assert set(rows["spectrum_id"]) == set(frames["spectra"]["spectrum_id"]) | reject_ids
    by_id = rows.set_index("spectrum_id")
    failed = list(frames["spectra"]["spectrum_id"][[0, 1, 2, 3, 10, 11]]) + sorted(reject_ids)
    assert (by_id.loc[failed, "result_flags"] & NO_RESULT).all() and by_id.loc[failed, "flag_bad"].all()
    assert by_id.loc[failed, ["teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h", "rv", "raw_e_teff"]].isna().all().all()
    assert by_id.loc[failed[0], "reason"] == "worker died"
    assert by_id.loc[failed[4], "reason"] == "no result for this model"
    assert by_id.loc["lamost-" + "a" * 16 + "-reject", "reason"] == "rejected at ingest: truncated FITS"
    assert by_id.loc[sorted(reject_ids)[1], "survey"] == "unknown"  # not even recognised: the "unknown" tables
    assert (by_id.loc[failed, "weights_sha256"] == WEIGHTS).all()


def test_flags_are_consistent_with_the_values(rows: pd.DataFrame) -> None:
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


def test_one_allstar_row_per_star_the_highest_snr(frames: dict) -> None:
    from catalogbuilder.store.layout import star_key

    spectra = frames["spectra"]
    keys = np.array([star_key("lamost", s) for s in spectra["source_id"]], dtype=np.uint64)
    active = np.ones(len(spectra), bool)
    active[7] = False  # a superseded spectrum is never a star's row
    chosen = assemble.star_rows(keys, np.ones(len(spectra), bool), active, spectra["snr"].to_numpy())
    assert chosen.sum() == spectra.loc[active, "source_id"].nunique() and not chosen[7]
    for source, group in spectra.loc[active].groupby("source_id"):
        assert chosen[group["snr"].idxmax()], source
    levels = assemble.table_levels(spectra, chosen)
    assert levels["allVisit"].all()  # LAMOST has no star-level product: every spectrum is a visit


def test_summary_counts_and_kiel_diagram(rows: pd.DataFrame, tmp_path: Path) -> None:
    counts = table_counts(rows)
    assert counts["rows"] == len(rows) and counts["bits"]["NO_RESULT"] == ((rows["result_flags"] & NO_RESULT) != 0).sum()
    assert counts["flag_bad"] == rows["flag_bad"].sum()
    path = tmp_path / "part.parquet"
    rows[["teff", "logg", "fe_h", "flag_bad"]].to_parquet(path)
    axes = kiel_figure([path], "bossnet").axes[0]
    assert axes.xaxis_inverted() and axes.yaxis_inverted()
    grey, coloured = axes.collections[:2]
    plotted = np.isfinite(rows["teff"]) & np.isfinite(rows["logg"])
    assert len(grey.get_offsets()) == (plotted & rows["flag_bad"]).sum()
    assert len(coloured.get_offsets()) == (plotted & ~rows["flag_bad"]).sum() > 1000


def test_release_from_a_real_store(conformance_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    """Ingest the shipped sample and the real 3-visit apStar (plus an unreadable spPlate), infer with the two small
    reference models, release: one allStar row per star, visits in allVisit, FITS = Parquet, a manifest."""
    import torch
    from distributed import Client, LocalCluster

    from catalogbuilder.cli import main
    from catalogbuilder.inference.graph import run_inference
    from catalogbuilder.store import SpectrumStore

    torch.set_num_threads(1)
    store_path = tmp_path / "store"
    files = sorted(str(p) for p in SAMPLE.rglob("*.fits*")) + [
        str(shared_data / "boss/spPlate-4055-55359-0020.fits"), str(shared_data / "apogee/apStar-dr17-2M17335483-2753043.fits")]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        store = SpectrumStore.open(store_path, create=True)
        store.ingest(files, client=client, progress=False)
        for model in ("apogee_small", "boss_small"):
            run_inference(client, store, conformance_dir / model, draws=3, progress=False)
    out = tmp_path / "release"
    assert main(["release", "--store", str(store_path), "--out", str(out), "--catalog", str(SHIPPED_CATALOG),
                 "--no-progress"]) == 0
    stem = "apogee/apogee_small/{}-apogee_small-apogee"
    stars, visits = read_table(out, stem.format("allStar")), read_table(out, stem.format("allVisit"))
    assert sorted(stars["source_id"]) == ["2M17335483-2753043", "2M19485057+5005279"]  # one row per star, apStar row 0
    assert (stars["row"] == 0).all() and (stars["kind"] == "combined").all()
    assert len(visits) == 4 and (visits["kind"] == "visit").all()  # 3 apStar visit rows + the apVisit
    columns = store.columns("optical", ("spectrum_id", "source_id"))
    boss_stars = read_table(out, "boss/boss_small/allStar-boss_small-boss")
    reject = "boss-" + store.rejects()["file_sha256"][0][:16] + "-reject"
    assert reject in set(boss_stars["spectrum_id"]) and len(boss_stars) == 3  # two stars and the spPlate
    lamost_visits = read_table(out, "lamost/boss_small/allVisit-boss_small-lamost")
    assert set(lamost_visits["spectrum_id"]) == set(columns.loc[columns["spectrum_id"].str.startswith("lamost"), "spectrum_id"])
    assert "rv" in boss_stars.columns and (stars["gaia_sep_arcsec"].dropna() < 0.01).all()
    for table in ("allStar", "allVisit"):  # the single FITS file holds exactly the rows of the Parquet parts
        fits_path = out / f"{stem.format(table)}.fits.gz"
        with fits.open(fits_path) as hdul:
            hdul.verify("exception")
            header = hdul[1].header
            assert header["MODEL"] == "apogee_small" and header["SOFTVER"] == __version__ and header["SNAPSHOT"]
            assert [header[f"FLAG{bit:02d}"].split(":")[0] for bit in range(12)] == [b.name for b in ResultFlag]
            assert header["CALIB1"] == "e_teff = 1.25*raw_e_teff + 10" and header["FLAGBAD"] == int(FLAG_BAD_MASK)
            units = {column.name: column.unit for column in hdul[1].columns}
            assert units["teff"] == "K" and units["ra"] == "deg"
        from_fits = Table.read(fits_path, hdu=1, mask_invalid=False).to_pandas()
        from_parquet = read_table(out, stem.format(table))
        assert list(from_fits.columns) == list(from_parquet.columns) == [
            spec.name for spec in SPECTRAL_COLUMNS if spec.name not in RV_COLUMNS]
        for name in from_parquet.columns:
            left, right = from_fits[name], from_parquet[name]
            if name == "gaia_source_id":
                assert left.isna().equals(right.isna())
            elif right.dtype.kind == "f":
                assert np.allclose(left, right, equal_nan=True, rtol=0, atol=0), name
            else:
                assert list(left.astype(str).str.rstrip()) == list(right.astype(str)), name
    assert {"kiel-apogee_small.png", "kiel-boss_small.png", "summary.csv", "summary.json"} <= {p.name for p in out.iterdir()}
    manifest = read_manifest(out)  # the release is published as a whole, with every file listed
    assert verify_release(out) == [] and manifest["commits"][manifest["commit"]]["provenance"]["snapshot"] == store.snapshot_id
    assert set(manifest["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                                      and not p.name.startswith(".")} - {"manifest.json"}
    # nothing changed: no partition is rewritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    assert main(["release", "--store", str(store_path), "--out", str(out), "--catalog", str(SHIPPED_CATALOG),
                 "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")} == before
    assert main(["release", "--store", str(store_path), "--out", str(out), "--threshold", "snr_max=3"]) == 2
    matches_path = tmp_path / "matches.parquet"
    assert main(["crossmatch", "--store", str(store_path), "--out", str(matches_path), "--catalog", str(SHIPPED_CATALOG)]) == 0
    matches = pd.read_parquet(matches_path)
    matched = set(matches.loc[matches["gaia_matched"], "spectrum_id"])
    assert matched and all(spectrum.startswith("apogee") for spectrum in matched)
    assert main(["crossmatch", "--store", str(store_path), "--out", str(matches_path), "--column", "gmag"]) == 2
    assert main(["crossmatch", "--store", str(store_path), "--out", str(tmp_path)]) == 2  # a folder: usage error
    assert main(["release", "--store", str(store_path), "--out", str(matches_path)]) == 2  # a file: usage error
    assert pd.read_parquet(matches_path).equals(matches)  # neither touched it
    assert table_parts(out, stem.format("allStar"))


def test_release_of_a_store_without_results_is_a_clear_error(tmp_path: Path, shared_data: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from catalogbuilder.cli import main
    from catalogbuilder.store import SpectrumStore

    SpectrumStore.open(tmp_path / "empty", create=True)
    assert main(["release", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "holds no results" in capsys.readouterr().err
    assert main(["release", "--store", str(tmp_path / "typo"), "--out", str(tmp_path / "out")]) == 2
    assert "no spectrum store" in capsys.readouterr().err and not (tmp_path / "typo").exists()
