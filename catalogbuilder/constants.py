"""Every constant of the pipeline in one place: model grids, label normalisation, DR19 calibration and flag bits.

Sources: ../shared/SPEC.md §1–§6 (grids, stats, calibration, flags) and the DR19 APOGEENet data-model page.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass
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

SURVEYS: tuple[str, ...] = ("apogee", "boss", "lamost")
# ``read_spectra``/``ingest --survey`` values: detect, or one reader's format (readers.READERS checks it has them all)
SURVEY_CHOICES: tuple[str, ...] = ("auto", "apogee", "apogee-visit", "boss", "lamost")
# Canonical model outputs (SpectralModel.outputs): teff K, logg dex, fe_h dex, rv km/s
MODEL_OUTPUTS: tuple[str, ...] = ("teff", "logg", "fe_h", "rv")
SURVEY_GRID: dict[str, str] = {"apogee": GRID_APOGEE, "boss": GRID_OPTICAL, "lamost": GRID_OPTICAL}
KIND_COMBINED = "combined"  # a star-level (coadded) spectrum: apStar row 0, a BOSS/LAMOST spectrum
KIND_COMBINED_ALT = "combined-alt"  # apStar row 1, the global-weighting coadd: stored, never predicted nor released
KIND_VISIT = "visit"  # one visit: apStar rows 2.., apVisit files
KINDS: tuple[str, ...] = (KIND_COMBINED, KIND_COMBINED_ALT, KIND_VISIT)
PREDICTED_KINDS: tuple[str, ...] = (KIND_COMBINED, KIND_VISIT)
# Surveys without a star-level coadd in the supported files: every spectrum is a visit (allVisit), and a star's
# allStar row is its highest-S/N spectrum (docs/release.md).
SURVEYS_WITHOUT_STAR_SPECTRUM: tuple[str, ...] = ("boss", "lamost")

MJD_OFFSET: float = 2400000.5  # Julian date of MJD 0 (JD = MJD + MJD_OFFSET)


@dataclass(frozen=True)
class GridSpec:
    """A model grid: its wavelengths and how its pixel masks are stored.

    ``spacing``: ``log-linear`` (log10 λ = start + step·i, float64, the apStar grid) or ``linear`` (exactly
    ``torch.linspace(start, stop, pixels)`` in float32, the reference's optical grid; start/stop in Å). ``mask_dtype`` is the narrowest
    unsigned integer holding the survey pixel bits of the spectra on it; its top bit is ``no_coverage``, set on grid
    pixels no native pixel covers (outside a spectrum's wavelength range, APOGEE chip gaps of resampled visits).
    The built-in grids (:data:`GRID_SPECS`) are those the ingest writes; a model may declare another one on the
    wavelengths of a resampled grid's spectra (``base``), which ``store regrid`` fills from their native pixels.
    """

    name: str
    spacing: str
    start: float
    pixels: int
    mask_dtype: str
    stop: float | None = None  # linear: last wavelength (Å)
    step: float | None = None  # log-linear: log10 step per pixel
    resampled: bool = False  # spectra are interpolated onto it (their native pixels are kept beside the base grid)
    base: str | None = None  # a derived grid (``store regrid``): the ingest grid whose spectra and native pixels it uses

    def __post_init__(self) -> None:
        needed = {"linear": "stop", "log-linear": "step"}.get(self.spacing)
        if needed is None or getattr(self, needed) is None or self.pixels < 2:
            raise ValueError(f"grid {self.name!r}: spacing must be linear (with stop) or log-linear (with step) and "
                             f"pixels >= 2; got {self.spacing!r}, stop={self.stop}, step={self.step}, pixels={self.pixels}")

    @property
    def no_coverage(self) -> int:
        """The mask bit of grid pixels without a native pixel under them (the dtype's top bit)."""
        return 1 << (np.dtype(self.mask_dtype).itemsize * 8 - 1)

    @property
    def survey_bits(self) -> int:
        """Every survey mask bit the grid stores (all bits below :attr:`no_coverage`)."""
        return self.no_coverage - 1

    def wavelength(self) -> np.ndarray:
        """Wavelengths of the grid in Å (vacuum)."""
        return _grid_wavelength(self)


@lru_cache(maxsize=None)
def _grid_wavelength(grid: GridSpec) -> np.ndarray:
    if grid.spacing == "log-linear":
        return 10.0 ** (grid.start + grid.step * np.arange(grid.pixels))
    import torch

    return torch.linspace(grid.start, grid.stop, grid.pixels).numpy()


# apStar: log10(λ/Å) = 4.179 + 6e-6·i; APOGEE PIXMASK uses bits 0–14. Optical: SDSS and_mask bits 0–29, LAMOST andmask
# bits 0–6, so 32 bits with the top one for no-coverage.
GRID_SPECS: dict[str, GridSpec] = {
    GRID_APOGEE: GridSpec(GRID_APOGEE, "log-linear", APOGEE_LOGLAM0, APOGEE_NPIX, "uint16", step=APOGEE_DLOGLAM),
    GRID_OPTICAL: GridSpec(GRID_OPTICAL, "linear", OPTICAL_MIN_AA, OPTICAL_NPIX, "uint32", stop=OPTICAL_MAX_AA,
                           resampled=True),
}
GRIDS: tuple[str, ...] = tuple(GRID_SPECS)
# Model grids that are the survey's own pixels (apStar): Monte-Carlo noise is drawn on them directly. On the other grids
# (optical: BOSS, LAMOST resampled at ingest) it is drawn on the native pixels before the interpolation (SPEC §4).
NATIVE_PIXEL_GRIDS: tuple[str, ...] = tuple(name for name, spec in GRID_SPECS.items() if not spec.resampled)
# Grids whose spectra keep their native pixels in the store: a model may define its own grid on them (``base``).
RESAMPLED_GRIDS: tuple[str, ...] = tuple(name for name, spec in GRID_SPECS.items() if spec.resampled)
DERIVED_GRID_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"  # a derived grid's name: a store group, a results partition key


def apogee_wavelength() -> np.ndarray:
    """apStar wavelength grid in Å (float64, 8575 px, 15100.8–16999.8 Å)."""
    return GRID_SPECS[GRID_APOGEE].wavelength()


def optical_wavelength() -> np.ndarray:
    """Optical model grid in Å: exactly ``torch.linspace(3800, 8900, 3900)`` in float32 (the reference grid;
    344 values differ by one ulp from numpy's linspace)."""
    return GRID_SPECS[GRID_OPTICAL].wavelength()


def grid_wavelength(grid: str) -> np.ndarray:
    """Wavelength array (Å) of a model grid by name (``apogee`` or ``optical``)."""
    if grid not in GRID_SPECS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    return GRID_SPECS[grid].wavelength()


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
# A pixel's 1σ error is usable when finite, > 0 and below this many times the spectrum's median |flux| (APOGEE marks bad
# pixels with errors of 1e10 and more). A file of APOGEE spectra none of whose pixels has a usable error is rejected,
# as a BOSS/LAMOST file with zero inverse variance everywhere is; rows without usable pixels are RESULT_UNRELIABLE.
USABLE_ERROR_MAX_RATIO: float = 100.0
DEFAULT_ERROR_FRACTION: float = 0.1  # all-bad error: 0.1 x median(flux)
# Value = median of the draws; the noiseless prediction of the grid flux, which the reference also writes, is kept as
# the output column "noiseless_<output>" (e.g. noiseless_teff).
NOISELESS_PREFIX: str = "noiseless_"

# --- distributed inference defaults (inference/graph.py, `catalogbuilder infer`, the workflow YAML) ---------------
DEFAULT_BATCH_SIZE: int = 256  # spectra per model.predict call (= a store chunk); the model splits it into forward passes
DEFAULT_RETRIES: int = 2  # extra attempts of a task whose worker died or that raised
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # where workers run a model; auto: cuda on workers holding a GPU
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bf16")  # inference arithmetic; float32 reproduces the reference
# the BossNet family's convolutions (models/convolution.py): measured per layer, torch's own, or the FFT form
CONVOLUTION_MODES: tuple[str, ...] = ("auto", "direct", "fft")
ROWS_TUNING_MIN_SPECTRA: int = 512  # pending spectra per slot from which workers measure the rows per forward pass

# --- cross-match ------------------------------------------------------------------------------------------------
DEFAULT_RADIUS_ARCSEC: float = 1.0  # nearest catalog source within this separation, arcsec

# --- missing values of input tables and headers (catalogbuilder/tables.py, docs/tables.md) -----------------------
SENTINEL_MAX: float = -999.0  # any numeric input at or below this is a "no value" placeholder (-999, -9999, -9999.99)
MAGNITUDE_LIMIT: float = 50.0  # mag: |m| at or above this is a placeholder (99, 99.99, 999, -9999.99); real |m| < 30
MAX_MAGNITUDE_ERROR: float = 1.0  # mag: a magnitude whose 1σ error exceeds this is not a measurement (2MASS 9.99x)

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
MIN_GOOD_PIXEL_FRACTION: float = 0.5  # RESULT_UNRELIABLE below this fraction of grid pixels with positive flux + usable error


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


# Values the flag rules are written with; the names of the overridable ones are the fields of
# calibrate.flags.FlagThresholds (``--threshold NAME=VALUE``), ``required`` is the list of required photometric inputs.
FLAG_RULE_VALUES: dict[str, float] = {
    "log_teff_low": LOG_TEFF_RANGE[0], "log_teff_high": LOG_TEFF_RANGE[1],
    "logg_low": LOGG_RANGE[0], "logg_high": LOGG_RANGE[1],
    "fe_h_low": FE_H_RANGE[0], "fe_h_high": FE_H_RANGE[1], "hot_log_teff": FE_H_MAX_LOG_TEFF,
    "e_teff_fraction": E_TEFF_LARGE_FRACTION, "e_logg_max": E_LOGG_LARGE_DEX, "e_fe_h_max": E_FE_H_LARGE_DEX,
    "snr_min": SNR_MIN, "min_good_pixel_fraction": MIN_GOOD_PIXEL_FRACTION,
}
FLAG_GROUPS: tuple[str, ...] = ("bad", "warn")  # bad: the row's values are not to be used (flag_bad); warn: flag_warn


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One ``result_flags`` bit: the flag, its group (``bad`` or ``warn``) and its rule, an ASCII template (FITS headers
    hold ASCII only) formatted with :data:`FLAG_RULE_VALUES` and, for :meth:`description`, the thresholds in force."""

    flag: ResultFlag
    group: str
    rule: str

    @property
    def bit(self) -> int:
        """Bit number (0 = least significant)."""
        return int(self.flag).bit_length() - 1

    @property
    def name(self) -> str:
        """Bit name, as in ``ResultFlag``."""
        return str(self.flag.name)

    def description(self, values: Mapping[str, object] | None = None) -> str:
        """The rule with the default thresholds, overridden by ``values`` (e.g. ``snr_min``, ``required``)."""
        return self.rule.format(**{"required": "the required photometric inputs", **FLAG_RULE_VALUES, **(values or {})})


FLAG_SPECS: tuple[FlagSpec, ...] = (
    FlagSpec(ResultFlag.TEFF_UNRELIABLE, "bad", "Teff outside {log_teff_low:g} < log10(teff) < {log_teff_high:g}"),
    FlagSpec(ResultFlag.LOGG_UNRELIABLE, "bad", "logg outside {logg_low:g} < logg < {logg_high:g}"),
    FlagSpec(ResultFlag.FE_H_UNRELIABLE, "bad",
             "[Fe/H] outside {fe_h_low:g} < fe_h < {fe_h_high:g}, or log10(teff) > {hot_log_teff:g}"),
    FlagSpec(ResultFlag.E_TEFF_UNRELIABLE, "bad", "raw_e_teff not finite or <= 0"),
    FlagSpec(ResultFlag.E_LOGG_UNRELIABLE, "bad", "raw_e_logg not finite or <= 0"),
    FlagSpec(ResultFlag.E_FE_H_UNRELIABLE, "bad", "raw_e_fe_h not finite or <= 0"),
    FlagSpec(ResultFlag.E_TEFF_LARGE, "warn", "e_teff > {e_teff_fraction:g} * teff"),
    FlagSpec(ResultFlag.E_LOGG_LARGE, "warn", "e_logg > {e_logg_max:g} dex"),
    FlagSpec(ResultFlag.E_FE_H_LARGE, "warn", "e_fe_h > {e_fe_h_max:g} dex"),
    FlagSpec(ResultFlag.MISSING_PHOTOMETRY, "warn",
             "no Gaia counterpart, a missing band of {required}, or an input the model imputed (missing_photometry)"),
    FlagSpec(ResultFlag.RESULT_UNRELIABLE, "bad",
             "snr < {snr_min:g}, good-pixel fraction < {min_good_pixel_fraction:g}, constant flux, "
             "or a prediction outside the model's training domain"),
    FlagSpec(ResultFlag.NO_RESULT, "bad", "spectrum not read or not processed, or non-finite teff/logg/fe_h; values NaN"),
)


def _group_mask(group: str) -> ResultFlag:
    """OR of the flags of one group of :data:`FLAG_SPECS`."""
    return functools.reduce(operator.or_, (spec.flag for spec in FLAG_SPECS if spec.group == group))


FLAG_WARN_MASK: ResultFlag = _group_mask("warn")
FLAG_BAD_MASK: ResultFlag = _group_mask("bad")
