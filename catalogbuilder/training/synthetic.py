"""Synthetic apStar-like training spectra from a Payne-style emulator (binspec ``NN_normalized_spectra.npz``).

The emulator predicts a continuum-normalised spectrum on a 7214-pixel grid — the apStar grid restricted to pixels
[322:3242], [3648:6048] and [6412:8306] — from (Teff, log g, [Fe/H], [Mg/Fe], vmacro). Its layout: labels scaled to
(x − x_min)/(x_max − x_min) − 0.5, per pixel one hidden layer of sigmoids, ``w_array_0`` (pixel, hidden, label),
``b_array_0`` (pixel, hidden), ``w_array_1`` (pixel, hidden), ``b_array_1`` (pixel).

Real apStar flux is not normalised: it is in 1e-17 erg/s/cm²/Å with the instrument response, NaN (read as 0) in the
chip gaps, and per-pixel errors. :func:`generate` therefore multiplies emulated spectra by smooth continua estimated
from real apStar rows (random flux scale, random linear tilt, and the black-body slope change from the template
star's Teff to the synthetic Teff), keeps zeros where the real spectra have no data, and draws noise from real error
arrays rescaled to a random S/N.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.modeling import fitting, models
from astropy.stats import sigma_clip

from catalogbuilder.constants import APOGEE_NPIX, ERROR_CAP_FACTOR, apogee_wavelength

# apStar pixels covered by the 7214-pixel Payne/Cannon grid
PAYNE_PIXEL_RANGES: tuple[tuple[int, int], ...] = ((322, 3242), (3648, 6048), (6412, 8306))
PAYNE_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "mg_fe", "vmacro")
CONTINUUM_DEGREE = 3


def payne_pixels() -> np.ndarray:
    """Indices into the 8575-pixel apStar grid of the 7214 emulator pixels."""
    return np.concatenate([np.arange(start, stop) for start, stop in PAYNE_PIXEL_RANGES])


@dataclasses.dataclass(frozen=True)
class PayneEmulator:
    """A one-hidden-layer per-pixel Payne emulator of continuum-normalised spectra."""

    w_array_0: np.ndarray  # (pixel, hidden, label)
    w_array_1: np.ndarray  # (pixel, hidden)
    b_array_0: np.ndarray  # (pixel, hidden)
    b_array_1: np.ndarray  # (pixel,)
    x_min: np.ndarray  # (label,) lower edge of the training labels (Teff K, logg, [Fe/H], [Mg/Fe], vmacro km/s)
    x_max: np.ndarray  # (label,)

    @classmethod
    def from_npz(cls, path: str | Path) -> PayneEmulator:
        """Load ``NN_normalized_spectra.npz``; raises ``ValueError`` when the arrays do not fit the 7214-px layout."""
        with np.load(path) as data:
            arrays = {field.name: np.asarray(data[field.name], dtype=np.float64) for field in dataclasses.fields(cls)}
        emulator = cls(**arrays)
        n_pix, n_hidden, n_labels = emulator.w_array_0.shape
        if n_pix != len(payne_pixels()) or n_labels != len(PAYNE_LABELS) or emulator.w_array_1.shape != (n_pix, n_hidden):
            raise ValueError(f"{path}: emulator shape {emulator.w_array_0.shape} does not match the 7214-px, 5-label layout")
        return emulator

    def normalized_flux(self, labels: np.ndarray, block: int = 256) -> np.ndarray:
        """Continuum-normalised spectra (N, 7214) float32 for labels (N, 5) in ``PAYNE_LABELS`` order."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        scaled = (labels - self.x_min) / (self.x_max - self.x_min) - 0.5
        out = np.empty((len(scaled), self.w_array_0.shape[0]), dtype=np.float32)
        for start in range(0, len(scaled), block):
            inside = np.einsum("phl,nl->nph", self.w_array_0, scaled[start:start + block]) + self.b_array_0
            hidden = 1.0 / (1.0 + np.exp(-inside))
            out[start:start + block] = np.einsum("ph,nph->np", self.w_array_1, hidden) + self.b_array_1
        return out

    def sample_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 5) labels drawn uniformly inside the emulator's training box [x_min, x_max]."""
        return rng.uniform(self.x_min, self.x_max, size=(n, len(self.x_min)))


@dataclasses.dataclass(frozen=True)
class ContinuumTemplate:
    """A smooth continuum and relative error spectrum estimated from one real apStar row (8575 px)."""

    continuum: np.ndarray  # flux units of the file; 0 where the real spectrum has no data
    relative_error: np.ndarray  # error / continuum, capped at ERROR_CAP_FACTOR × its median; 0 outside the data
    teff: float  # K, Teff of the template star (header RV_TEFF), for the black-body slope correction
    source: str  # file name and row


def _chip_segments(valid: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the contiguous runs of True in ``valid``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def estimate_continuum(flux: np.ndarray, error: np.ndarray, continuum_pixels: np.ndarray) -> np.ndarray:
    """Smooth continuum of an apStar row: per chip (contiguous data run), a degree-3 polynomial fitted with
    3σ outlier rejection to the flux at the continuum pixels; 0 where the row has no data."""
    valid = np.isfinite(flux) & np.isfinite(error) & (flux > 0) & (error > 0)
    continuum = np.zeros(APOGEE_NPIX)
    fitter = fitting.FittingWithOutlierRemoval(fitting.LinearLSQFitter(), sigma_clip, niter=3, sigma=3.0)
    for start, stop in _chip_segments(valid):
        pixels = np.arange(start, stop)
        x = (pixels - pixels.mean()) / max(1.0, (stop - start) / 2.0)
        use = continuum_pixels[start:stop] & valid[start:stop]
        if use.sum() <= 3 * CONTINUUM_DEGREE:
            continue
        fitted, _ = fitter(models.Polynomial1D(CONTINUUM_DEGREE), x[use], flux[start:stop][use],
                           weights=1.0 / error[start:stop][use])
        continuum[start:stop] = np.clip(fitted(x), 0.0, None)
    return continuum


def templates_from_apstar(
    paths: Sequence[str | Path], continuum_pixels_7214: np.ndarray, rows: Sequence[int] | None = None
) -> list[ContinuumTemplate]:
    """Continuum templates from every usable row of real apStar files (rows with no positive flux are skipped).

    continuum_pixels_7214: boolean Cannon continuum-pixel mask on the 7214-pixel grid (binspec
    ``cannon_cont_pixels_apogee.npz``), mapped here onto the apStar grid.
    """
    continuum_pixels = np.zeros(APOGEE_NPIX, dtype=bool)
    continuum_pixels[payne_pixels()] = np.asarray(continuum_pixels_7214, dtype=bool)
    templates: list[ContinuumTemplate] = []
    for path in paths:
        with fits.open(path) as hdul:
            flux_rows = np.atleast_2d(hdul[1].data).astype(np.float64)
            error_rows = np.atleast_2d(hdul[2].data).astype(np.float64)
            teff = float(hdul[0].header.get("RV_TEFF", np.nan))
        for row in rows if rows is not None else range(len(flux_rows)):
            continuum = estimate_continuum(flux_rows[row], error_rows[row], continuum_pixels)
            if not np.any(continuum > 0) or not np.isfinite(teff):
                continue
            has_data = continuum > 0
            relative = np.zeros(APOGEE_NPIX)
            relative[has_data] = np.nan_to_num(error_rows[row][has_data], nan=0.0, posinf=0.0) / continuum[has_data]
            positive = relative[relative > 0]
            relative = np.minimum(relative, ERROR_CAP_FACTOR * np.median(positive))
            templates.append(ContinuumTemplate(continuum, relative, teff, f"{Path(path).name}[{row}]"))
    if not templates:
        raise ValueError("no usable apStar rows for continuum templates")
    return templates


def _blackbody_ratio(teff: np.ndarray, reference_teff: np.ndarray) -> np.ndarray:
    """B_λ(teff) / B_λ(reference_teff) on the apStar grid, normalised to 1 at the grid's median wavelength (N, 8575)."""
    wavelength = apogee_wavelength() * u.AA
    ratio = np.stack([
        (models.BlackBody(temperature=t * u.K)(wavelength) / models.BlackBody(temperature=r * u.K)(wavelength)).value
        for t, r in zip(teff, reference_teff)
    ])
    return ratio / np.median(ratio, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class SyntheticSpectra:
    """Synthetic apStar-grid spectra: flux/error (N, 8575) float32 in the template's units, labels (N, 5)."""

    flux: np.ndarray
    error: np.ndarray
    labels: np.ndarray  # PAYNE_LABELS order
    snr: np.ndarray  # median S/N per pixel drawn for each spectrum
    template: np.ndarray  # index of the continuum template used


def generate(
    emulator: PayneEmulator,
    templates: Sequence[ContinuumTemplate],
    n: int,
    seed: int,
    snr_range: tuple[float, float] = (40.0, 400.0),
    flux_scale_range: tuple[float, float] = (0.05, 20.0),
    max_tilt: float = 0.1,
    blackbody_slope: bool = True,
    max_curvature: float = 0.0,
) -> SyntheticSpectra:
    """``n`` apStar-like spectra: emulated normalised flux × continuum, noise from real error arrays.

    Per spectrum: labels uniform in the emulator box; a random template; continuum × log-uniform scale in
    ``flux_scale_range`` × exp(tilt·x + curvature·(x² − 1/3)), x ∈ [−1, 1] across the grid, tilt and curvature uniform
    in ±``max_tilt`` and ±``max_curvature`` (drawn independently of the labels), × the
    black-body ratio B(Teff)/B(Teff_template) when ``blackbody_slope`` (it ties the continuum slope to Teff through the
    template star's header Teff); pixels with template data but outside the emulator's coverage keep
    the bare continuum (no lines); pixels without data are 0 with error 0, as the APOGEE reader stores chip gaps.
    Error = relative error of the template × continuum × (template S/N / drawn S/N), S/N log-uniform in ``snr_range``.
    """
    rng = np.random.default_rng(seed)
    labels = emulator.sample_labels(n, rng)
    chosen = rng.integers(0, len(templates), size=n)
    continuum = np.stack([templates[k].continuum for k in chosen])
    relative_error = np.stack([templates[k].relative_error for k in chosen])
    x = np.linspace(-1.0, 1.0, APOGEE_NPIX)
    tilt = rng.uniform(-max_tilt, max_tilt, size=(n, 1))
    curvature = rng.uniform(-max_curvature, max_curvature, size=(n, 1))
    log_scale = rng.uniform(*np.log(flux_scale_range), size=(n, 1))
    continuum = continuum * np.exp(log_scale + tilt * x + curvature * (x**2 - 1.0 / 3.0))
    if blackbody_slope:
        continuum *= _blackbody_ratio(labels[:, 0], np.array([templates[k].teff for k in chosen]))

    normalized = np.ones((n, APOGEE_NPIX))
    normalized[:, payne_pixels()] = emulator.normalized_flux(labels)
    clean = continuum * normalized

    template_snr = np.array([1.0 / np.median(t.relative_error[t.relative_error > 0]) for t in templates])[chosen]
    snr = np.exp(rng.uniform(*np.log(snr_range), size=n))
    error = continuum * relative_error * (template_snr / snr)[:, None]
    flux = clean + error * rng.standard_normal(size=clean.shape)
    flux[continuum <= 0] = 0.0
    return SyntheticSpectra(flux.astype(np.float32), error.astype(np.float32), labels, snr, chosen)
