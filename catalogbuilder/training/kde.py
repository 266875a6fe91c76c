"""Per-sample loss weights ∝ 1 / KDE density in the standardised Teff–log g plane (BOSS Net, Sizemore et al. 2024 §3).

Rare stars (sparse regions of the Kiel diagram) weigh more in the loss, common ones less. Weights are capped so a few
isolated stars cannot dominate, and scaled to mean 1 so the loss keeps its scale.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import optimize, stats

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_CAP: float = 5.0


def _standardise(values: np.ndarray) -> np.ndarray:
    """Z-score a 1-D array (std 1 when the spread is zero, so a constant column stays finite)."""
    spread = values.std()
    return (values - values.mean()) / (spread if spread > 0 else 1.0)


def scale_to_mean_one(raw: np.ndarray, cap: float = DEFAULT_WEIGHT_CAP) -> np.ndarray:
    """Scale positive raw weights by one factor s so that ``min(s·raw, cap)`` has mean 1 (``cap`` must be ≥ 1).

    The mean of ``min(s·raw, cap)`` grows monotonically with s from 0 to ``cap``, so the root is unique.
    """
    if cap < 1.0:
        raise ValueError(f"weight cap must be >= 1 to allow mean 1, got {cap}")
    raw = np.asarray(raw, dtype=float)
    if raw.size == 0:
        return raw
    if np.any(~np.isfinite(raw)) or np.any(raw <= 0):
        raise ValueError("raw weights must be finite and positive")
    scaled = raw / raw.mean()
    if scaled.max() <= cap:
        return scaled
    if cap == 1.0:
        return np.ones_like(scaled)

    def excess(factor: float) -> float:
        return float(np.minimum(factor * scaled, cap).mean() - 1.0)

    # excess(1) < 0 because capping removes mass; excess(cap / min) = cap - 1 >= 0.
    factor = optimize.brentq(excess, 1.0, cap / scaled.min(), xtol=1e-12)
    return np.minimum(factor * scaled, cap)


def kde_weights(teff: np.ndarray, logg: np.ndarray, cap: float = DEFAULT_WEIGHT_CAP) -> np.ndarray:
    """Loss weight per sample: 1 / gaussian_kde density of (Teff, log g), each axis z-scored, capped at ``cap``, mean 1.

    teff: K (or log10 K — the result is the same up to the KDE's smoothing), logg: dex. Samples with a missing
    (non-finite) Teff or log g get weight 1. With fewer than 3 usable samples, or labels lying on a line (a singular
    covariance), every weight is 1.
    """
    teff = np.asarray(teff, dtype=float)
    logg = np.asarray(logg, dtype=float)
    if teff.shape != logg.shape or teff.ndim != 1:
        raise ValueError(f"teff and logg must be 1-D arrays of one length, got {teff.shape} and {logg.shape}")
    weights = np.ones(teff.shape, dtype=float)
    usable = np.isfinite(teff) & np.isfinite(logg)
    if usable.sum() < 3:
        return weights
    plane = np.vstack([_standardise(teff[usable]), _standardise(logg[usable])])
    try:
        density = stats.gaussian_kde(plane)(plane)
    except np.linalg.LinAlgError:
        log.warning("Teff-logg labels are degenerate (singular covariance); using uniform loss weights")
        return weights
    weights[usable] = scale_to_mean_one(1.0 / density, cap)
    return weights
