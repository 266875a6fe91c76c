"""Per-spectrum input quality, computed once at ingest from the grid arrays and stored with the spectrum, so that no
later stage (inference, flags, release) has to read flux again."""
from __future__ import annotations

import numpy as np

from catalogbuilder.constants import FLUX_FLOOR
from catalogbuilder.readers.base import usable_errors


def good_pixel_fraction(flux: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Per row of (spectra, pixels) grid arrays: the fraction of pixels with finite positive flux (the ones the model
    input does not floor to 1e-6) and a usable error (finite, > 0, not absurdly large; ``readers.base.usable_errors``),
    float32."""
    with np.errstate(invalid="ignore"):
        good = np.isfinite(flux) & (flux > 0) & usable_errors(flux, error)
    return good.mean(axis=-1).astype(np.float32)


def flux_constant(flux: np.ndarray) -> np.ndarray:
    """Per row: True when the model input is constant — after the 1e-6 floor every pixel is equal (all zero, all
    negative or all NaN flux). The model still predicts such a spectrum; its result is RESULT_UNRELIABLE."""
    floored = np.fmax(np.nan_to_num(flux, nan=FLUX_FLOOR, posinf=FLUX_FLOOR, neginf=FLUX_FLOOR), FLUX_FLOOR)
    return np.ptp(floored, axis=-1) == 0
