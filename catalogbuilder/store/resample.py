"""Put a :class:`~catalogbuilder.readers.base.Spectrum` on its model grid (``constants.grid_wavelength``).

Optical spectra (BOSS, LAMOST) are linearly interpolated onto the 3900-pixel grid with the BOSS Net reference
semantics (conformance README step 3): NaN-flux pixels are dropped together with their wavelengths, ``np.interp``
(float64 arithmetic on the float32 inputs, float32 result) with edge values held outside the native range. The
error is interpolated the same way; the mask of a grid point is the OR of its two bracketing native pixels, plus
:data:`~catalogbuilder.constants.PIXMASK_NO_COVERAGE` where the grid point lies outside the native range
(the interpolation itself is :func:`catalogbuilder.readers.base.interpolate_onto`, shared with the apVisit reader).
Spectra with ``wavelength is None`` (apStar rows) are already on their grid and pass through unchanged.
"""
from __future__ import annotations

import numpy as np

from catalogbuilder.constants import grid_wavelength
from catalogbuilder.readers.base import Spectrum, interpolate_onto


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
