"""to_model_grid: reference interpolation semantics, checked against the boss_small conformance vectors."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from catalogbuilder.constants import APOGEE_NPIX, CLIP_OFFSET, CLIP_QUANTILE, FLUX_FLOOR, GRID_SPECS, optical_wavelength
from catalogbuilder.readers import read_spectra

NO_COVERAGE = GRID_SPECS["optical"].no_coverage
from catalogbuilder.readers.base import interpolate_onto
from catalogbuilder.store.resample import to_model_grid

BOSS_LITE = "boss/spec-0266-51602-0031.fits"
LAMOST_MASKED = "lamost/dr1_learninglamost/spec-55862-B6212_sp06-117.fits"  # 1455 ivar = 0 pixels, andmask set


def log_clip(flux: np.ndarray) -> np.ndarray:
    """Reference log scaling of one spectrum (local copy for the test; production code is models.preprocess)."""
    log_flux = torch.log(torch.clamp(torch.from_numpy(flux), min=FLUX_FLOOR))
    return torch.minimum(log_flux, torch.quantile(log_flux, CLIP_QUANTILE) + CLIP_OFFSET).numpy()


def test_optical_grid_is_the_reference_grid(conformance_dir: Path) -> None:
    vectors = np.load(conformance_dir / "boss_small" / "vectors.npz")
    np.testing.assert_array_equal(optical_wavelength(), vectors["linear_grid"])


def test_conformance_model_input_from_reference_and_from_our_readers(shared_data: Path, conformance_dir: Path) -> None:
    vectors = np.load(conformance_dir / "boss_small" / "vectors.npz")
    grid = optical_wavelength()
    for index, name in enumerate(vectors["names"]):
        length = int(vectors["raw_length"][index])
        reference_flux, _, _ = interpolate_onto(
            vectors["raw_wavelength"][index, :length],
            vectors["raw_flux"][index, :length],
            vectors["raw_error"][index, :length],
            np.zeros(length, np.int64),
            grid,
            NO_COVERAGE,
        )
        np.testing.assert_allclose(log_clip(reference_flux), vectors["model_input"][index], rtol=0, atol=1e-5)
        path = re.fullmatch(r"(.+)\[0\]", str(name)).group(1)
        (spectrum,) = read_spectra(shared_data / path)
        flux, error, mask = to_model_grid(spectrum)
        assert flux.dtype == error.dtype == np.float32 and mask.dtype == np.uint32 and flux.shape == grid.shape
        np.testing.assert_allclose(log_clip(flux), vectors["model_input"][index], rtol=0, atol=1e-5, err_msg=str(name))
        assert np.all(np.isfinite(error)) and np.all(error > 0)


def test_grid_points_outside_the_native_range_hold_the_edge_and_are_flagged(shared_data: Path) -> None:
    (spectrum,) = read_spectra(shared_data / BOSS_LITE)  # native grid starts at 3800.1 Å, ends at 9202 Å
    flux, error, mask = to_model_grid(spectrum)
    outside = optical_wavelength() < spectrum.wavelength[0]
    assert outside.sum() == 1
    assert flux[0] == spectrum.flux[0] and error[0] == spectrum.error[0]
    assert mask[0] & NO_COVERAGE and not np.any(mask[~outside] & NO_COVERAGE)


def test_mask_is_or_of_the_bracketing_native_pixels(shared_data: Path) -> None:
    (spectrum,) = read_spectra(shared_data / LAMOST_MASKED)
    assert spectrum.mask.any()
    _, _, mask = to_model_grid(spectrum)
    grid = optical_wavelength()
    upper = np.searchsorted(spectrum.wavelength, grid)  # first native pixel at or above each grid point
    for point in range(0, grid.size, 7):
        above = spectrum.mask[upper[point]]
        below = spectrum.mask[upper[point] - 1] if spectrum.wavelength[upper[point]] > grid[point] else above
        assert mask[point] == below | above
    assert 0 < np.count_nonzero(mask) < grid.size


def test_nan_flux_pixels_are_dropped_with_their_wavelength(shared_data: Path) -> None:
    (spectrum,) = read_spectra(shared_data / BOSS_LITE)
    holes = np.zeros(spectrum.flux.size, bool)
    holes[1000:1040] = True
    holed = dataclasses.replace(spectrum, flux=np.where(holes, np.float32(np.nan), spectrum.flux))
    flux, error, _ = to_model_grid(holed)
    grid = optical_wavelength()
    keep = ~holes
    np.testing.assert_array_equal(flux, np.interp(grid, spectrum.wavelength[keep], spectrum.flux[keep]).astype(np.float32))
    np.testing.assert_array_equal(error, np.interp(grid, spectrum.wavelength[keep], spectrum.error[keep]).astype(np.float32))
    assert np.all(np.isfinite(flux))


def test_descending_wavelengths_give_the_same_result(shared_data: Path) -> None:
    (spectrum,) = read_spectra(shared_data / BOSS_LITE)
    reverse = slice(None, None, -1)
    reversed_spectrum = dataclasses.replace(
        spectrum,
        flux=spectrum.flux[reverse],
        error=spectrum.error[reverse],
        mask=spectrum.mask[reverse],
        wavelength=spectrum.wavelength[reverse],
    )
    for a, b in zip(to_model_grid(spectrum), to_model_grid(reversed_spectrum)):
        np.testing.assert_array_equal(a, b)


def test_apstar_rows_pass_through_and_bad_lengths_fail(shared_data: Path) -> None:
    spectra = read_spectra(shared_data / "apogee/apStar-dr17-2M17335483-2753043.fits")
    for spectrum in spectra:
        flux, error, mask = to_model_grid(spectrum)
        assert flux.shape == (APOGEE_NPIX,)
        np.testing.assert_array_equal(flux, spectrum.flux)
        np.testing.assert_array_equal(error, spectrum.error)
        np.testing.assert_array_equal(mask, spectrum.mask)  # APOGEE bits 0-14 all kept
        assert mask.dtype == np.uint16
    short = dataclasses.replace(spectra[0], flux=spectra[0].flux[:100])
    with pytest.raises(ValueError, match="8575"):
        to_model_grid(short)
    (optical,) = read_spectra(shared_data / BOSS_LITE)
    with pytest.raises(ValueError, match="no non-NaN flux"):
        to_model_grid(dataclasses.replace(optical, flux=np.full_like(optical.flux, np.nan)))
