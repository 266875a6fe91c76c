"""The one tabular-input layer (catalogbuilder/tables.py) on real tables: every format reads the same rows, the one
alias map finds the columns of real catalogs, the one missing-value policy, and MISSING_PHOTOMETRY consistent with
what APOGEE Net II imputes (a catalog 99.99 / −9999, a parallax between −999 and −1 mas)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from catalogbuilder.calibrate.flags import result_flags
from catalogbuilder.constants import ResultFlag
from catalogbuilder.crossmatch.match import REQUIRED_BANDS, crossmatch
from catalogbuilder.inference.photometry import gather_inputs
from catalogbuilder.models.apogeenet import METADATA_KEYS, METADATA_MEAN, METADATA_REPLACEMENT, METADATA_STD, normalize_metadata
from catalogbuilder.photometric.table import read_photometric_table
from catalogbuilder.readers import read_spectra
from catalogbuilder.tables import (
    COLUMN_ALIASES,
    SkyIndex,
    TableError,
    ValueKind,
    apply_missing_policy,
    as_measured,
    canonical_frame,
    column_key,
    find_columns,
    missing_mask,
    read_table,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_APSTAR = REPO / "catalogbuilder/data/sample/apogee/apStar-dr17-2M19485057+5005279.fits"
GBS = "gaia/gbs_v3_tmass_gaiadr3_hip_allwise_all_lite.fits"
DR3_ROWS = "gaia/astroquery_gaiadr3_gaia_source_5rows.ecsv"
APOKASC = "labels/sdss_apogee__data_apokasc_APOKASC_Catalog.v7.1.fits"
NUMERIC = ["ra", "dec", "parallax", "phot_g_mean_mag", "phot_bp_mean_mag"]


def _read_astropy(path: Path) -> Table:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Table.read(path)


@pytest.fixture(scope="module")
def dr3(shared_data: Path) -> pd.DataFrame:
    """The five real Gaia DR3 rows (astroquery), scalar columns, one source_id nulled (a row without an id)."""
    frame = read_table(shared_data / DR3_ROWS)
    frame["source_id"] = frame["source_id"].astype("Int64")
    frame.loc[2, "source_id"] = pd.NA
    return frame


def test_every_format_reads_the_same_rows(dr3: pd.DataFrame, tmp_path: Path) -> None:
    """Parquet (file and folder of parts), CSV, CSV.gz, NPZ, FITS, VOTable and ECSV give the same values; 64-bit ids
    keep every digit next to a null one (nullable Int64); vector columns are dropped."""
    columns = ["designation", "source_id", *NUMERIC]
    subset = dr3[columns].astype({name: np.float64 for name in NUMERIC})  # float64: CSV text round-trips exactly
    paths = {name: tmp_path / name for name in ("rows.parquet", "rows.csv", "rows.csv.gz", "rows.fits", "rows.vot",
                                                "rows.ecsv")}
    subset.to_parquet(paths["rows.parquet"])
    subset.to_csv(paths["rows.csv"], index=False)
    subset.to_csv(paths["rows.csv.gz"], index=False)
    table = Table.from_pandas(subset)
    table["flux"] = np.arange(20.0).reshape(5, 4)  # a vector column: dropped by the reader
    for name in ("rows.fits", "rows.vot", "rows.ecsv"):
        table.write(paths[name], format={"fits": "fits", "vot": "votable", "ecsv": "ascii.ecsv"}[name.split(".")[1]])
    (tmp_path / "parts").mkdir()
    subset.iloc[:3].to_parquet(tmp_path / "parts/part-0.parquet")
    subset.iloc[3:].to_parquet(tmp_path / "parts/part-1.parquet")
    paths["parts"] = tmp_path / "parts"
    for name, path in paths.items():
        frame = read_table(path)
        assert list(frame.columns) == columns and list(frame.index) == list(range(5)), name
        np.testing.assert_array_equal(frame[NUMERIC].to_numpy(float), subset[NUMERIC].to_numpy(float), err_msg=name)
        assert list(frame["designation"]) == list(subset["designation"]), name
        assert frame["source_id"].isna().tolist() == [False, False, True, False, False], name
        assert frame["source_id"].dropna().astype(np.int64).tolist() == subset["source_id"].dropna().tolist(), name
    np.savez(tmp_path / "rows.npz", **{name: subset[name].to_numpy(float) for name in NUMERIC}, image=np.zeros((5, 3)))
    npz = read_table(tmp_path / "rows.npz")
    assert list(npz.columns) == NUMERIC  # the 2-d array is not a column
    np.testing.assert_array_equal(npz.to_numpy(), subset[NUMERIC].to_numpy(float))
    assert list(read_table(paths["rows.parquet"], ["ra", "dec"]).columns) == ["ra", "dec"]


def test_fits_byte_strings_and_masked_values(shared_data: Path) -> None:
    raw = _read_astropy(shared_data / GBS)
    frame = read_table(shared_data / GBS)
    assert len(frame) == len(raw) == 192 and frame["hd"].iloc[0] == "HD195564"  # FITS bytes → str
    masked = np.ma.getmaskarray(raw["ra"])
    assert masked.sum() == 12 and np.array_equal(frame["ra"].isna().to_numpy(), masked)
    assert frame["source_id_gaiadr3"].dtype == "Int64" and frame["source_id_gaiadr3"].isna().sum() == 12
    lamost = read_table(shared_data / "lamost/dr1_learninglamost/my_data3_lasp_labels.csv")
    assert len(lamost) == 3125 and lamost["obsid"].dtype == np.int64


def test_unreadable_tables_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="nothing.fits does not exist"):
        read_table(tmp_path / "nothing.fits")
    (tmp_path / "notes.txt").write_text("not a table\n")
    with pytest.raises(TableError, match="notes.txt: format not recognised"):
        read_table(tmp_path / "notes.txt")
    (tmp_path / "cut.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    with pytest.raises(TableError, match="cannot read table .*cut.parquet"):
        read_table(tmp_path / "cut.parquet")
    np.savez(tmp_path / "ragged.npz", ra=np.zeros(3), dec=np.zeros(4))
    with pytest.raises(TableError, match="ragged.npz: needs 1-d arrays of one length"):
        read_table(tmp_path / "ragged.npz")
    pd.DataFrame({"ra": [1.0]}).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(TableError, match="one.csv has no column 'dec'"):
        read_table(tmp_path / "one.csv", ["ra", "dec"])
    assert issubclass(TableError, ValueError)


def test_no_spelling_belongs_to_two_canonical_names() -> None:
    keys = [column_key(name) for canonical, spellings in COLUMN_ALIASES.items() for name in (canonical, *spellings)]
    assert len(keys) == len(set(keys))


def test_the_alias_map_finds_the_columns_of_real_catalogs(shared_data: Path) -> None:
    apokasc = find_columns(read_table(shared_data / APOKASC).columns)
    assert apokasc["object_id"] == "2MASS ID" and apokasc["ra"] == "RA" and apokasc["tmass_k"] == "2MASS K-MAG"
    assert apokasc["e_tmass_k"] == "2MASS K-MAG err" and apokasc["sdss_g"] == "SDSS G-mag"
    gbs = find_columns(read_table(shared_data / GBS).columns)
    assert gbs["source_id"] == "source_id_gaiadr3" and gbs["ra"] == "ra" and gbs["object_id"] == "tmass_id"
    assert (gbs["tmass_k"], gbs["e_tmass_k"], gbs["pmdec"]) == ("ks_m", "ks_msigcom", "pmdec")
    # an exact name wins over one differing in case; a user's name is tried first
    assert find_columns(["RA", "ra", "G"], {"phot_g_mean_mag": "G"}, ["ra", "phot_g_mean_mag"]) == {
        "ra": "ra", "phot_g_mean_mag": "G"}
    assert find_columns(["Plx", "e_Plx"]) == {"parallax": "Plx", "parallax_error": "e_Plx"}


@pytest.mark.parametrize(("kind", "values", "missing"), [
    (ValueKind.MAGNITUDE, [12.3, -2.25, 99.99, 99.0, -9999.99, 50.0, np.nan, np.inf],
     [False, False, True, True, True, True, True, True]),
    (ValueKind.VALUE, [1.5, -5.0, -998.9, -999.0, -9999.0, 99.99],  # parallaxes: negative ones are measurements
     [False, False, False, True, True, False]),
    (ValueKind.ERROR, [0.02, 9.995, 0.0, -1.0, np.nan], [False, False, True, True, True]),
    (ValueKind.PROPER_MOTION, [-5817.8, 4164.2, np.nan], [False, False, True]),
])
def test_missing_values_by_kind(kind: ValueKind, values: list[float], missing: list[bool]) -> None:
    assert missing_mask(np.array(values), kind).tolist() == missing
    assert np.array_equal(np.isnan(as_measured(pd.Series(values), kind)), missing)
    assert missing_mask(np.ma.MaskedArray([1.0, 2.0], mask=[False, True]), kind).tolist() == [False, True]


def test_policy_on_a_frame_2mass_9p99_errors_and_apokasc(shared_data: Path) -> None:
    frame = apply_missing_policy(pd.DataFrame({
        "tmass_h": [9.2, 9.1, 99.99], "e_tmass_h": [0.02, 9.995, 0.03], "parallax": [-0.4, -9999.0, 2.0],
        "object_id": ["a", "b", "c"], "other": [-9999.0, 1.0, 2.0]}))
    assert frame["tmass_h"].tolist()[0] == 9.2 and frame[["tmass_h", "e_tmass_h"]].iloc[1].isna().all()
    assert np.isnan(frame["tmass_h"].iloc[2]) and frame["e_tmass_h"].iloc[2] == 0.03
    assert frame["parallax"].iloc[0] == -0.4 and np.isnan(frame["parallax"].iloc[1])
    assert frame["other"].tolist() == [-9999.0, 1.0, 2.0]  # not a canonical column: left as it is
    raw = _read_astropy(shared_data / APOKASC)
    apokasc = read_photometric_table(shared_data / APOKASC)
    flagged_f = np.asarray(raw["2MASS K-MAG err"], float) > 1  # two 2MASS quality-F K magnitudes (9.995 errors)
    assert flagged_f.sum() == 2 and apokasc.loc[flagged_f, ["tmass_k", "e_tmass_k"]].isna().all().all()
    assert apokasc["sdss_g"].isna().sum() == (np.asarray(raw["SDSS G-mag"], float) == -9999).sum() == 87
    assert apokasc.loc[~flagged_f, "tmass_k"].notna().all()


def test_sky_index_nearest_within_the_radius(dr3: pd.DataFrame) -> None:
    index = SkyIndex(dr3["ra"].to_numpy(), dr3["dec"].to_numpy())
    shifted = dr3["dec"].to_numpy() + np.array([0.5, 0.9, 1.2, 0.0, np.nan]) / 3600
    rows, separation = index.nearest(dr3["ra"].to_numpy(), shifted, radius_arcsec=1.0)
    assert rows.tolist() == [0, 1, -1, 3, -1]
    np.testing.assert_allclose(separation[[0, 1, 3]], [0.5, 0.9, 0.0], atol=1e-6)


# --- MISSING_PHOTOMETRY and APOGEE Net II ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark_rows(shared_data: Path) -> pd.DataFrame:
    """Gaia benchmark stars with every band APOGEE Net II reads (real Gaia DR3 + 2MASS rows of one table)."""
    frame = canonical_frame(read_table(shared_data / GBS))
    complete = frame[list(REQUIRED_BANDS)].notna().all(axis=1) & frame["ra"].notna()
    return read_table(shared_data / GBS).loc[complete].head(4).reset_index(drop=True)


def _catalog_with(rows: pd.DataFrame, row: int, values: dict[str, float], path: Path) -> Path:
    """The catalog rows written as a FITS table, with row ``row`` changed to ``values`` as an export writes them."""
    changed = rows.copy()
    for column, value in values.items():
        changed.loc[row, column] = value
    Table.from_pandas(changed[["source_id_gaiadr3", "ra", "dec", "phot_g_mean_mag", "phot_bp_mean_mag",
                               "phot_rp_mean_mag", "parallax", "parallax_error", "j_m", "j_msigcom", "h_m",
                               "h_msigcom", "ks_m", "ks_msigcom"]]).write(path)
    return path


def _metadata(matches: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """APOGEE Net II's input preparation (reference rule) on cross-match rows."""
    return normalize_metadata({key: matches[key].to_numpy() for key in METADATA_KEYS}, len(matches))


def test_a_catalog_99p99_and_a_9999_parallax_are_missing_for_the_flag_and_for_the_network(
    benchmark_rows: pd.DataFrame, tmp_path: Path
) -> None:
    catalog = _catalog_with(benchmark_rows, 1, {"phot_g_mean_mag": 99.99, "parallax": -9999.0}, tmp_path / "gbs.fits")
    spectra = pd.DataFrame({"spectrum_id": [f"s{i}" for i in range(4)], "ra": benchmark_rows["ra"],
                            "dec": benchmark_rows["dec"]})
    matches = crossmatch(spectra, [catalog])
    assert matches["gaia_matched"].all()
    assert matches["missing_bands"].tolist() == ["", "phot_g_mean_mag,parallax", "", ""]
    assert matches.loc[1, ["phot_g_mean_mag", "parallax"]].isna().all()
    flags = result_flags(matches)
    assert ((flags & int(ResultFlag.MISSING_PHOTOMETRY)) != 0).tolist() == [False, True, False, False]

    normalised, imputed = _metadata(matches)
    assert imputed.tolist() == [False, True, False, False]
    for key in ("parallax", "phot_g_mean_mag"):
        column = METADATA_KEYS.index(key)
        expected = (METADATA_REPLACEMENT[column] - METADATA_MEAN[column]) / METADATA_STD[column]
        assert normalised[1, column] == pytest.approx(expected, rel=1e-6)

    # a user photometry table for `infer --photometry` holding the raw placeholders: read with the same policy
    raw = matches.copy()
    raw.loc[1, ["phot_g_mean_mag", "parallax"]] = [99.99, -9999.0]
    raw.to_parquet(tmp_path / "photometry.parquet")
    inputs = gather_inputs(tmp_path / "photometry.parquet", raw["spectrum_id"], pd.DataFrame(index=range(4)),
                           METADATA_KEYS)
    assert inputs.loc["s1", ["phot_g_mean_mag", "parallax"]].isna().all()
    assert _metadata(inputs.reset_index(drop=True))[1].tolist() == [False, True, False, False]


def test_a_parallax_the_network_imputes_but_the_policy_keeps_sets_the_flag_through_the_results(
    benchmark_rows: pd.DataFrame, tmp_path: Path
) -> None:
    catalog = _catalog_with(benchmark_rows, 2, {"parallax": -5.0}, tmp_path / "gbs.fits")
    spectra = pd.DataFrame({"spectrum_id": [f"s{i}" for i in range(4)], "ra": benchmark_rows["ra"],
                            "dec": benchmark_rows["dec"]})
    matches = crossmatch(spectra, [catalog])
    assert matches.loc[2, "parallax"] == -5.0 and (matches["missing_bands"] == "").all()  # a measurement
    assert (result_flags(matches) & int(ResultFlag.MISSING_PHOTOMETRY) == 0).all()
    _, imputed = _metadata(matches)
    assert imputed.tolist() == [False, False, True, False]  # the reference rule: parallax ≤ −1 mas is replaced
    with_results = matches.assign(missing_photometry=imputed.astype(float))
    flagged = (result_flags(with_results) & int(ResultFlag.MISSING_PHOTOMETRY)) != 0
    assert flagged.tolist() == [False, False, True, False]


def test_header_magnitudes_follow_the_policy(tmp_path: Path) -> None:
    """An apStar header with a 99.99 J and a 9.995 K error: both bands missing, H kept (the real file otherwise)."""
    from astropy.io import fits

    with fits.open(SAMPLE_APSTAR) as hdul:
        hdul[0].header["J"] = 99.99
        hdul[0].header["K_ERR"] = 9.995
        hdul.writeto(tmp_path / SAMPLE_APSTAR.name)
    meta = read_spectra(tmp_path / SAMPLE_APSTAR.name)[0].meta
    assert np.isnan(meta["tmass_j"]) and np.isnan(meta["tmass_k"]) and np.isnan(meta["e_tmass_k"])
    assert meta["tmass_h"] == pytest.approx(10.584) and meta["e_tmass_h"] == pytest.approx(0.018)
