"""DR19 ``result_flags``, ``flag_warn`` and ``flag_bad`` (SPEC §6) with documented, configurable thresholds.

Rules (see docs/release.md for the reasoning behind each threshold):

* A row has **no result** (bit 11) when its status is not ``ok`` or any of teff, logg, fe_h is not finite; its
  values and errors are then set to NaN and bits 0–8 are not evaluated (there is nothing to judge).
* Bits 0–2: DR19 ranges on finite values; [Fe/H] is also unreliable when log10(teff) > 3.82 (the value is kept).
* Bits 3–5: the raw Monte-Carlo error is not finite or not positive (no draws, or a degenerate network output).
* Bits 6–8: the recommended error is above ``e_teff_fraction``·teff, ``e_logg_max`` or ``e_fe_h_max`` (a raw error
  already flagged by bits 3–5 is not judged again; E_TEFF_LARGE needs teff > 0, otherwise bit 0 says it all).
* Bit 9: no cross-match counterpart, any band in ``required_bands`` missing (``missing_bands`` non-empty; missing by
  the policy of :mod:`catalogbuilder.tables`), or the model imputed one of its photometric inputs
  (``missing_photometry`` of the inference results, e.g. a parallax ≤ −1 mas that APOGEE Net II's reference
  preprocessing replaces although the policy keeps it as a measurement).
* Bit 10: S/N below ``snr_min``, fewer than ``min_good_pixel_fraction`` of the grid pixels with positive flux and a
  usable error (``good_pixel_fraction``, computed at ingest by ``store/quality.py``), a
  constant flux (degenerate input), or a result outside the model's training domain (``outside_domain`` of the
  inference results, from the ``domain`` of the model's ``catalogbuilder.yaml``). Bits 9 and 10 are evaluated for every row, with or without a result.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from catalogbuilder.constants import (
    E_FE_H_LARGE_DEX,
    E_LOGG_LARGE_DEX,
    E_TEFF_LARGE_FRACTION,
    FE_H_MAX_LOG_TEFF,
    FE_H_RANGE,
    FLAG_BAD_MASK,
    FLAG_SPECS,
    FLAG_WARN_MASK,
    LOG_TEFF_RANGE,
    LOGG_RANGE,
    MIN_GOOD_PIXEL_FRACTION,
    SNR_MIN,
    ResultFlag,
)

RESULT_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")
@dataclasses.dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the data-dependent bits; the defaults are the released ones (justified in docs/release.md)."""

    e_teff_fraction: float = E_TEFF_LARGE_FRACTION  # E_TEFF_LARGE: e_teff / teff above this (≈0.021 dex in log Teff)
    e_logg_max: float = E_LOGG_LARGE_DEX  # dex, E_LOGG_LARGE
    e_fe_h_max: float = E_FE_H_LARGE_DEX  # dex, E_FE_H_LARGE
    snr_min: float = SNR_MIN  # RESULT_UNRELIABLE below this survey S/N (unknown S/N does not set it)
    min_good_pixel_fraction: float = MIN_GOOD_PIXEL_FRACTION  # RESULT_UNRELIABLE below this fraction of good pixels

    def describe(self, required_bands: Sequence[str]) -> dict[ResultFlag, str]:
        """Bit → rule of :data:`~catalogbuilder.constants.FLAG_SPECS` with these thresholds filled in (FITS headers,
        summaries, the README table)."""
        values = dataclasses.asdict(self) | {"required": ",".join(required_bands)}
        return {spec.flag: spec.description(values) for spec in FLAG_SPECS}


def flag_table_markdown(required_bands: Sequence[str], thresholds: FlagThresholds = FlagThresholds()) -> str:
    """The flag bits as a Markdown table (bit, name, group, rule with ``thresholds``), as the README shows it."""
    rules = thresholds.describe(required_bands)
    lines = ["| bit | name | group | set when |", "|---|---|---|---|"]
    lines += [f"| {spec.bit} | {spec.name} | {spec.group} | {rules[spec.flag]} |" for spec in FLAG_SPECS]
    return "\n".join(lines) + "\n"


def _column(frame: pd.DataFrame, name: str, default: float | bool | str) -> pd.Series:
    """A column of ``frame`` or a constant series when it is absent."""
    return frame[name] if name in frame.columns else pd.Series(default, index=frame.index)


def _inside(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """True where ``bounds[0] < values < bounds[1]`` (NaN is outside)."""
    return (bounds[0] < values) & (values < bounds[1])


def no_result_mask(frame: pd.DataFrame) -> np.ndarray:
    """True where the row has no usable result: status not ``ok`` or a non-finite teff/logg/fe_h."""
    status_ok = _column(frame, "status", "no_result").fillna("no_result").astype(str).eq("ok").to_numpy()
    finite = np.all([np.isfinite(_column(frame, label, np.nan).to_numpy(float)) for label in RESULT_LABELS], axis=0)
    return ~(status_ok & finite)


def result_flags(frame: pd.DataFrame, thresholds: FlagThresholds = FlagThresholds()) -> np.ndarray:
    """``result_flags`` (int64 bit array) of calibrated rows (columns teff, logg, fe_h, raw_e_*, e_*, status, and
    optionally snr, good_pixel_fraction, flux_constant, gaia_matched, missing_bands, missing_photometry)."""
    flags = np.zeros(len(frame), dtype=np.int64)

    def set_bit(bit: ResultFlag, where: np.ndarray) -> None:
        flags[np.asarray(where, dtype=bool)] |= int(bit)

    no_result = no_result_mask(frame)
    has_result = ~no_result
    set_bit(ResultFlag.NO_RESULT, no_result)

    with np.errstate(divide="ignore", invalid="ignore"):
        teff = _column(frame, "teff", np.nan).to_numpy(float)
        log_teff = np.where(teff > 0, np.log10(np.where(teff > 0, teff, 1.0)), -np.inf)
        logg = _column(frame, "logg", np.nan).to_numpy(float)
        fe_h = _column(frame, "fe_h", np.nan).to_numpy(float)
        set_bit(ResultFlag.TEFF_UNRELIABLE, has_result & ~_inside(log_teff, LOG_TEFF_RANGE))
        set_bit(ResultFlag.LOGG_UNRELIABLE, has_result & ~_inside(logg, LOGG_RANGE))
        set_bit(ResultFlag.FE_H_UNRELIABLE, has_result & (~_inside(fe_h, FE_H_RANGE) | (log_teff > FE_H_MAX_LOG_TEFF)))

        for label, unreliable, large, limit in (
            ("teff", ResultFlag.E_TEFF_UNRELIABLE, ResultFlag.E_TEFF_LARGE, np.where(teff > 0, thresholds.e_teff_fraction * teff, np.inf)),
            ("logg", ResultFlag.E_LOGG_UNRELIABLE, ResultFlag.E_LOGG_LARGE, thresholds.e_logg_max),
            ("fe_h", ResultFlag.E_FE_H_UNRELIABLE, ResultFlag.E_FE_H_LARGE, thresholds.e_fe_h_max),
        ):
            raw = _column(frame, f"raw_e_{label}", np.nan).to_numpy(float)
            recommended = _column(frame, f"e_{label}", np.nan).to_numpy(float)
            set_bit(unreliable, has_result & ~(np.isfinite(raw) & (raw > 0)))
            set_bit(large, has_result & np.isfinite(raw) & (raw > 0) & (recommended > limit))

    matched = _column(frame, "gaia_matched", False).fillna(False).astype(bool).to_numpy()
    missing_bands = _column(frame, "missing_bands", "").fillna("").astype(str).to_numpy()
    model_imputed = _column(frame, "missing_photometry", 0.0).fillna(0.0).to_numpy(float) > 0
    set_bit(ResultFlag.MISSING_PHOTOMETRY, ~matched | (missing_bands != "") | model_imputed)

    snr = _column(frame, "snr", np.nan).to_numpy(float)
    good_fraction = _column(frame, "good_pixel_fraction", np.nan).to_numpy(float)
    constant = _column(frame, "flux_constant", False).fillna(False).astype(bool).to_numpy()
    outside_domain = _column(frame, "outside_domain", 0.0).fillna(0.0).to_numpy(float) > 0
    set_bit(
        ResultFlag.RESULT_UNRELIABLE,
        (snr < thresholds.snr_min) | (good_fraction < thresholds.min_good_pixel_fraction) | constant
        | (has_result & outside_domain),
    )
    return flags


def flag_warn(flags: np.ndarray) -> np.ndarray:
    """``flag_warn``: any of E_*_LARGE or MISSING_PHOTOMETRY."""
    return (np.asarray(flags, dtype=np.int64) & int(FLAG_WARN_MASK)) != 0


def flag_bad(flags: np.ndarray) -> np.ndarray:
    """``flag_bad``: any of RESULT_UNRELIABLE, *_UNRELIABLE or NO_RESULT."""
    return (np.asarray(flags, dtype=np.int64) & int(FLAG_BAD_MASK)) != 0


def apply_flags(frame: pd.DataFrame, value_columns: list[str], thresholds: FlagThresholds = FlagThresholds()) -> pd.DataFrame:
    """A copy of ``frame`` with ``result_flags``, ``flag_warn``, ``flag_bad``; the ``value_columns`` (values and
    errors) of NO_RESULT rows are set to NaN."""
    flagged = frame.copy()
    flags = result_flags(frame, thresholds)
    no_result = (flags & int(ResultFlag.NO_RESULT)) != 0
    for column in value_columns:
        if column in flagged.columns:
            flagged[column] = flagged[column].astype(float).mask(no_result)
    flagged["result_flags"] = flags
    flagged["flag_warn"] = flag_warn(flags)
    flagged["flag_bad"] = flag_bad(flags)
    return flagged
