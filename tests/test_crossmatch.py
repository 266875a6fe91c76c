"""Cross-match on real Gaia rows (astroquery DR3, Gaia benchmark stars, astroNN APOGEE x DR2) and at scale."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from catalogbuilder.crossmatch.match import (
    REQUIRED_BANDS,
    CatalogColumns,
    crossmatch,
    is_hats_catalog,
    match_catalog,
    normalise_catalog,
    read_catalog,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CATALOG = REPO / "catalogbuilder/data/catalogs/astronn_gaiadr2_apogeedr14_near_sample.ecsv"
SAMPLE_APOGEE = REPO / "catalogbuilder/data/sample/apogee"
ASTRONN_COLUMNS = CatalogColumns.from_mapping({"ra": "RA", "dec": "DEC", "phot_g_mean_mag": "g"})
ARCSEC = 1 / 3600


def offset(ra: np.ndarray, dec: np.ndarray, arcsec: float, angle: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions moved by ``arcsec`` towards position angle ``angle`` (rad), small-angle approximation."""
    return (ra + arcsec * ARCSEC * np.sin(angle) / np.cos(np.radians(dec)), dec + arcsec * ARCSEC * np.cos(angle))


def header_positions(paths: list[Path]) -> pd.DataFrame:
    """spectrum_id, ra, dec and header 2MASS of real APOGEE files (what the store records per spectrum)."""
    rows = []
    for path in paths:
        header = fits.getheader(path)
        rows.append({"spectrum_id": path.name, "ra": header["RA"], "dec": header["DEC"],
                     "tmass_j": header.get("J", np.nan), "tmass_h": header.get("H", np.nan), "tmass_k": header.get("K", np.nan),
                     "e_tmass_j": header.get("J_ERR", np.nan), "e_tmass_h": header.get("H_ERR", np.nan),
                     "e_tmass_k": header.get("K_ERR", np.nan)})
    return pd.DataFrame(rows)


def test_astroquery_gaia_dr3_rows_match_back_within_the_radius(shared_data: Path) -> None:
    path = shared_data / "gaia/astroquery_gaiadr3_gaia_source_5rows.ecsv"
    truth = Table.read(path)
    rng = np.random.default_rng(3)
    angle = rng.uniform(0, 2 * np.pi, len(truth))
    for shift, radius, matched in ((0.0, 1.0, True), (0.9, 1.0, True), (1.2, 1.0, False), (1.2, 1.5, True)):
        ra, dec = offset(np.asarray(truth["ra"]), np.asarray(truth["dec"]), shift, angle)
        found = match_catalog(ra, dec, path, radius_arcsec=radius)
        if matched:
            assert list(found["source_id"]) == list(truth["source_id"])
            assert np.allclose(found["sep_arcsec"], shift, atol=2e-3)
            assert np.allclose(found["phot_bp_mean_mag"], truth["phot_bp_mean_mag"], equal_nan=True)
            # two of the five rows have no parallax in DR3: NaN, not a number invented
            missing_parallax = np.isnan(np.asarray(truth["parallax"], dtype=float))
            assert missing_parallax.sum() == 2 and np.array_equal(np.isnan(found["parallax"]), missing_parallax)
        else:
            assert found["source_id"].isna().all() and found["sep_arcsec"].isna().all()


def test_votable_with_upper_case_source_id(shared_data: Path) -> None:
    path = shared_data / "gaia/astroquery_gaiadr3_gaia_source_2rows.vot"
    truth = Table.read(path)
    found = match_catalog(np.asarray(truth["ra"]), np.asarray(truth["dec"]), path)
    assert list(found["source_id"]) == [4583627001381815936, 5348723816842275584]


def test_gaia_benchmark_stars_match_themselves_and_supply_2mass(shared_data: Path) -> None:
    path = shared_data / "gaia/gbs_v3_tmass_gaiadr3_hip_allwise_all_lite.fits"
    raw = Table.read(path)
    with_gaia = ~np.ma.getmaskarray(raw["ra"]) & np.isfinite(np.ma.filled(raw["ra"], np.nan))
    stars = raw[with_gaia]
    spectra = pd.DataFrame({"spectrum_id": [f"gbs-{i}" for i in range(len(stars))], "ra": stars["ra"], "dec": stars["dec"]})
    spectra["tmass_j"] = np.nan
    spectra.loc[0, ["tmass_j", "e_tmass_j"]] = [9.999, 0.5]  # a header value wins over the catalog
    matches = crossmatch(spectra, [path])
    assert matches["gaia_matched"].all() and len(matches) == len(stars) == 180
    assert list(matches["gaia_source_id"]) == list(stars["source_id_gaiadr3"])  # found through the alias
    assert (matches["gaia_sep_arcsec"] < 1e-6).all()
    assert np.allclose(matches["tmass_k"], np.ma.filled(stars["ks_m"].astype(float), np.nan), equal_nan=True)
    assert matches.loc[0, "tmass_j"] == 9.999 and matches.loc[0, "e_tmass_j"] == 0.5
    assert matches.loc[1, "tmass_j"] == pytest.approx(float(stars["j_m"][1]))
    assert set(matches["xmatch_catalog"]) == {path.name}
    complete = matches["missing_bands"] == ""
    assert (matches.loc[complete, "n_bands"] == len(REQUIRED_BANDS)).all() and complete.sum() >= 170


def test_apogee_stars_match_the_astronn_dr2_table_within_0p1_arcsec(shared_data: Path) -> None:
    files = sorted((shared_data / "apogee").glob("ap*.fits"))
    spectra = header_positions(files)
    table = read_catalog(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz", ASTRONN_COLUMNS)
    matches = crossmatch(spectra, [table], radius_arcsec=1.0)
    assert matches["gaia_matched"].all() and (matches["gaia_sep_arcsec"] < 0.1).all()
    raw = np.load(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz")
    nearest = [int(np.argmin((raw["RA"] - ra) ** 2 + (raw["DEC"] - dec) ** 2)) for ra, dec in zip(spectra["ra"], spectra["dec"])]
    assert np.allclose(matches["phot_g_mean_mag"], raw["g"][nearest])
    assert np.allclose(matches["parallax"], raw["parallax"][nearest])
    # DR2 table: no source_id, no BP/RP -> recorded as missing; 2MASS J/H/K come from the apStar headers
    assert matches["gaia_source_id"].isna().all()
    apstar = matches["spectrum_id"].str.startswith("apStar")
    assert (matches.loc[apstar, "missing_bands"] == "phot_bp_mean_mag,phot_rp_mean_mag").all()
    assert (matches.loc[apstar, "n_bands"] == 5).all()
    assert np.allclose(matches.loc[apstar, "tmass_h"], spectra.loc[apstar, "tmass_h"])


def test_astronn_sentinels_are_missing_values(shared_data: Path) -> None:
    table = read_catalog(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz", ASTRONN_COLUMNS)
    raw = np.load(shared_data / "gaia/astroNN_gaiadr2_apogeedr14_parallax.npz")
    assert len(table) == len(raw["RA"])
    assert np.array_equal(np.isnan(table["parallax"]), raw["parallax"] == -9999.0)
    assert np.isnan(table["phot_g_mean_mag"]).sum() == (raw["g"] == -9999.0).sum() > 0


def test_shipped_catalog_covers_the_shipped_apogee_sample() -> None:
    spectra = header_positions(sorted(SAMPLE_APOGEE.glob("ap*.fits")))
    matches = crossmatch(spectra, [SHIPPED_CATALOG])
    assert matches["gaia_matched"].all() and (matches["gaia_sep_arcsec"] < 0.01).all()
    assert matches["phot_g_mean_mag"].between(8, 20).all() and (matches["parallax_error"] > 0).all()
    assert set(matches["xmatch_catalog"]) == {SHIPPED_CATALOG.name}


def test_catalogs_are_tried_in_priority_order(shared_data: Path) -> None:
    dr3 = shared_data / "gaia/astroquery_gaiadr3_gaia_source_5rows.ecsv"
    truth = Table.read(dr3)
    spectra = pd.concat([
        header_positions(sorted(SAMPLE_APOGEE.glob("ap*.fits"))),
        pd.DataFrame({"spectrum_id": ["dr3-0", "nowhere"], "ra": [truth["ra"][0], 10.0], "dec": [truth["dec"][0], -80.0]}),
    ], ignore_index=True)
    matches = crossmatch(spectra, [dr3, SHIPPED_CATALOG]).set_index("spectrum_id")
    assert matches.loc["dr3-0", "xmatch_catalog"] == dr3.name and matches.loc["dr3-0", "gaia_source_id"] == truth["source_id"][0]
    assert (matches.filter(like="apStar", axis=0)["xmatch_catalog"] == SHIPPED_CATALOG.name).all()
    nowhere = matches.loc["nowhere"]
    assert not nowhere["gaia_matched"] and nowhere["n_bands"] == 0 and nowhere["missing_bands"] == ",".join(REQUIRED_BANDS)


def test_bad_positions_and_bad_catalogs(tmp_path: Path) -> None:
    spectra = pd.DataFrame({"spectrum_id": ["a", "b"], "ra": [np.nan, 297.210723], "dec": [1.0, 50.091099]})
    matches = crossmatch(spectra, [SHIPPED_CATALOG])
    assert list(matches["gaia_matched"]) == [False, True]
    with pytest.raises(ValueError, match="missing.fits does not exist"):
        crossmatch(spectra, [SHIPPED_CATALOG.with_name("missing.fits")])
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(SAMPLE_APOGEE.joinpath("apStar-dr17-2M19485057+5005279.fits").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.fits"):
        crossmatch(spectra, [truncated])
    with pytest.raises(ValueError, match="no ra column"):
        normalise_catalog(pd.DataFrame({"x": [1.0], "dec": [2.0]}))
    with pytest.raises(ValueError, match="radius"):
        match_catalog(np.array([1.0]), np.array([1.0]), SHIPPED_CATALOG, radius_arcsec=0)
    with pytest.raises(ValueError, match="unknown cross-match output"):
        CatalogColumns.from_mapping({"gmag": "g"})
    assert crossmatch(spectra)["gaia_matched"].sum() == 0  # no catalog: nothing matched, nothing invented


def _large_catalog(n_sources: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n_sources`` positions uniform on the sphere with Gaia-like ids and magnitudes."""
    return pd.DataFrame({
        "source_id": np.arange(n_sources, dtype=np.int64) * 7919 + 4_000_000_000_000_000,
        "ra": rng.uniform(0, 360, n_sources), "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, n_sources))),
        "phot_g_mean_mag": rng.uniform(6, 21, n_sources), "parallax": rng.normal(0.5, 1, n_sources),
    })


@pytest.fixture(scope="module")
def scale_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """10^6 random sources; 2000 spectra placed 0–0.8″ from chosen sources, 500 blank-sky spectra."""
    rng = np.random.default_rng(2026)
    catalog = _large_catalog(1_000_000, rng)
    chosen = rng.choice(len(catalog), 2000, replace=False)
    ra, dec = offset(catalog["ra"].to_numpy()[chosen], catalog["dec"].to_numpy()[chosen], rng.uniform(0, 0.8, 2000),
                     rng.uniform(0, 2 * np.pi, 2000))
    blank_ra, blank_dec = rng.uniform(0, 360, 500), np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))
    return {"catalog": catalog, "chosen": chosen, "ra": np.r_[ra, blank_ra], "dec": np.r_[dec, blank_dec],
            "dir": tmp_path_factory.mktemp("hats")}


def _check_scale_result(found: pd.DataFrame, case: dict) -> None:
    catalog, chosen = case["catalog"], case["chosen"]
    injected = found.iloc[:2000]
    # a random neighbour closer than the injected source is possible in principle (10^6 sources on the sphere:
    # ~4e-6 chance within 0.8″); with this seed every injected source is the nearest one
    assert np.array_equal(injected["source_id"].to_numpy(np.int64), catalog["source_id"].to_numpy()[chosen])
    assert (injected["sep_arcsec"] <= 0.8 + 1e-6).all()
    blank = found.iloc[2000:]
    assert blank["source_id"].isna().sum() >= 495  # random positions: ≈0.003 expected within 1″


def test_million_source_catalog_with_astropy(scale_case: dict) -> None:
    began = time.perf_counter()
    found = match_catalog(scale_case["ra"], scale_case["dec"], scale_case["catalog"])
    assert time.perf_counter() - began < 60
    _check_scale_result(found, scale_case)


def test_hats_catalog_with_lsdb_gives_the_same_matches(scale_case: dict) -> None:
    """The Gaia-scale engine on a 2×10^5-source HATS catalog (the injected sources plus random others; lsdb's fixed
    costs make 10^6 too slow for CI on two cores) agrees exactly with the astropy engine on the same rows."""
    lsdb = pytest.importorskip("lsdb")
    rng = np.random.default_rng(7)
    others = np.setdiff1d(rng.choice(len(scale_case["catalog"]), 200_000, replace=False), scale_case["chosen"])[:198_000]
    subset = scale_case["catalog"].iloc[np.sort(np.r_[scale_case["chosen"], others])].reset_index(drop=True)
    path = scale_case["dir"] / "gaia_hats"
    lsdb.from_dataframe(subset, ra_column="ra", dec_column="dec", partition_rows=50_000).write_catalog(path)
    assert is_hats_catalog(path)
    found = match_catalog(scale_case["ra"], scale_case["dec"], path)
    _check_scale_result(found, scale_case)
    reference = match_catalog(scale_case["ra"], scale_case["dec"], subset)
    pd.testing.assert_frame_equal(found[reference.columns], reference, check_exact=False, atol=1e-9)


def test_proper_motion_brings_gaia_2016_positions_to_j2000(shared_data: Path, tmp_path: Path) -> None:
    """The benchmark stars' J2000 positions lie a median 3.4″ from their Gaia DR3 (2016.0) positions; moving the
    catalog by its proper motions to epoch 2000 recovers the right source for most, and never a wrong one."""
    path = shared_data / "gaia/gbs_v3_tmass_gaiadr3_hip_allwise_all_lite.fits"
    stars = Table.read(path)
    stars = stars[~np.ma.getmaskarray(stars["ra"])]
    ra, dec = np.asarray(stars["ra_j2000"], float), np.asarray(stars["dec_j2000"], float)
    truth = np.asarray(stars["source_id_gaiadr3"], np.int64)
    as_given = match_catalog(ra, dec, path)
    moved = match_catalog(ra, dec, path, epoch=2000.0)
    assert as_given["source_id"].notna().sum() < 40 and moved["source_id"].notna().sum() >= 159
    found = moved["source_id"].notna().to_numpy()
    assert np.array_equal(moved["source_id"][found].to_numpy(np.int64), truth[found])
    # proper motions below -999 mas/yr are real (Groombridge 1830 = HD 103095: -5818 mas/yr in Dec), not sentinels:
    # they are kept, and fast stars whose tabulated J2000 position agrees with the motion are found
    fast = np.asarray(stars["pmdec"], float) <= -999
    assert fast.sum() == 9 and read_catalog(path)["pmdec"].min() == pytest.approx(float(np.min(stars["pmdec"])))
    assert moved["source_id"][fast].notna().sum() >= 2
    lsdb = pytest.importorskip("lsdb")
    lsdb.from_dataframe(read_catalog(path), ra_column="ra", dec_column="dec").write_catalog(tmp_path / "gbs")
    pd.testing.assert_frame_equal(match_catalog(ra, dec, tmp_path / "gbs", epoch=2000.0), moved, check_exact=False, atol=1e-9)


def test_positions_outside_every_partition_of_a_hats_catalog_are_unmatched(tmp_path: Path) -> None:
    """A HATS catalog covering one patch of sky (e.g. a survey footprint): spectra elsewhere lie in no partition of
    it (lsdb refuses such a cross-match); they come back unmatched, next to a match inside the patch."""
    lsdb = pytest.importorskip("lsdb")
    rng = np.random.default_rng(3)
    patch = pd.DataFrame({"source_id": np.arange(1, 2001), "ra": rng.uniform(10, 12, 2000),
                          "dec": rng.uniform(-1, 1, 2000), "phot_g_mean_mag": rng.uniform(8, 18, 2000)})
    lsdb.from_dataframe(patch, ra_column="ra", dec_column="dec").write_catalog(tmp_path / "patch")
    far = match_catalog(np.array([200.0, 250.0]), np.array([40.0, -60.0]), tmp_path / "patch")
    assert len(far) == 2 and far["source_id"].isna().all() and far["sep_arcsec"].isna().all()
    both = match_catalog(np.array([200.0, patch["ra"][5]]), np.array([40.0, patch["dec"][5]]), tmp_path / "patch")
    assert both["source_id"].isna().tolist() == [True, False] and int(both["source_id"][1]) == 6


def test_hats_directory_without_lsdb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "properties").write_text("dataset_type=object\n")
    monkeypatch.setitem(sys.modules, "lsdb", None)  # as on an install without the [hats] extra
    with pytest.raises(ValueError, match=r"needs lsdb"):
        match_catalog(np.array([1.0]), np.array([2.0]), tmp_path)
