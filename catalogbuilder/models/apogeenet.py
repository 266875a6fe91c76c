"""APOGEE Net I (Olney et al. 2020) and APOGEE Net II (Sprague et al. 2022): the VGG-like CNN on raw apStar flux.

Network (Sprague 2022 appendix A; Net I is the same CNN without the metadata branch): 12 Conv1d (k = 3, padding 1)
with ReLU, a max-pool of 2 after every second convolution (8575 → 133 pixels × 64 channels), flatten, for Net II
concatenated with the 64 outputs of a 7 → 8 → 16 → 32 → 32 → 64 ReLU MLP of the metadata, then fc1 → ReLU(dropout)
→ fc2 → ReLU(dropout) → fc3 to 3 z-scores. Parameter names and shapes equal the published code
(``conv1..conv12``, ``metadata.l1..l5``, ``fc1..fc3``), so its ``state_dict`` loads strictly.

Input (both papers, and the reference data loaders): the raw apStar flux on the 8575-pixel grid, NaN → 0, no
normalisation and no log ("training on the raw flux from the apStar readily converged", Olney 2020 §3.1). Outputs:
Net II ``logg, logTeff, FeH`` (column order of the reference ``predict_spectra``) z-scored with
``constants.LABEL_STATS["apogeenet2"]``; Net I ``logg, Teff, FeH`` with ``LABEL_STATS["apogeenet1"]``.

Net II metadata, in this order: Gaia parallax (mas), G, BP, RP, 2MASS J, H, K (mag). A value that is non-finite,
≥ 98 or ≤ −1 is *missing* and replaced by the reference's fixed replacement value (faint-limit magnitudes), then each
is z-scored with the reference means/stds. This is what the production pipeline (Astra, ``ApogeeNetV2``) did: the
network still returns parameters, and the row is marked ``missing_photometry`` (→ ``MISSING_PHOTOMETRY``, a warning
flag, not ``flag_bad``). The network was trained with the same replacements in its training table, so imputed rows
stay inside what it has seen; the spectrum carries most of the information (photometry only refines the SED).

Uncertainties: ``models.montecarlo`` (errors capped at 5 × median, N draws of flux + error × N(0,1), median and std);
the metadata is passed as is, without noise (Sprague 2022 §3.2.3).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from catalogbuilder.constants import APOGEE_NPIX, APOGEENET2_PHOTOMETRY_STATS, DEFAULT_DRAWS, GRID_APOGEE
from catalogbuilder.models.montecarlo import (DEFAULT_MAX_BATCH, NativeSpectra, canonical_outputs, monte_carlo_predict,
                                             require_noise_source)
from catalogbuilder.models.preprocess import load_label_stats, unnormalize
from catalogbuilder.models.registry import (MODEL_INFO_FILE, ModelInfo, ModelSummary, NetworkFamily, SpectralModel,
                                            register_family)
from catalogbuilder.models.weight_files import weights_sha256
from catalogbuilder.models.weights import load_state_dict, save_state_dict

FAMILY_NET1 = "apogeenet1"
FAMILY_NET2 = "apogeenet2"
# Output columns of the networks (reference code), names as in constants.LABEL_STATS.
NET1_LABELS: tuple[str, ...] = ("logg", "Teff", "FeH")
NET2_LABELS: tuple[str, ...] = ("logg", "logTeff", "FeH")
OUTPUTS: tuple[str, ...] = ("teff", "logg", "fe_h")  # canonical outputs of both networks

# Net II metadata: canonical photometry keys (crossmatch output names) in network order, and the reference's
# replacement values, means and standard deviations from constants.APOGEENET2_PHOTOMETRY_STATS.
METADATA_KEYS: tuple[str, ...] = (
    "parallax", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "tmass_j", "tmass_h", "tmass_k",
)
METADATA_REPLACEMENT = np.array([APOGEENET2_PHOTOMETRY_STATS[key][0] for key in METADATA_KEYS])
METADATA_MEAN = np.array([APOGEENET2_PHOTOMETRY_STATS[key][1] for key in METADATA_KEYS])
METADATA_STD = np.array([APOGEENET2_PHOTOMETRY_STATS[key][2] for key in METADATA_KEYS])
METADATA_VALID_BELOW = 98.0  # 99.99-style sentinels
METADATA_VALID_ABOVE = -1.0  # -9999-style sentinels (and parallaxes ≤ −1 mas)

CONV_CHANNELS: tuple[tuple[int, int], ...] = (
    (1, 8), (8, 8), (8, 16), (16, 16), (16, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 64), (64, 64),
)
N_POOLS = 6
FLAT_PIXELS = 133  # 8575 halved six times (floor)
METADATA_WIDTHS: tuple[int, ...] = (7, 8, 16, 32, 32, 64)
FC_WIDTH = 512
DEFAULT_DROPOUT = 0.07646  # Sprague 2022 Table 3 best value (inactive at inference)


def expected_parameter_shapes(with_metadata: bool, num_targets: int = 3) -> dict[str, tuple[int, ...]]:
    """``state_dict`` names and shapes of the published code (Sprague 2022 appendix A; without ``metadata.*``
    and with ``fc1`` of 64·133 inputs for Net I)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (c_in, c_out) in enumerate(CONV_CHANNELS, start=1):
        shapes[f"conv{index}.weight"] = (c_out, c_in, 3)
        shapes[f"conv{index}.bias"] = (c_out,)
    if with_metadata:
        for index, (w_in, w_out) in enumerate(zip(METADATA_WIDTHS[:-1], METADATA_WIDTHS[1:]), start=1):
            shapes[f"metadata.l{index}.weight"] = (w_out, w_in)
            shapes[f"metadata.l{index}.bias"] = (w_out,)
    flat = CONV_CHANNELS[-1][1] * FLAT_PIXELS + (METADATA_WIDTHS[-1] if with_metadata else 0)
    shapes.update({"fc1.weight": (FC_WIDTH, flat), "fc1.bias": (FC_WIDTH,), "fc2.weight": (FC_WIDTH, FC_WIDTH),
                   "fc2.bias": (FC_WIDTH,), "fc3.weight": (num_targets, FC_WIDTH), "fc3.bias": (num_targets,)})
    return shapes


class MetadataNet(nn.Module):
    """The 7 → 8 → 16 → 32 → 32 → 64 metadata MLP of Net II, ReLU after every layer (layers ``l1..l5``)."""

    def __init__(self) -> None:
        super().__init__()
        for index, (w_in, w_out) in enumerate(zip(METADATA_WIDTHS[:-1], METADATA_WIDTHS[1:]), start=1):
            setattr(self, f"l{index}", nn.Linear(w_in, w_out))

    def forward(self, metadata: torch.Tensor) -> torch.Tensor:
        x = metadata
        for index in range(1, len(METADATA_WIDTHS)):
            x = F.relu(getattr(self, f"l{index}")(x))
        return x


class ApogeeNetCNN(nn.Module):
    """APOGEE Net I (``with_metadata=False``) or II: (batch, 1, 8575) raw flux [+ (batch, 7) metadata] → z-scores."""

    def __init__(self, with_metadata: bool, num_targets: int = 3, dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.with_metadata = with_metadata
        for index, (c_in, c_out) in enumerate(CONV_CHANNELS, start=1):
            setattr(self, f"conv{index}", nn.Conv1d(c_in, c_out, 3, padding=1))
        if with_metadata:
            self.metadata = MetadataNet()
        flat = CONV_CHANNELS[-1][1] * FLAT_PIXELS + (METADATA_WIDTHS[-1] if with_metadata else 0)
        self.fc1 = nn.Linear(flat, FC_WIDTH)
        self.fc1_dropout = nn.Dropout(p=dropout)
        self.fc2 = nn.Linear(FC_WIDTH, FC_WIDTH)
        self.fc3 = nn.Linear(FC_WIDTH, num_targets)

    def forward(self, flux: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        x = flux.unsqueeze(1) if flux.ndim == 2 else flux
        for pair in range(N_POOLS):
            first, second = getattr(self, f"conv{2 * pair + 1}"), getattr(self, f"conv{2 * pair + 2}")
            x = F.max_pool1d(F.relu(second(F.relu(first(x)))), 2)
        x = x.flatten(1)
        if self.with_metadata:
            if metadata is None:
                raise ValueError("APOGEE Net II needs the 7 metadata values per spectrum")
            x = torch.hstack((x, self.metadata(metadata)))
        x = F.relu(self.fc1_dropout(self.fc1(x)))
        x = F.relu(self.fc1_dropout(self.fc2(x)))
        return self.fc3(x)


def normalize_metadata(photometry: Mapping[str, Any] | None, n_spectra: int) -> tuple[np.ndarray, np.ndarray]:
    """Net II metadata (n, 7) float32 z-scores and a (n,) bool ``missing_photometry`` mask.

    ``photometry`` maps :data:`METADATA_KEYS` to per-spectrum arrays (absent keys or ``None`` count as missing).
    Missing values (non-finite, ≥ 98, ≤ −1) take the reference replacement values before z-scoring.
    """
    raw = np.full((n_spectra, len(METADATA_KEYS)), np.nan)
    for column, key in enumerate(METADATA_KEYS):
        if photometry is not None and photometry.get(key) is not None:
            values = np.asarray(photometry[key], dtype=np.float64).reshape(-1)
            if len(values) != n_spectra:
                raise ValueError(f"photometry[{key!r}] has {len(values)} values for {n_spectra} spectra")
            raw[:, column] = values
    with np.errstate(invalid="ignore"):
        missing = ~np.isfinite(raw) | (raw >= METADATA_VALID_BELOW) | (raw <= METADATA_VALID_ABOVE)
    filled = np.where(missing, METADATA_REPLACEMENT, raw)
    return ((filled - METADATA_MEAN) / METADATA_STD).astype(np.float32), missing.any(axis=1)


class ApogeeNetModel(SpectralModel):
    """A loaded APOGEE Net I or II behind the :class:`SpectralModel` interface (APOGEE grid, raw flux input).

    ``predict`` adds ``missing_photometry`` (bool per spectrum) for Net II; Net I ignores ``photometry``.
    """

    def __init__(self, network: ApogeeNetCNN, info: ModelInfo, stats: dict[str, tuple[float, float]],
                 weights_sha256: str, device: torch.device, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.labels = NET2_LABELS if network.with_metadata else NET1_LABELS
        super().__init__(info, GRID_APOGEE, weights_sha256, OUTPUTS, device)
        self.network = network.to(device).eval()
        self.stats = stats
        self.max_batch = max_batch

    @property
    def needs_photometry(self) -> bool:  # type: ignore[override]
        return self.network.with_metadata

    @property
    def photometry_keys(self) -> tuple[str, ...]:
        """Keys ``predict`` reads from ``photometry`` (:data:`METADATA_KEYS`; none for Net I)."""
        return METADATA_KEYS if self.network.with_metadata else ()

    def predict_labels(self, flux: torch.Tensor, spectrum_index: torch.Tensor,
                       metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Forward one batch of raw flux rows (NaN → 0) → (rows, 3) labels in physical units; ``metadata`` holds the
        normalised metadata of every spectrum of the call, gathered per row with ``spectrum_index``."""
        flux = raw_flux(flux.to(self.device))
        metadata = metadata[spectrum_index] if metadata is not None else None
        with torch.inference_mode():
            z_scores = self.network(flux.unsqueeze(1).contiguous(), metadata)
        return unnormalize(z_scores.float(), self.labels, self.stats)

    def predict(self, flux: np.ndarray | None, error: np.ndarray | None, draws: int = DEFAULT_DRAWS,
                seeds: Sequence[int] | np.ndarray | None = None,
                photometry: Mapping[str, np.ndarray] | None = None, native: NativeSpectra | None = None,
                noise_on_grid: bool = False) -> dict[str, np.ndarray]:
        """See :meth:`SpectralModel.predict`. ``photometry``: per-spectrum arrays keyed by :data:`METADATA_KEYS`."""
        if flux is None:
            raise ValueError(f"{self.name}: APOGEE Net needs flux (spectra, {APOGEE_NPIX})")
        flux = np.nan_to_num(np.asarray(flux, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if flux.ndim != 2 or flux.shape[1] != APOGEE_NPIX:
            raise ValueError(f"{self.name}: flux must be (spectra, {APOGEE_NPIX}) on the apogee grid; got {flux.shape}")
        require_noise_source(self.name, self.grid, draws, native, noise_on_grid)
        missing = np.zeros(len(flux), dtype=bool)
        metadata = None
        if self.network.with_metadata:
            normalised, missing = normalize_metadata(photometry, len(flux))
            metadata = torch.from_numpy(normalised).to(self.device)
        if len(flux) == 0:
            empty = np.empty((0, len(self.labels)))
            result = canonical_outputs(self.labels, empty, empty, empty)
        else:
            # the metadata travels with this call (no model state), so concurrent predict calls cannot mix it up
            predictor = functools.partial(self.predict_labels, metadata=metadata)
            value, raw_error, noiseless = monte_carlo_predict(
                flux, error, predictor, draws, seeds, self.device, self.max_batch, native=native,
                grid_wavelength=self.grid_spec.wavelength() if native is not None else None)
            result = canonical_outputs(self.labels, value, raw_error, noiseless)
        if self.network.with_metadata:
            result["missing_photometry"] = missing
        return result


def _family_settings(family: str) -> tuple[bool, str]:
    """(with_metadata, LABEL_STATS key) of a family name."""
    if family == FAMILY_NET2:
        return True, "apogeenet2"
    if family == FAMILY_NET1:
        return False, "apogeenet1"
    raise ValueError(f"not an APOGEE Net family: {family!r} (expected {FAMILY_NET1!r} or {FAMILY_NET2!r})")


def read_dropout(path: Path | None) -> float:
    """The dropout of an APOGEE Net ``model_args.yaml`` (its only free argument; default :data:`DEFAULT_DROPOUT`)."""
    if path is None or (path.is_dir() and not (path / "model_args.yaml").exists()):
        return DEFAULT_DROPOUT
    path = path / "model_args.yaml" if path.is_dir() else path
    arguments = yaml.safe_load(path.read_text()) or {}
    if not isinstance(arguments, dict) or set(arguments) - {"dropout"}:
        raise ValueError(f"{path}: the APOGEE Net architecture is fixed; its model_args may only set dropout, "
                         f"got {arguments!r}")
    return float(arguments.get("dropout", DEFAULT_DROPOUT))


def write_dropout(dropout: float, directory: Path) -> None:
    """Write ``model_args.yaml`` = ``{dropout: p}``."""
    (Path(directory) / "model_args.yaml").write_text(yaml.safe_dump({"dropout": float(dropout)}))


def build_network(family: str, directory: str | Path | None = None) -> ApogeeNetCNN:
    """An untrained network of ``family``; ``model_args.yaml`` in ``directory`` may set ``dropout``."""
    with_metadata, _ = _family_settings(family)
    return ApogeeNetCNN(with_metadata, dropout=read_dropout(None if directory is None else Path(directory)))


def raw_flux(flux: torch.Tensor | np.ndarray) -> torch.Tensor:
    """APOGEE Net I/II input: the raw flux (float32), NaN and ±inf → 0, nothing else (Olney 2020 §3.1)."""
    return torch.nan_to_num(torch.as_tensor(flux, dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)


def load_apogeenet(info: ModelInfo, device: torch.device, **options: Any) -> ApogeeNetModel:
    """Build an :class:`ApogeeNetModel` from a model directory (weights, optional ``stats.yaml``/``model_args.yaml``).

    The state_dict must match :func:`expected_parameter_shapes` exactly (published APOGEE Net weights do).
    """
    with_metadata, stats_key = _family_settings(info.family)
    network = build_network(info.family, info.directory)
    state_dict, checksum = load_state_dict(info.directory)
    expected = expected_parameter_shapes(with_metadata)
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(key for key in set(found) & set(expected) if found[key] != expected[key])
        raise ValueError(f"{info.directory}: weights are not an {info.family} state_dict: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {[(k, found[k], expected[k]) for k in wrong[:5]]}")
    network.load_state_dict(state_dict, strict=True)
    stats = load_label_stats(info.directory, stats_key)
    return ApogeeNetModel(network, info, stats, checksum, device, **options)


def describe_apogeenet(info: ModelInfo) -> ModelSummary:
    """The :class:`ModelSummary` of an APOGEE Net I/II model directory (no weights loaded)."""
    with_metadata, _ = _family_settings(info.family)
    return ModelSummary(info.name, info.family, GRID_APOGEE, OUTPUTS, with_metadata,
                        METADATA_KEYS if with_metadata else (), dict(info.domain), weights_sha256(info.directory),
                        info.directory)


NET1 = register_family(NetworkFamily(
    FAMILY_NET1, load_apogeenet, describe_apogeenet, read_args=read_dropout,
    build=lambda dropout: ApogeeNetCNN(False, dropout=dropout), targets=lambda _dropout: NET1_LABELS,
    write_args=write_dropout, preprocess=raw_flux, grid=GRID_APOGEE,
))
NET2 = register_family(NetworkFamily(
    FAMILY_NET2, load_apogeenet, describe_apogeenet, read_args=read_dropout,
    build=lambda dropout: ApogeeNetCNN(True, dropout=dropout), targets=lambda _dropout: NET2_LABELS,
    write_args=write_dropout, preprocess=raw_flux, metadata_width=len(METADATA_KEYS), grid=GRID_APOGEE,
))


def write_initialised_model(directory: str | Path, family: str, seed: int = 0, name: str | None = None) -> str:
    """Write a model directory with freshly initialised (untrained) weights of ``family``; returns the weights sha256.

    Only for plumbing and tests: no published APOGEE Net weights ship with catalogbuilder. Drop published weights
    (``model.pt`` or ``model_chunk_0..9``) into such a directory instead to run the real model.
    """
    _family_settings(family)
    directory = Path(directory)
    torch.manual_seed(seed)
    digest = save_state_dict(build_network(family).state_dict(), directory)
    info = {"family": family, "grid": GRID_APOGEE, "name": name or directory.name,
            "description": f"{family} with randomly initialised weights (seed {seed}); not a trained model"}
    (directory / MODEL_INFO_FILE).write_text(yaml.safe_dump(info, sort_keys=False))
    return digest


__all__ = [
    "ApogeeNetCNN", "ApogeeNetModel", "MetadataNet", "METADATA_KEYS", "expected_parameter_shapes", "load_apogeenet",
    "normalize_metadata", "write_initialised_model",
]
