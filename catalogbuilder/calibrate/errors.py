"""DR19 error calibration: recommended uncertainties from the raw Monte-Carlo scatter (SPEC §4–5).

``e_X = scale · raw_e_X + offset`` with ``constants.ERROR_CALIBRATION`` (Teff in K, log g and [Fe/H] in dex).
The raw values stay in the ``raw_e_*`` columns; ``e_rv`` is the raw RV scatter unchanged (DR19 gives no RV relation).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from catalogbuilder.constants import ERROR_CALIBRATION

LN10 = float(np.log(10.0))
CALIBRATED_LABELS: tuple[str, ...] = tuple(ERROR_CALIBRATION)  # teff, logg, fe_h
UNCALIBRATED_LABELS: tuple[str, ...] = ("rv",)  # reported with e_rv = raw_e_rv


def raw_teff_error(frame: pd.DataFrame) -> pd.Series:
    """Raw Teff error in K: ``raw_e_teff`` where the model gave it, else ``teff · ln(10) · raw_e_logteff`` (SPEC §4)."""
    from_logteff = (
        frame["teff"] * LN10 * frame["raw_e_logteff"]
        if {"teff", "raw_e_logteff"} <= set(frame.columns)
        else pd.Series(np.nan, index=frame.index)
    )
    if "raw_e_teff" not in frame.columns:
        return from_logteff.astype(float)
    return frame["raw_e_teff"].astype(float).where(np.isfinite(frame["raw_e_teff"]), from_logteff)


def calibrate_errors(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with ``e_teff`` (K), ``e_logg``, ``e_fe_h`` (dex) from the DR19 relations, ``raw_e_teff``
    filled from ``raw_e_logteff`` when absent, and ``e_rv = raw_e_rv`` (km/s) when the model predicts RV.
    Non-finite raw errors give non-finite recommended errors (flagged by :mod:`catalogbuilder.calibrate.flags`)."""
    calibrated = frame.copy()
    calibrated["raw_e_teff"] = raw_teff_error(frame)
    for label, (scale, offset) in ERROR_CALIBRATION.items():
        raw = calibrated.get(f"raw_e_{label}", pd.Series(np.nan, index=frame.index)).astype(float)
        calibrated[f"raw_e_{label}"] = raw
        calibrated[f"e_{label}"] = scale * raw + offset
    for label in UNCALIBRATED_LABELS:
        if f"raw_e_{label}" in calibrated.columns:
            calibrated[f"e_{label}"] = calibrated[f"raw_e_{label}"].astype(float)
    return calibrated


def calibration_relations() -> list[str]:
    """Human-readable relations, one string per label, for table headers and docs (e.g. ``e_teff = 1.25*raw_e_teff + 10``)."""
    relations = [f"e_{label} = {scale:g}*raw_e_{label} + {offset:g}" for label, (scale, offset) in ERROR_CALIBRATION.items()]
    return relations + [f"e_{label} = raw_e_{label}" for label in UNCALIBRATED_LABELS]
