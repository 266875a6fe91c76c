"""Readers on real files: every spectrum in ../shared/data, the conformance inputs, broken files and the sample."""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from catalogbuilder.constants import APOGEE_NPIX, GRID_APOGEE, GRID_OPTICAL, GRID_SPECS, apogee_wavelength
from catalogbuilder.readers import (
    READERS,
    SURVEY_CHOICES,
    ReaderError,
    detect_survey,
    read_spectra,
    reverse_inverse_error,
)
from catalogbuilder.readers.apvisit import SPEED_OF_LIGHT_KMS

APSTAR_GIANT = "apogee/apStar-dr17-2M17335483-2753043.fits"
APSTAR_DWARF = "apogee/apStar-dr17-2M19485057+5005279.fits"
APVISITS = ("apogee/apVisit-r13-5095-55844-128.fits", "apogee/apVisit-r13-9518-57729-104.fits")
BOSS_FULL = "boss/spec-3586-55181-0500.fits"
BOSS_LITE = "boss/spec-0266-51602-0031.fits"
LAMOST_DR6 = "lamost/laspec/spec-57287-KP193637N444141V03_sp10-161.fits.gz"
LAMOST_DR7 = "lamost/laspec/spec-58397-EG014118N254444M01_sp03-031.fits"
LAMOST_DR1_DIR = "lamost/dr1_learninglamost"
SAMPLE_DIR = importlib.resources.files("catalogbuilder") / "data" / "sample"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- every spectrum file of the development data -----------------------------------------------------------------
def test_all_lamost_dr1_files_read_with_header_wavelengths(shared_data: Path) -> None:
    files = sorted((shared_data / LAMOST_DR1_DIR).glob("spec-*.fits"))
    assert len(files) == 136
    for path in files:
        (spectrum,) = read_spectra(path)
        header = fits.getheader(path)
        assert (spectrum.survey, spectrum.kind, spectrum.grid, spectrum.row) == ("lamost", "combined", GRID_OPTICAL, 0)
        assert spectrum.meta["wavelength_source"] == "header COEFF0/COEFF1"
        assert spectrum.flux.dtype == spectrum.error.dtype == spectrum.wavelength.dtype == np.float32
        assert spectrum.mask.dtype == np.int64 and spectrum.flux.shape == spectrum.mask.shape == (3904,)
        expected = (10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(3904))).astype(np.float32)
        np.testing.assert_array_equal(spectrum.wavelength, expected)
        assert 3699 < spectrum.wavelength[0] < 3701 and 9088 < spectrum.wavelength[-1] < 9090
        assert np.all(np.isfinite(spectrum.error)) and np.all(spectrum.error > 0)
        assert spectrum.object_id == header["DESIG"] and spectrum.snr == header["SN_G"]
        assert spectrum.mjd == header["MJD"] and spectrum.ra == header["RA"]


def test_lamost_dr6_dr7_image_files(shared_data: Path) -> None:
    for name, release, obsid in ((LAMOST_DR6, "LAMOST DR6", "359910161"), (LAMOST_DR7, "LAMOST DR7", "677503031")):
        (spectrum,) = read_spectra(shared_data / name, survey="lamost")
        image = fits.getdata(shared_data / name)
        np.testing.assert_array_equal(spectrum.wavelength, image[2])  # row 2 IS the wavelength (EXTEN0)
        np.testing.assert_array_equal(spectrum.flux, image[0])
        assert spectrum.meta["wavelength_source"] == "image row"
        assert spectrum.meta["obsid"] == obsid and spectrum.flux.size == 3909
        assert spectrum.meta["data_release"] == release
    (dr6,) = read_spectra(shared_data / LAMOST_DR6)
    assert (dr6.object_id, dr6.snr, dr6.mjd) == ("LAMOST J192814.09+435530.8", 87.63, 57286.0)
    assert dr6.meta["snr_r"] == 128.48


def test_boss_full_and_lite(shared_data: Path) -> None:
    (full,) = read_spectra(shared_data / BOSS_FULL)
    (lite,) = read_spectra(shared_data / BOSS_LITE, survey="boss")
    # the star is the SDSS photometric object (SPALL OBJID, SPECOBJ BESTOBJID); the observation is plate-mjd-fiber
    assert (full.object_id, lite.object_id) == ("1237663784200306761", "1237648721216405598")
    assert (full.product_key, lite.product_key) == ("spec|3586|55181|500", "spec|266|51602|31")
    assert full.reduction == "v5_10_0"
    assert full.meta["metadata_hdu"] == "SPALL" and lite.meta["metadata_hdu"] == "SPECOBJ"
    assert full.ra == pytest.approx(6.7137386) and lite.ra == pytest.approx(147.32107)  # PLUG_RA, not the boresight
    assert full.snr == pytest.approx(54.975536) and full.mjd == 55181
    assert full.meta["psfmag_g"] == pytest.approx(16.05624) and full.meta["class"] == "STAR"
    assert full.flux.size == 4625 and lite.flux.size == 3842
    assert lite.wavelength[0] == pytest.approx(3800.1, abs=0.05) and full.wavelength[-1] == pytest.approx(10327.6, abs=0.1)
    coadd = fits.getdata(shared_data / BOSS_FULL, 1)
    np.testing.assert_array_equal(full.mask, coadd["and_mask"])


def test_apstar_rows_headers_and_visits(shared_data: Path) -> None:
    giant = read_spectra(shared_data / APSTAR_GIANT)
    assert [(s.kind, s.row, s.visit) for s in giant] == [
        ("combined", 0, 0), ("combined-alt", 1, 0), ("visit", 2, 1), ("visit", 3, 2), ("visit", 4, 3)
    ]
    assert all(s.grid == GRID_APOGEE and s.wavelength is None and s.flux.shape == (APOGEE_NPIX,) for s in giant)
    assert giant[0].meta["nvisits"] == 3 and giant[0].object_id == "2M17335483-2753043"
    assert giant[2].mjd == pytest.approx(2456396.99199 - 2400000.5) and giant[4].snr == pytest.approx(105.8963319815388)
    assert np.isnan(giant[0].mjd) and giant[0].snr == pytest.approx(154.1551207216066)
    assert giant[3].meta["visit_file"] == "apVisit-dr17-5815-56433-221.fits"
    dwarf = read_spectra(shared_data / APSTAR_DWARF, survey="apogee")
    assert len(dwarf) == 2 and dwarf[0].meta["nvisits"] == 1
    assert dwarf[0].meta["tmass_j"] == 11.11499977111816 and dwarf[0].meta["e_tmass_h"] == 0.01799999922513962
    assert not dwarf[1].flux.any()  # the all-zero second row is still emitted
    raw = fits.getdata(shared_data / APSTAR_GIANT, 1)
    assert np.isnan(raw[0]).sum() == 784 and not np.isnan(giant[0].flux).any() and (giant[0].flux == 0).sum() >= 784


def test_apvisit_rest_frame_resampling_matches_native_flux(shared_data: Path) -> None:
    for name in APVISITS:
        (spectrum,) = read_spectra(shared_data / name)
        assert detect_survey(shared_data / name) == "apogee-visit"
        assert (spectrum.survey, spectrum.kind, spectrum.grid, spectrum.visit) == ("apogee", "visit", GRID_APOGEE, 1)
        assert spectrum.wavelength is None and spectrum.flux.shape == (APOGEE_NPIX,)
        with fits.open(shared_data / name) as hdul:
            native_flux, native_wave = hdul[1].data, hdul[4].data
            velocity = hdul[0].header["VRAD"]
            assert velocity == pytest.approx(hdul[0].header["VHELIO"] - hdul[0].header["BC"], abs=1e-3)
        assert spectrum.meta["rest_frame_velocity"] == velocity
        gaps = (spectrum.mask & GRID_SPECS["apogee"].no_coverage) != 0
        assert 500 < gaps.sum() < 1000 and not spectrum.flux[gaps].any() and not spectrum.error[gaps].any()
        assert spectrum.flux[~gaps].all()
        # back at the native rest-frame pixels, the resampled spectrum reproduces the native flux to the noise level
        rest = native_wave / (1 + velocity / SPEED_OF_LIGHT_KMS)
        grid = apogee_wavelength()
        for chip in range(3):
            order = np.argsort(rest[chip])
            inside = (rest[chip][order] > grid[0]) & (rest[chip][order] < grid[-1])
            back = np.interp(rest[chip][order][inside], grid, spectrum.flux)
            relative = np.abs(back / native_flux[chip][order][inside] - 1)
            assert np.median(relative) < 0.02
            assert np.median(spectrum.flux[~gaps]) == pytest.approx(np.median(native_flux), rel=0.1)


def test_apvisit_shift_uses_the_header_velocity(shared_data: Path, tmp_path: Path) -> None:
    """Setting the velocity to zero moves the resampled spectrum by v / (c · ln10 · 6e-6) apStar pixels."""
    source = shared_data / APVISITS[1]
    (shifted,) = read_spectra(source)
    with fits.open(source) as hdul:
        hdul[0].header["VRAD"] = 0.0
        hdul.writeto(tmp_path / "zero_velocity.fits")
    (observed,) = read_spectra(tmp_path / "zero_velocity.fits")
    expected_lag = shifted.meta["rest_frame_velocity"] / (SPEED_OF_LIGHT_KMS * np.log(10) * 6e-6)  # ≈ −11.3 px
    good = slice(400, 3000)  # blue chip, away from its edges
    a = shifted.flux[good] - shifted.flux[good].mean()
    lags = np.arange(-20, 21)
    correlation = [np.dot(a, np.roll(observed.flux, -lag)[good] - observed.flux[good].mean()) for lag in lags]
    assert lags[int(np.argmax(correlation))] == pytest.approx(expected_lag, abs=1)


def test_rejected_products_give_reasons(shared_data: Path) -> None:
    with pytest.raises(ReaderError, match="spPlate"):
        read_spectra(shared_data / "boss/spPlate-4055-55359-0020.fits")
    for name in ("med-58408-TD230151N343645T01_sp01-015.fits", "med-58268-HIP95119KP01_sp12-076.fits.gz"):
        with pytest.raises(ReaderError, match="medium-resolution"):
            read_spectra(shared_data / "lamost/laspec" / name)
        with pytest.raises(ReaderError, match="medium-resolution"):
            read_spectra(shared_data / "lamost/laspec" / name, survey="lamost")
    with pytest.raises(ReaderError, match="unrecognised"):
        read_spectra(shared_data / "gaia/gbs_v3_tmass_gaiadr3_hip_allwise_all_lite.fits")


def test_survey_mismatch_and_unknown_survey(shared_data: Path) -> None:
    with pytest.raises(ReaderError, match="of survey boss, not lamost"):
        read_spectra(shared_data / BOSS_LITE, survey="lamost")
    with pytest.raises(ReaderError, match="not apogee-visit"):
        read_spectra(shared_data / APSTAR_DWARF, survey="apogee-visit")
    assert len(read_spectra(shared_data / APVISITS[0], survey="apogee")) == 1  # apVisit is APOGEE too
    with pytest.raises(ValueError, match="unknown survey"):
        read_spectra(shared_data / BOSS_LITE, survey="sdss")


def test_reader_classes_read_their_format_and_reject_the_others(shared_data: Path) -> None:
    examples = {"apogee": APSTAR_DWARF, "apogee-visit": APVISITS[1], "boss": BOSS_LITE, "lamost": LAMOST_DR7}
    assert SURVEY_CHOICES == ("auto", *examples)
    for reader in READERS:
        for survey, name in examples.items():
            if survey == reader.survey:
                by_class, by_function = reader.read(shared_data / name), read_spectra(shared_data / name, survey)
                np.testing.assert_array_equal(by_class[0].flux, by_function[0].flux)
            else:
                with pytest.raises(ReaderError, match="not a"):
                    reader.read(shared_data / name)


def test_detection_ignores_file_names(shared_data: Path, tmp_path: Path) -> None:
    misleading = tmp_path / "apStar-dr17-lamost-spec.fits"
    shutil.copyfile(shared_data / BOSS_LITE, misleading)
    assert detect_survey(misleading) == "boss"
    plain = tmp_path / "spectrum.dat"
    shutil.copyfile(shared_data / LAMOST_DR6, plain)  # gzip detected from its bytes, not its suffix
    assert detect_survey(plain) == "lamost"


def test_reading_never_modifies_files(shared_data: Path) -> None:
    paths = [shared_data / p for p in (APSTAR_DWARF, APVISITS[0], BOSS_LITE, LAMOST_DR6, LAMOST_DR7)]
    before = [sha256(p) for p in paths]
    for path in paths:
        read_spectra(path)
    assert [sha256(p) for p in paths] == before


# --- conformance: the reference readers' raw arrays are reproduced exactly ----------------------------------------
@pytest.mark.parametrize("config", ["apogee_small", "boss_small"])
def test_conformance_raw_arrays_reproduced_exactly(shared_data: Path, conformance_dir: Path, config: str) -> None:
    vectors = np.load(conformance_dir / config / "vectors.npz")
    for index, name in enumerate(vectors["names"]):
        path, row = re.fullmatch(r"(.+)\[(\d+)\]", str(name)).groups()
        spectrum = {s.row: s for s in read_spectra(shared_data / path)}[int(row)]
        length = int(vectors["raw_length"][index])
        np.testing.assert_array_equal(spectrum.flux, vectors["raw_flux"][index, :length], err_msg=str(name))
        np.testing.assert_array_equal(spectrum.error, vectors["raw_error"][index, :length], err_msg=str(name))
        if config == "apogee_small":
            assert spectrum.wavelength is None and not vectors["raw_wavelength"][index].any()
        else:
            np.testing.assert_array_equal(spectrum.wavelength, vectors["raw_wavelength"][index, :length], err_msg=str(name))


# --- LAMOST DR8+ table format, built from a real DR7 file ---------------------------------------------------------
def write_dr8_table(image_file: Path, out: Path, column_case: str = "upper", cell_shape: str = "flat") -> None:
    """A DR8+-layout file (primary header + one-row COADD table) holding the arrays and header of an image file."""
    with fits.open(image_file) as hdul:
        image, header = hdul[0].data, hdul[0].header.copy()
    for key in ("EXTEN0", "EXTNAME", "NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True)
    header["NAXIS"] = 0
    npix = image.shape[1]
    shape = (1, npix) if cell_shape == "2d" else None
    names = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION")
    rows = (image[0], image[1], image[2], image[3], image[4], image[0] / np.median(image[0]))
    columns = [
        fits.Column(
            name=name if column_case == "upper" else name.lower(),
            format=f"{npix}E",
            dim=None if shape is None else f"({npix},1)",
            array=values.astype(np.float32).reshape((1, *(shape or (npix,)))),
        )
        for name, values in zip(names, rows)
    ]
    table = fits.BinTableHDU.from_columns(columns, name="COADD")
    fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(out)


@pytest.mark.parametrize(("column_case", "cell_shape", "compress"), [("upper", "flat", False), ("lower", "2d", True)])
def test_lamost_dr8_table_format(shared_data: Path, tmp_path: Path, column_case: str, cell_shape: str, compress: bool) -> None:
    (image_spectrum,) = read_spectra(shared_data / LAMOST_DR7)
    out = tmp_path / "spec-dr8.fits"
    write_dr8_table(shared_data / LAMOST_DR7, out, column_case, cell_shape)
    if compress:
        out.with_suffix(".fits.gz").write_bytes(gzip.compress(out.read_bytes()))
        out = out.with_suffix(".fits.gz")
    assert detect_survey(out) == "lamost"
    (table_spectrum,) = read_spectra(out, survey="lamost")
    assert table_spectrum.meta["format"] == "lamost-lrs-table" and table_spectrum.meta["wavelength_source"] == "table column"
    for field in ("flux", "error", "wavelength", "mask"):
        np.testing.assert_array_equal(getattr(table_spectrum, field), getattr(image_spectrum, field))
    assert (table_spectrum.object_id, table_spectrum.ra, table_spectrum.snr) == (
        image_spectrum.object_id, image_spectrum.ra, image_spectrum.snr
    )


def test_lamost_image_without_exten0_uses_header_wavelength(shared_data: Path, tmp_path: Path) -> None:
    with fits.open(shared_data / LAMOST_DR7) as hdul:
        del hdul[0].header["EXTEN0"]
        hdul.writeto(tmp_path / "no_exten0.fits")
        header = hdul[0].header
    (spectrum,) = read_spectra(tmp_path / "no_exten0.fits")
    assert spectrum.meta["wavelength_source"] == "header COEFF0/COEFF1"
    expected = (10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(3909))).astype(np.float32)
    np.testing.assert_array_equal(spectrum.wavelength, expected)


# --- broken input: a clear ReaderError, never a crash or a silent spectrum ---------------------------------------
@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("name", [APSTAR_DWARF, APVISITS[0], BOSS_FULL, LAMOST_DR7])
def test_truncated_files_are_rejected(shared_data: Path, tmp_path: Path, name: str) -> None:
    data = (shared_data / name).read_bytes()
    for cut in (len(data) // 3, len(data) - 2880):
        path = tmp_path / f"cut{cut}.fits"
        path.write_bytes(data[:cut])
        with pytest.raises(ReaderError):
            read_spectra(path)


@pytest.mark.filterwarnings("ignore:Error validating header")
def test_file_cut_inside_a_header_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    with fits.open(shared_data / BOSS_FULL) as hdul:
        header_start = hdul.fileinfo(5)["hdrLoc"]
    (tmp_path / "cut.fits").write_bytes((shared_data / BOSS_FULL).read_bytes()[: header_start + 1000])
    with pytest.raises(ReaderError, match="after the last complete HDU"):
        read_spectra(tmp_path / "cut.fits")


def test_truncated_gzip_and_garbage_are_rejected(shared_data: Path, tmp_path: Path) -> None:
    data = (shared_data / LAMOST_DR6).read_bytes()
    for cut in (len(data) // 2, len(data) - 10):  # the second cut keeps every FITS byte but loses the gzip trailer
        (tmp_path / "cut.fits.gz").write_bytes(data[:cut])
        with pytest.raises(ReaderError, match="gzip"):
            read_spectra(tmp_path / "cut.fits.gz")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(ReaderError, match="not a readable FITS file"):
        read_spectra(garbage)
    (tmp_path / "empty.fits").write_bytes(b"")
    with pytest.raises(ReaderError, match="empty"):
        read_spectra(tmp_path / "empty.fits")
    with pytest.raises(ReaderError, match="cannot read"):
        read_spectra(tmp_path / "missing.fits")


def _rewrite(source: Path, out: Path, edit) -> Path:
    with fits.open(source) as hdul:
        edit(hdul)
        hdul.writeto(out)
    return out


def test_all_nan_flux_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    def nan_image(index: int):
        def edit(hdul: fits.HDUList) -> None:
            hdul[index].data = np.full_like(hdul[index].data, np.nan)
        return edit

    def nan_lamost_flux(hdul: fits.HDUList) -> None:
        hdul[0].data[0] = np.nan

    def nan_boss_flux(hdul: fits.HDUList) -> None:
        hdul[1].data["flux"] = np.nan

    cases = [(APSTAR_DWARF, nan_image(1)), (APVISITS[0], nan_image(1)), (LAMOST_DR7, nan_lamost_flux), (BOSS_LITE, nan_boss_flux)]
    for index, (name, edit) in enumerate(cases):
        path = _rewrite(shared_data / name, tmp_path / f"nan{index}.fits", edit)
        with pytest.raises(ReaderError, match="NaN or infinite everywhere"):
            read_spectra(path)


def test_zero_ivar_everywhere_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    def zero_lamost(hdul: fits.HDUList) -> None:
        hdul[0].data[1] = 0.0

    def zero_boss(hdul: fits.HDUList) -> None:
        hdul[1].data["ivar"] = 0.0

    for name, edit in ((LAMOST_DR1_DIR + "/spec-55862-B6212_sp06-072.fits", zero_lamost), (BOSS_FULL, zero_boss)):
        path = _rewrite(shared_data / name, tmp_path / Path(name).name, edit)
        with pytest.raises(ReaderError, match="inverse variance is zero everywhere"):
            read_spectra(path)


# --- error from inverse variance (reference reverse_inverse_error) ---------------------------------------------
def test_reverse_inverse_error_reference_rules() -> None:
    ivar = np.array([4.0, 1.0, 0.0, np.nan, -1.0, 0.25, 1e-6], dtype=np.float32)
    error = reverse_inverse_error(ivar, default_error=7.0)
    finite = np.array([0.5, 1.0, 2.0, 1000.0], dtype=np.float32)  # errors of ivar 4, 1, 0.25, 1e-6
    cap = np.float32(5) * np.median(finite)  # median of the non-inf errors (1.5) × 5
    np.testing.assert_array_equal(error, np.array([0.5, 1.0, cap, cap, cap, 2.0, cap], dtype=np.float32))
    assert error.dtype == np.float32
    np.testing.assert_array_equal(reverse_inverse_error(np.zeros(4, np.float32), 7.0), np.full(4, 7.0, np.float32))


# --- the shipped sample ----------------------------------------------------------------------------------------------
def test_shipped_sample_reads_and_matches_its_provenance() -> None:
    provenance = (SAMPLE_DIR.parent / "PROVENANCE.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` .*\| `([0-9a-f]{64})` \|$", provenance, flags=re.MULTILINE))
    files = sorted(p for p in Path(str(SAMPLE_DIR)).rglob("*") if p.is_file())
    assert {str(p.relative_to(Path(str(SAMPLE_DIR)))) for p in files} == set(listed)
    assert sum(p.stat().st_size for p in files) < 5_000_000
    counts: dict[str, int] = {}
    for path in files:
        assert sha256(path) == listed[str(path.relative_to(Path(str(SAMPLE_DIR))))]
        if ".fits" in path.name:
            for spectrum in read_spectra(path):
                counts[spectrum.survey] = counts.get(spectrum.survey, 0) + 1
    assert counts == {"apogee": 3, "boss": 2, "lamost": 10}
