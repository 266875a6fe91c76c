"""Put a :class:`~catalogbuilder.readers.base.Spectrum` on its model grid (``constants.grid_wavelength``).

Optical spectra (BOSS, LAMOST) are linearly interpolated onto the 3900-pixel grid with the BOSS Net reference
semantics (conformance README step 3): NaN-flux pixels are dropped together with their wavelengths, ``np.interp``
(float64 arithmetic on the float32 inputs, float32 result) with edge values held outside the native range. The
error is interpolated the same way; the mask of a grid point is the OR of its two bracketing native pixels, plus
the grid's no-coverage bit (``GridSpec.no_coverage``) where the grid point lies outside the native range
(the interpolation itself is :func:`catalogbuilder.readers.base.interpolate_onto`, shared with the apVisit reader).
Spectra with ``wavelength is None`` (apStar rows) are already on their grid and pass through unchanged.
"""
from __future__ import annotations

import numpy as np

from catalogbuilder.constants import GRID_SPECS
from catalogbuilder.readers.base import Spectrum, interpolate_onto


def survey_mask(spectrum: Spectrum) -> np.ndarray:
    """The spectrum's own pixel mask in its grid's mask dtype, keeping the survey bits the grid stores (bits above are
    defined by none of the surveys and are cleared; the grid's top bit is reserved for no-coverage)."""
    spec = GRID_SPECS[spectrum.grid]
    return (np.asarray(spectrum.mask, dtype=np.int64) & spec.survey_bits).astype(spec.mask_dtype)


def to_model_grid(spectrum: Spectrum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """flux (float32), error (float32, 1σ) and mask (the grid's mask dtype) of ``spectrum`` on its model grid."""
    spec = GRID_SPECS[spectrum.grid]
    target = spec.wavelength()
    if spectrum.wavelength is None:  # already on the grid; resampled apVisits carry the grid's no-coverage bit
        if spectrum.flux.shape != target.shape:
            raise ValueError(
                f"spectrum without wavelengths has {spectrum.flux.size} pixels, grid {spectrum.grid!r} has {target.size}"
            )
        keep = spec.survey_bits | spec.no_coverage
        return (
            np.asarray(spectrum.flux, dtype=np.float32),
            np.asarray(spectrum.error, dtype=np.float32),
            (np.asarray(spectrum.mask, dtype=np.int64) & keep).astype(spec.mask_dtype),
        )
    flux, error, mask = interpolate_onto(
        np.asarray(spectrum.wavelength, dtype=np.float32),
        np.asarray(spectrum.flux, dtype=np.float32),
        np.asarray(spectrum.error, dtype=np.float32),
        survey_mask(spectrum).astype(np.int64),
        target,
        spec.no_coverage,
    )
    return flux, error, mask.astype(spec.mask_dtype)
