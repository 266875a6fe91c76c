"""Monte-Carlo uncertainties (SPEC §4; Sprague et al. 2022 §3.2.3; Sizemore et al. 2024; DR19 APOGEENet).

N realisations flux + error × N(0, 1) of each spectrum are drawn, every realisation is preprocessed and predicted, and
the draws are summarised as the reference BOSS Net pipeline does: the value is ``torch.median`` over the draws (the
lower of the two middle values for an even N) and the raw error ``torch.std`` (Bessel-corrected). The noiseless
prediction of the stored grid flux, which the reference also writes, is returned next to them.

Where the noise is drawn (SPEC §4): on the survey's **own pixels**. Optical spectra (BOSS, LAMOST) come with their
native arrays (:class:`NativeSpectra`, the reader's wavelength, flux and 5 × median-capped error); each draw is
``flux + error × N(0, 1)`` on the native pixels, NaN flux pixels stay NaN and are dropped with their wavelengths, and
the draw is interpolated onto the model grid exactly as ingest does (:class:`GridInterpolation`, bit-identical to
``np.interp`` / ``readers.base.interpolate_onto``). APOGEE spectra already live on their grid: their noise is drawn on
the stored grid with :func:`cap_errors`. Drawing optical noise on the resampled grid gives other statistics
(interpolation mixes neighbouring native pixels' noise: −40 % to +24 % in std, conformance README); it is done only
when a caller asks for it explicitly (``noise_on_grid``).

Draws of many spectra are batched together into large forward passes, chunked by ``max_batch`` rows (per spectrum its
noiseless row and its draws). A spectrum's noise comes from its own ``torch.Generator`` seeded with its own seed, so
results do not depend on batch composition or chunking (only on the seed, the device kind and the float arithmetic of
the forward pass).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from catalogbuilder.constants import DEFAULT_ERROR_FRACTION, ERROR_CAP_FACTOR, NATIVE_PIXEL_GRIDS, NOISELESS_PREFIX

if TYPE_CHECKING:  # the readers (and astropy) are not needed to predict
    from catalogbuilder.readers.base import Spectrum

DEFAULT_MAX_BATCH: int = 512  # rows (spectrum × (noiseless + draws)) per forward pass

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


def spectra_per_forward(max_batch: int, draws: int) -> int:
    """Spectra per forward pass: each spectrum takes ``draws + 1`` rows (its noiseless row and its draws) of the
    ``max_batch`` rows; a spectrum's rows are never split, so at least one spectrum."""
    return max(1, int(max_batch) // (int(draws) + 1))


def draw_statistics(labels: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, raw error) of Monte-Carlo predictions along ``dim`` (the draws), as the reference pipeline computes them:
    ``torch.median`` (the lower of the two middle values for an even count; NaN when a draw is NaN) and ``torch.std``
    (Bessel-corrected; NaN for a single draw)."""
    return labels.median(dim=dim).values, labels.std(dim=dim, correction=1)


@dataclasses.dataclass(frozen=True)
class NativeSpectra:
    """A batch of spectra on their own (native) pixels, ragged, as flat arrays: spectrum ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``.

    ``wavelength`` (Å), ``flux`` and ``error`` (1σ, already capped at 5 × the median error by the reader) are float32
    exactly as :class:`~catalogbuilder.readers.base.Spectrum` holds them; ``offsets`` is int64 (spectra + 1), from 0
    and non-decreasing. NaN flux pixels are kept here; the interpolation onto a grid drops them with their wavelength.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    error: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in (("wavelength", np.float32), ("flux", np.float32), ("error", np.float32),
                            ("offsets", np.int64)):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        if self.flux.ndim != 1 or self.wavelength.shape != self.flux.shape or self.error.shape != self.flux.shape:
            raise ValueError("native wavelength, flux and error must be flat arrays of one length; got shapes "
                             f"{self.wavelength.shape}, {self.flux.shape}, {self.error.shape}")
        offsets = self.offsets
        if (offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0 or offsets[-1] != self.flux.size
                or np.any(np.diff(offsets) < 0)):
            raise ValueError(f"offsets must rise from 0 to the number of values ({self.flux.size}); got {offsets}")

    @classmethod
    def from_spectra(cls, spectra: Sequence[Spectrum]) -> NativeSpectra:
        """The native arrays of spectra as the readers return them (``Spectrum.wavelength`` must not be None)."""
        on_grid = [index for index, spectrum in enumerate(spectra) if spectrum.wavelength is None]
        if on_grid:
            raise ValueError(f"spectra {on_grid} have no native wavelengths: they already lie on their model grid")

        def flat(name: str) -> np.ndarray:
            arrays = [np.asarray(getattr(spectrum, name), dtype=np.float32).ravel() for spectrum in spectra]
            return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)

        lengths = [np.asarray(spectrum.flux).size for spectrum in spectra]
        return cls(flat("wavelength"), flat("flux"), flat("error"), np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        """Pixels of each spectrum (int64)."""
        return np.diff(self.offsets)

    def take(self, rows: slice | Sequence[int] | np.ndarray) -> NativeSpectra:
        """The spectra at ``rows`` (a slice or integer positions; repeats allowed) in that order, as a new batch."""
        positions = np.arange(len(self))[rows]
        lengths = self.lengths[positions]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(self.offsets[positions] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return NativeSpectra(self.wavelength[index], self.flux[index], self.error[index], offsets)

    def spectrum_of(self, values: np.ndarray) -> np.ndarray:
        """Spectrum number of each flat value index in ``values``."""
        return np.searchsorted(self.offsets, values, side="right") - 1


@dataclasses.dataclass(frozen=True)
class GridInterpolation:
    """``np.interp`` of every spectrum of a :class:`NativeSpectra` batch onto one wavelength grid, prepared once and
    applied to any number of realisations of the batch's flux in one call (e.g. every Monte-Carlo draw).

    Bit for bit the semantics of the ingest path (``readers.base.interpolate_onto``, ``np.interp``): NaN-flux pixels
    are dropped with their wavelength and wavelengths sorted (stably); per grid point x, j is the last remaining pixel
    with wavelength w[j] <= x; the value is f[0] below the native range, f[last] at and above its end, f[j] where
    w[j] == x, and otherwise ``(f[j+1] − f[j]) / (w[j+1] − w[j]) × (x − w[j]) + f[j]`` in float64 arithmetic on the
    float32 inputs, rounded to float32 — with numpy's retry from the upper pixel where that is NaN (infinite flux).

    Tensors (spectra, grid points), on one device: ``lower``/``upper`` flat value indices of f[j]/f[j+1] (equal where
    the value is ``held`` at f[lower]), ``offset`` = x − w[j] and ``step`` = w[j+1] − w[j] (float64);
    ``grid`` (grid points,) and ``wavelength`` (values,) float64 serve the retry.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    offset: torch.Tensor
    step: torch.Tensor
    held: torch.Tensor
    grid: torch.Tensor
    wavelength: torch.Tensor

    @classmethod
    def build(cls, native: NativeSpectra, grid: np.ndarray, device: torch.device | str = "cpu") -> GridInterpolation:
        """Prepare the interpolation of ``native`` onto ``grid`` (Å) on ``device``. ``ValueError`` when a spectrum has
        no non-NaN flux pixel, or a non-finite wavelength at a pixel with non-NaN flux."""
        device = torch.device(device)
        measured = ~np.isnan(native.flux)
        counted = np.concatenate([[0], np.cumsum(measured)])
        kept = counted[native.offsets[1:]] - counted[native.offsets[:-1]]
        if np.any(kept == 0):
            raise ValueError(f"spectra {np.flatnonzero(kept == 0).tolist()} have no non-NaN flux pixel to interpolate")
        bad_wavelength = np.flatnonzero(measured & ~np.isfinite(native.wavelength))
        if bad_wavelength.size:
            raise ValueError(f"spectra {np.unique(native.spectrum_of(bad_wavelength)).tolist()} have a non-finite "
                             "wavelength at a pixel with a flux value")
        points = torch.as_tensor(np.asarray(grid, dtype=np.float64), device=device)
        wavelength = torch.from_numpy(native.wavelength).to(device=device, dtype=torch.float64)
        width = int(native.lengths.max()) if len(native) else 0
        column = torch.arange(width, device=device)
        inside = column < torch.from_numpy(native.lengths).to(device)[:, None]
        flat = torch.where(inside, torch.from_numpy(native.offsets[:-1]).to(device)[:, None] + column, 0)
        keep = inside & torch.from_numpy(measured).to(device)[flat]
        # dropped pixels and the padding sort to the end as +inf, beyond every grid point
        sorted_wavelength, order = torch.sort(torch.where(keep, wavelength[flat], torch.inf), dim=1, stable=True)
        sorted_flat = flat.gather(1, order)
        last = torch.from_numpy(kept - 1).to(device)[:, None]
        points_per_row = points.expand(len(native), -1).contiguous()
        j = torch.searchsorted(sorted_wavelength, points_per_row, right=True) - 1
        lower = torch.minimum(j.clamp(min=0), last)
        lower_wavelength = sorted_wavelength.gather(1, lower)
        held = (j < 0) | (j >= last) | (lower_wavelength == points_per_row)
        upper = torch.where(held, lower, lower + 1)
        return cls(
            lower=sorted_flat.gather(1, lower),
            upper=sorted_flat.gather(1, upper),
            offset=torch.where(held, 0.0, points_per_row - lower_wavelength),
            step=torch.where(held, 1.0, sorted_wavelength.gather(1, upper) - lower_wavelength),
            held=held,
            grid=points,
            wavelength=wavelength,
        )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (..., values of the batch) on the device → float32 (..., spectra, grid points)."""
        values = values.to(torch.float64)
        lower, upper = values[..., self.lower], values[..., self.upper]
        slope = (upper - lower) / self.step
        result = torch.where(self.held, lower, slope * self.offset + lower)
        retry = torch.isnan(result) & ~self.held
        if bool(retry.any()):
            from_upper = slope * (self.grid - self.wavelength[self.upper]) + upper
            result = torch.where(retry, from_upper, result)
            result = torch.where(retry & torch.isnan(result) & (lower == upper), lower, result)
        return result.to(torch.float32)


def require_noise_source(model_name: str, grid: str, draws: int, native: NativeSpectra | None,
                         noise_on_grid: bool) -> None:
    """Refuse Monte-Carlo draws whose statistics would silently differ from the reference's.

    On grids that are not the survey's own pixels (optical) the noise must be drawn on the native pixels: ``draws > 0``
    without ``native`` raises unless the caller asks for noise on the resampled grid with ``noise_on_grid=True``.
    """
    if native is not None and noise_on_grid:
        raise ValueError(f"{model_name}: give native spectra or noise_on_grid=True, not both")
    if draws > 0 and native is None and not noise_on_grid and grid not in NATIVE_PIXEL_GRIDS:
        raise ValueError(
            f"{model_name}: Monte-Carlo draws on the {grid!r} grid need each spectrum's native pixels "
            "(native=NativeSpectra): the reference draws the noise before the interpolation onto the grid. "
            "noise_on_grid=True draws it on the resampled grid instead, whose standard deviations differ from the "
            "reference's by tens of per cent")


def monte_carlo_predict(
    flux: np.ndarray | torch.Tensor,
    error: np.ndarray | torch.Tensor | None,
    predict: LabelPredictor,
    draws: int,
    seeds: Sequence[int] | np.ndarray | None,
    device: torch.device | str = "cpu",
    max_batch: int = DEFAULT_MAX_BATCH,
    native: NativeSpectra | None = None,
    grid_wavelength: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of every spectrum as (value, raw_error, noiseless), each (spectra, targets) float64.

    ``flux`` (spectra, grid pixels) is the stored grid flux; its prediction is ``noiseless``. With ``draws > 0``,
    value = median and raw_error = standard deviation of ``draws`` noisy realisations (:func:`draw_statistics`);
    with ``draws == 0``, value = noiseless and raw_error = NaN.
    Noise: with ``native`` (row i of ``flux`` is spectrum i of ``native`` interpolated onto ``grid_wavelength``, Å;
    checked bit for bit, ``ValueError`` otherwise) each draw is native flux + native error × N(0, 1), then
    interpolated by :class:`GridInterpolation`; native errors must be finite where the flux is not NaN. Without
    ``native``, flux + :func:`cap_errors` (flux, ``error``) × N(0, 1) on the grid.
    ``seeds``: one int per spectrum (see :func:`spectrum_seed`); ``None`` draws fresh random seeds (not reproducible).
    """
    device = torch.device(device)
    flux = torch.as_tensor(flux, dtype=torch.float32)
    if device.type == "cuda":  # page-locked host memory: the non_blocking copies below overlap with computing
        flux = flux.pin_memory()
    if flux.ndim != 2:
        raise ValueError(f"flux must be (spectra, pixels); got {tuple(flux.shape)}")
    if draws < 0 or max_batch < 1:
        raise ValueError(f"draws must be >= 0 and max_batch >= 1; got draws={draws}, max_batch={max_batch}")
    n_spectra, n_pixels = flux.shape
    if n_spectra == 0:
        raise ValueError("no spectra to predict")
    if draws and native is None:
        if error is None:
            raise ValueError("Monte-Carlo draws need the flux errors (or the native spectra)")
        error = torch.as_tensor(error, dtype=torch.float32)
        error = error.pin_memory() if device.type == "cuda" else error
        if error.shape != flux.shape:
            raise ValueError(f"flux and error must both be (spectra, pixels); got {tuple(flux.shape)} and "
                             f"{tuple(error.shape)}")
    if native is not None:
        if len(native) != n_spectra or grid_wavelength is None or len(grid_wavelength) != n_pixels:
            raise ValueError(f"native spectra need one spectrum per flux row ({len(native)} for {n_spectra}) and "
                             f"the grid wavelengths of the flux ({n_pixels} pixels)")
    if seeds is None:
        seeds = np.random.default_rng().integers(0, 2**63 - 1, size=n_spectra)
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != n_spectra:
        raise ValueError(f"need one seed per spectrum: {len(seeds)} seeds for {n_spectra} spectra")

    per_forward = spectra_per_forward(max_batch, draws)
    values, raw_errors, noiseless = [], [], []
    with torch.inference_mode():
        for start in range(0, n_spectra, per_forward):
            stop = min(start + per_forward, n_spectra)
            batch_flux = flux[start:stop].to(device, non_blocking=True)
            realisations = [batch_flux[:, None, :]]
            if draws and native is not None:
                realisations.append(_native_draws(native.take(slice(start, stop)), batch_flux, grid_wavelength,
                                                  seeds[start:stop], draws))
            elif draws:
                realisations.append(_grid_draws(batch_flux, error[start:stop].to(device, non_blocking=True),
                                                seeds[start:stop], draws))
            rows = torch.cat(realisations, dim=1).reshape(-1, n_pixels)
            index = torch.arange(start, stop, device=device).repeat_interleave(draws + 1)
            labels = predict(rows.contiguous(), index).double().reshape(stop - start, draws + 1, -1).cpu()
            noiseless.append(labels[:, 0])
            if draws:
                value, raw_error = draw_statistics(labels[:, 1:], dim=1)
            else:
                value, raw_error = labels[:, 0], torch.full_like(labels[:, 0], math.nan)
            values.append(value)
            raw_errors.append(raw_error)
    return torch.cat(values).numpy(), torch.cat(raw_errors).numpy(), torch.cat(noiseless).numpy()


def _grid_draws(flux: torch.Tensor, error: torch.Tensor, seeds: Sequence[int], draws: int) -> torch.Tensor:
    """(spectra, draws, pixels) realisations flux + cap_errors(flux, error) × N(0, 1) on the grid."""
    noise = torch.stack([_normal_draws(seed, draws, flux.shape[1], flux.device) for seed in seeds])
    return flux[:, None, :] + cap_errors(flux, error)[:, None, :] * noise


def _native_draws(native: NativeSpectra, grid_flux: torch.Tensor, grid_wavelength: np.ndarray, seeds: Sequence[int],
                  draws: int) -> torch.Tensor:
    """(spectra, draws, grid pixels) realisations drawn on the native pixels and interpolated onto the grid.

    ``ValueError`` when a spectrum's native error is not finite where its flux is not NaN, or when a native spectrum
    does not interpolate to its row of ``grid_flux`` (the arrays of different spectra were paired)."""
    unusable = np.flatnonzero(~np.isnan(native.flux) & ~np.isfinite(native.error))
    if unusable.size:
        raise ValueError(f"native spectra {np.unique(native.spectrum_of(unusable)).tolist()} of this batch have "
                         "non-finite errors at pixels with a flux value")
    device = grid_flux.device
    interpolation = GridInterpolation.build(native, grid_wavelength, device)
    flux = torch.from_numpy(native.flux).to(device)
    error = torch.from_numpy(native.error).to(device)
    as_ingested = interpolation(flux)
    mismatch = ~((as_ingested == grid_flux) | (as_ingested.isnan() & grid_flux.isnan())).all(dim=1)
    if bool(mismatch.any()):
        raise ValueError(f"native spectra {torch.nonzero(mismatch).flatten().tolist()} of this batch do not interpolate to "
                         "their grid flux: native arrays and grid rows of different spectra?")
    noise = torch.cat([_normal_draws(seed, draws, int(length), device)
                       for seed, length in zip(seeds, native.lengths)], dim=1)
    return interpolation(flux + error * noise).transpose(0, 1)


def canonical_outputs(labels: Sequence[str], value: np.ndarray, raw_error: np.ndarray,
                      noiseless: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Network labels → canonical outputs: ``teff`` (K), ``logteff``, ``logg``, ``fe_h``, ``rv``, each with
    ``raw_e_<name>`` and, when ``noiseless`` is given, ``noiseless_<name>``; the arrays are (spectra, labels).

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
        if noiseless is not None:
            result[f"{NOISELESS_PREFIX}{name}"] = noiseless[:, column]
    with np.errstate(divide="ignore", invalid="ignore"):
        if "logteff" in result and "teff" not in result:
            result["teff"] = 10.0 ** result["logteff"]
            result["raw_e_teff"] = result["teff"] * np.log(10.0) * result["raw_e_logteff"]
            if noiseless is not None:
                result[f"{NOISELESS_PREFIX}teff"] = 10.0 ** result[f"{NOISELESS_PREFIX}logteff"]
        elif "teff" in result and "logteff" not in result:
            result["logteff"] = np.log10(result["teff"])
            result["raw_e_logteff"] = result["raw_e_teff"] / (result["teff"] * np.log(10.0))
            if noiseless is not None:
                result[f"{NOISELESS_PREFIX}logteff"] = np.log10(result[f"{NOISELESS_PREFIX}teff"])
    return result
