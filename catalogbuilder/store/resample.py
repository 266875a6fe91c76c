"""Put a :class:`~catalogbuilder.readers.base.Spectrum` on its model grid (``constants.grid_wavelength``).

Optical spectra (BOSS, LAMOST) are linearly interpolated onto the 3900-pixel grid with the BOSS Net reference
semantics (conformance README step 3): NaN-flux pixels are dropped together with their wavelengths, ``np.interp``
(float64 arithmetic on the float32 inputs, float32 result) with edge values held outside the native range. The
error is interpolated the same way; the mask of a grid point is the OR of its two bracketing native pixels, plus
:data:`~catalogbuilder.readers.base.PIXMASK_NO_COVERAGE` where the grid point lies outside the native range.
Spectra with ``wavelength is None`` (apStar rows) are already on their grid and pass through unchanged.
"""
from __future__ import annotations

import numpy as np

from catalogbuilder.constants import grid_wavelength
from catalogbuilder.readers.base import PIXMASK_NO_COVERAGE, Spectrum


def bracketing_mask(native_wavelength: np.ndarray, native_mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """int64 mask on ``target``: OR of the native pixels just below and just above each target wavelength
    (the one pixel at the ends), with :data:`PIXMASK_NO_COVERAGE` outside [first, last] native wavelength."""
    native_mask = np.asarray(native_mask, dtype=np.int64)
    upper = np.searchsorted(native_wavelength, target, side="left").clip(0, native_wavelength.size - 1)
    lower = (np.searchsorted(native_wavelength, target, side="right") - 1).clip(0, native_wavelength.size - 1)
    mask = native_mask[lower] | native_mask[upper]
    outside = (target < native_wavelength[0]) | (target > native_wavelength[-1])
    return np.where(outside, mask | PIXMASK_NO_COVERAGE, mask)


def interpolate_onto(
    wavelength: np.ndarray, flux: np.ndarray, error: np.ndarray, mask: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of one spectrum onto ``target`` wavelengths (Å) with the reference semantics.

    Pixels with NaN flux are dropped with their wavelength; wavelengths are sorted if they are not ascending;
    outside the native range the first/last value is held. Returns float32 flux and error, int64 mask.
    Raises ``ValueError`` when no pixel has a finite flux.
    """
    keep = ~np.isnan(flux)
    if not keep.any():
        raise ValueError("spectrum has no non-NaN flux pixel to interpolate")
    wavelength, flux, error, mask = wavelength[keep], flux[keep], error[keep], mask[keep]
    if np.any(np.diff(wavelength) < 0):
        order = np.argsort(wavelength, kind="stable")
        wavelength, flux, error, mask = wavelength[order], flux[order], error[order], mask[order]
    return (
        np.interp(target, wavelength, flux).astype(np.float32),
        np.interp(target, wavelength, error).astype(np.float32),
        bracketing_mask(wavelength, mask, target),
    )


def to_model_grid(spectrum: Spectrum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """flux (float32), error (float32, 1σ) and mask (int64) of ``spectrum`` on ``grid_wavelength(spectrum.grid)``."""
    target = grid_wavelength(spectrum.grid)
    if spectrum.wavelength is None:
        if spectrum.flux.shape != target.shape:
            raise ValueError(
                f"spectrum without wavelengths has {spectrum.flux.size} pixels, grid {spectrum.grid!r} has {target.size}"
            )
        return (
            np.asarray(spectrum.flux, dtype=np.float32),
            np.asarray(spectrum.error, dtype=np.float32),
            np.asarray(spectrum.mask, dtype=np.int64),
        )
    return interpolate_onto(
        np.asarray(spectrum.wavelength, dtype=np.float32),
        np.asarray(spectrum.flux, dtype=np.float32),
        np.asarray(spectrum.error, dtype=np.float32),
        np.asarray(spectrum.mask, dtype=np.int64),
        target,
    )
