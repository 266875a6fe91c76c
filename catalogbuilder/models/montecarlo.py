"""Monte-Carlo uncertainties (SPEC §4; Sprague et al. 2022 §3.2.3; Sizemore et al. 2024; DR19 APOGEENet).

Each spectrum's pixel errors are capped at 5 × its median error, N realisations flux + error × N(0, 1) are drawn and
every realisation is preprocessed and predicted. The reported value is the **median over the draws only** (not
including the noiseless prediction: "the final reported parameters for each star are a median of 20 such predictions",
Sprague 2022; DR19 reports "median and standard deviation" of the draws); the raw error is their standard deviation
(sample std, ``correction=1``, as ``torch.std`` in the reference BOSS Net pipeline).

Draws of many spectra are batched together into large forward passes, chunked by ``max_batch`` rows. A spectrum's noise
comes from its own ``torch.Generator`` seeded with its own seed, so results do not depend on batch composition or
chunking (only on the seed, the device kind and the float arithmetic of the forward pass).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from catalogbuilder.constants import DEFAULT_ERROR_FRACTION, ERROR_CAP_FACTOR

DEFAULT_MAX_BATCH: int = 512  # rows (spectrum × draw) per forward pass

# Network label name → canonical output name (teff in K is derived from logTeff).
LABEL_TO_OUTPUT: dict[str, str] = {"logg": "logg", "logTeff": "logteff", "FeH": "fe_h", "rv": "rv", "Teff": "teff"}

LabelPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(flux (rows, pixels) float32 on the device, spectrum_index (rows,) int64) -> labels (rows, targets)``:
preprocessing + forward + de-normalisation of one batch; ``spectrum_index`` lets a family gather per-spectrum inputs
(e.g. photometry) for each row."""


def spectrum_seed(spectrum_id: str, seed: int) -> int:
    """Stable per-spectrum seed in [0, 2**63) from a spectrum id and a run seed (BLAKE2b, independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(f"{int(seed)}:{spectrum_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def cap_errors(flux: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Per-row capped 1σ errors for the noise draws (same shape as ``error``).

    The median (``torch.nanmedian``: the lower middle value for an even count) is taken over the usable errors
    (finite and > 0). Errors above 5 × median are capped; NaN, ±inf and negative errors are set to the cap;
    zero errors stay zero (such pixels get no noise: the APOGEE reader stores 0
    error where flux is missing, and that flux is the 1e-6 floor anyway). A row without any usable error uses
    0.1 × median(finite flux) everywhere, as the readers do; if that is not positive either (an all-zero spectrum),
    its draws carry no noise and its raw errors are 0.
    """
    usable = torch.isfinite(error) & (error > 0)
    median = torch.nanmedian(torch.where(usable, error, torch.nan), dim=1, keepdim=True).values
    flux_median = torch.nanmedian(torch.where(torch.isfinite(flux), flux, torch.nan), dim=1, keepdim=True).values
    fallback = torch.nan_to_num(DEFAULT_ERROR_FRACTION * flux_median, nan=0.0).clamp(min=0.0)
    cap = ERROR_CAP_FACTOR * median
    capped = torch.where(usable, torch.minimum(error, cap), torch.where(error == 0, 0.0, cap))
    return torch.where(torch.isnan(median), fallback.expand_as(error), capped)


def _normal_draws(seed: int, draws: int, pixels: int, device: torch.device) -> torch.Tensor:
    """(draws, pixels) standard-normal noise from a generator of its own, seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.randn((draws, pixels), generator=generator, device=device, dtype=torch.float32)


def monte_carlo_predict(
    flux: np.ndarray | torch.Tensor,
    error: np.ndarray | torch.Tensor,
    predict: LabelPredictor,
    draws: int,
    seeds: Sequence[int] | np.ndarray | None,
    device: torch.device | str = "cpu",
    max_batch: int = DEFAULT_MAX_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of every spectrum as (value, raw_error), each (spectra, targets) float64.

    ``draws > 0``: value = median over the draws, raw_error = their standard deviation (NaN with a single draw).
    ``draws == 0``: value = one deterministic prediction of the flux as given, raw_error = NaN.
    ``seeds``: one int per spectrum (see :func:`spectrum_seed`); ``None`` draws fresh random seeds (not reproducible).
    """
    device = torch.device(device)
    flux = torch.as_tensor(flux, dtype=torch.float32)
    error = torch.as_tensor(error, dtype=torch.float32)
    if flux.ndim != 2 or flux.shape != error.shape:
        raise ValueError("flux and error must both be (spectra, pixels); "
                         f"got {tuple(flux.shape)} and {tuple(error.shape)}")
    if draws < 0 or max_batch < 1:
        raise ValueError(f"draws must be >= 0 and max_batch >= 1; got draws={draws}, max_batch={max_batch}")
    n_spectra, n_pixels = flux.shape
    if n_spectra == 0:
        raise ValueError("no spectra to predict")
    if seeds is None:
        seeds = np.random.default_rng().integers(0, 2**63 - 1, size=n_spectra)
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != n_spectra:
        raise ValueError(f"need one seed per spectrum: {len(seeds)} seeds for {n_spectra} spectra")

    rows_per_spectrum = max(draws, 1)
    spectra_per_batch = max(1, max_batch // rows_per_spectrum)
    values, raw_errors = [], []
    with torch.inference_mode():
        for start in range(0, n_spectra, spectra_per_batch):
            stop = min(start + spectra_per_batch, n_spectra)
            batch_flux = flux[start:stop].to(device, non_blocking=True)
            index = torch.arange(start, stop, device=device)
            if draws == 0:
                labels = predict(batch_flux.contiguous(), index).double()
                values.append(labels.cpu())
                raw_errors.append(torch.full_like(labels, math.nan).cpu())
                continue
            batch_error = cap_errors(batch_flux, error[start:stop].to(device, non_blocking=True))
            noise = torch.stack([_normal_draws(seeds[i], draws, n_pixels, device) for i in range(start, stop)])
            noisy = (batch_flux[:, None, :] + batch_error[:, None, :] * noise).reshape(-1, n_pixels)
            labels = predict(noisy.contiguous(), index.repeat_interleave(draws)).double()
            labels = labels.reshape(stop - start, draws, -1)
            values.append(torch.quantile(labels, 0.5, dim=1).cpu())
            raw_errors.append(labels.std(dim=1, correction=1).cpu())
    return torch.cat(values).numpy(), torch.cat(raw_errors).numpy()


def canonical_outputs(labels: Sequence[str], value: np.ndarray, raw_error: np.ndarray) -> dict[str, np.ndarray]:
    """Network labels → canonical outputs: ``teff`` (K), ``logteff``, ``logg``, ``fe_h``, ``rv`` and ``raw_e_<name>``.

    From logTeff: teff = 10**logTeff and raw_e_teff = teff × ln(10) × raw_e_logTeff (SPEC §4); from a Teff label
    (APOGEE Net I) the inverse relations give logteff and raw_e_logteff.
    """
    unknown = [label for label in labels if label not in LABEL_TO_OUTPUT]
    if unknown:
        raise ValueError(f"labels without a canonical output name: {unknown}; known {sorted(LABEL_TO_OUTPUT)}")
    result: dict[str, np.ndarray] = {}
    for column, label in enumerate(labels):
        name = LABEL_TO_OUTPUT[label]
        result[name] = value[:, column]
        result[f"raw_e_{name}"] = raw_error[:, column]
    if "logteff" in result and "teff" not in result:
        result["teff"] = 10.0 ** result["logteff"]
        result["raw_e_teff"] = result["teff"] * np.log(10.0) * result["raw_e_logteff"]
    elif "teff" in result and "logteff" not in result:
        with np.errstate(divide="ignore", invalid="ignore"):
            result["logteff"] = np.log10(result["teff"])
            result["raw_e_logteff"] = result["raw_e_teff"] / (result["teff"] * np.log(10.0))
    return result
