"""Every constant of the pipeline in one place: model grids, label normalisation, DR19 calibration and flag bits.

Sources: ../shared/SPEC.md §1–§6 (grids, stats, calibration, flags) and the DR19 APOGEENet data-model page.
"""
from __future__ import annotations

import enum
from functools import lru_cache

import numpy as np

# --- APOGEE apStar grid (vacuum, log-linear): log10(lambda/Å) = CRVAL1 + CDELT1 * i -------------------------
APOGEE_LOGLAM0: float = 4.179
APOGEE_DLOGLAM: float = 6e-6
APOGEE_NPIX: int = 8575

# --- common optical grid for BOSS and LAMOST (Å, linear) ------------------------------------------------------
OPTICAL_MIN_AA: float = 3800.0
OPTICAL_MAX_AA: float = 8900.0
OPTICAL_NPIX: int = 3900

GRID_APOGEE = "apogee"
GRID_OPTICAL = "optical"
GRIDS: tuple[str, ...] = (GRID_APOGEE, GRID_OPTICAL)

SURVEYS: tuple[str, ...] = ("apogee", "boss", "lamost")
SURVEY_GRID: dict[str, str] = {"apogee": GRID_APOGEE, "boss": GRID_OPTICAL, "lamost": GRID_OPTICAL}
KIND_COMBINED = "combined"
KIND_VISIT = "visit"

# --- pixel masks and times -------------------------------------------------------------------------------------
# Model-grid pixel with no native pixel under it (outside a spectrum's wavelength range, or an APOGEE chip gap after
# resampling an apVisit). Above every survey's own bits (APOGEE PIXMASK, SDSS SPPIXMASK, LAMOST andmask fit in 32 bits).
PIXMASK_NO_COVERAGE: int = 1 << 40
MJD_OFFSET: float = 2400000.5  # Julian date of MJD 0 (JD = MJD + MJD_OFFSET)


@lru_cache(maxsize=None)
def apogee_wavelength() -> np.ndarray:
    """apStar wavelength grid in Å (float64, 8575 px, 15100.8–16999.8 Å)."""
    return 10.0 ** (APOGEE_LOGLAM0 + APOGEE_DLOGLAM * np.arange(APOGEE_NPIX))


@lru_cache(maxsize=None)
def optical_wavelength() -> np.ndarray:
    """Optical model grid in Å: exactly ``torch.linspace(3800, 8900, 3900)`` in float32 (the reference grid;
    344 values differ by one ulp from numpy's linspace)."""
    import torch

    return torch.linspace(OPTICAL_MIN_AA, OPTICAL_MAX_AA, OPTICAL_NPIX).numpy()


def grid_wavelength(grid: str) -> np.ndarray:
    """Wavelength array (Å) of a model grid by name (``apogee`` or ``optical``)."""
    if grid == GRID_APOGEE:
        return apogee_wavelength()
    if grid == GRID_OPTICAL:
        return optical_wavelength()
    raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")


# --- label normalisation (network outputs are z-scores: value = out * STD + MEAN) ----------------------------
# BossNet family output order; BOSS Net adds rv (km/s).
BOSSNET_PARAMS_APOGEE: tuple[str, ...] = ("logg", "logTeff", "FeH")
BOSSNET_PARAMS_BOSS: tuple[str, ...] = ("logg", "logTeff", "FeH", "rv")
LABEL_STATS: dict[str, dict[str, tuple[float, float]]] = {
    # name -> {param: (MEAN, STD)}
    "apogee": {"logg": (3.2, 1.2), "logTeff": (3.7, 0.1), "FeH": (-0.2, 0.3)},
    "boss": {"logg": (3.9, 0.9), "logTeff": (3.8, 0.1), "FeH": (-0.4, 0.5), "rv": (-7.4, 60.9)},
    "apogeenet2": {"logTeff": (3.67057, 0.09177), "logg": (2.92578, 1.18907), "FeH": (-0.13088, 0.25669)},
    "apogeenet1": {"logg": (2.88, 1.16), "Teff": (4716.92, 733.01), "FeH": (-0.22, 0.30)},
}
# APOGEE Net II metadata inputs (parallax mas, magnitudes mag): (replacement for a missing value, MEAN, STD) of the
# reference implementation (hutchresearch APOGEE Net II / Astra ApogeeNetV2); input = (value - MEAN) / STD.
APOGEENET2_PHOTOMETRY_STATS: dict[str, tuple[float, float, float]] = {
    "parallax": (-84.82700, -0.6959113178296891, 14.572430555504504),
    "phot_g_mean_mag": (21.40844, 13.630030428758845, 2.2762944923233883),
    "phot_bp_mean_mag": (24.53892, 14.5224418320574, 2.8342029214199704),
    "phot_rp_mean_mag": (20.26276, 12.832448427460813, 2.136884367623457),
    "tmass_j": (18.43900, 11.537019017423619, 1.6793628207779732),
    "tmass_h": (24.00000, 10.858717523536697, 1.4888102872755238),
    "tmass_k": (17.02500, 10.702106344460235, 1.5848713221149886),
}

# --- preprocessing (SPEC §2) ---------------------------------------------------------------------------------
FLUX_FLOOR: float = 1e-6
CLIP_QUANTILE: float = 0.95
CLIP_OFFSET: float = 1.0  # clip log flux above quantile + 1 (reference code, not the DR19 prose)

# --- Monte-Carlo uncertainties (SPEC §4) ---------------------------------------------------------------------
DEFAULT_DRAWS: int = 20
ERROR_CAP_FACTOR: float = 5.0  # cap pixel errors at 5 x the spectrum's median error
DEFAULT_ERROR_FRACTION: float = 0.1  # all-bad error: 0.1 x median(flux)

# --- DR19 error calibration (SPEC §5): recommended = scale * raw + offset -------------------------------------
ERROR_CALIBRATION: dict[str, tuple[float, float]] = {
    "teff": (1.25, 10.0),  # K
    "logg": (1.25, 0.01),  # dex
    "fe_h": (1.0, 0.01),  # dex
}


# --- result_flags thresholds: the DR19 ranges (SPEC §6) and our documented defaults (docs/release.md) -----------
LOG_TEFF_RANGE: tuple[float, float] = (3.1, 4.7)  # TEFF_UNRELIABLE outside (open interval), log10(K)
LOGG_RANGE: tuple[float, float] = (-1.5, 6.0)  # LOGG_UNRELIABLE outside, dex
FE_H_RANGE: tuple[float, float] = (-2.0, 0.5)  # FE_H_UNRELIABLE outside, dex
FE_H_MAX_LOG_TEFF: float = 3.82  # FE_H_UNRELIABLE above this log10(teff): hot stars (value kept)
E_TEFF_LARGE_FRACTION: float = 0.05  # E_TEFF_LARGE when e_teff > this fraction of teff
E_LOGG_LARGE_DEX: float = 0.3  # E_LOGG_LARGE when e_logg above, dex
E_FE_H_LARGE_DEX: float = 0.3  # E_FE_H_LARGE when e_fe_h above, dex
SNR_MIN: float = 10.0  # RESULT_UNRELIABLE below this survey S/N
MIN_GOOD_PIXEL_FRACTION: float = 0.5  # RESULT_UNRELIABLE below this fraction of finite, positive grid pixels


class ResultFlag(enum.IntFlag):
    """DR19 ``result_flags`` bits (SPEC §6)."""

    TEFF_UNRELIABLE = 1 << 0
    LOGG_UNRELIABLE = 1 << 1
    FE_H_UNRELIABLE = 1 << 2
    E_TEFF_UNRELIABLE = 1 << 3
    E_LOGG_UNRELIABLE = 1 << 4
    E_FE_H_UNRELIABLE = 1 << 5
    E_TEFF_LARGE = 1 << 6
    E_LOGG_LARGE = 1 << 7
    E_FE_H_LARGE = 1 << 8
    MISSING_PHOTOMETRY = 1 << 9
    RESULT_UNRELIABLE = 1 << 10
    NO_RESULT = 1 << 11


FLAG_WARN_MASK = ResultFlag.E_TEFF_LARGE | ResultFlag.E_LOGG_LARGE | ResultFlag.E_FE_H_LARGE | ResultFlag.MISSING_PHOTOMETRY
FLAG_BAD_MASK = (
    ResultFlag.RESULT_UNRELIABLE
    | ResultFlag.TEFF_UNRELIABLE
    | ResultFlag.LOGG_UNRELIABLE
    | ResultFlag.FE_H_UNRELIABLE
    | ResultFlag.E_TEFF_UNRELIABLE
    | ResultFlag.E_LOGG_UNRELIABLE
    | ResultFlag.E_FE_H_UNRELIABLE
    | ResultFlag.NO_RESULT
)
