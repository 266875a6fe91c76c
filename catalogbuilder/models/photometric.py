"""Survey-of-Surveys photometric MLP (Turchi et al. 2024): Teff, log g, [Fe/H] from photometry and parallax.

One network per target. Each network is a stack of dense blocks ``Linear → LeakyReLU → BatchNorm1d → Dropout``
whose widths rise from 80 to 160 and fall back to 80 (18 hidden layers, the paper's "diamond"), then a
``Linear(80, 1)`` output. Inputs are engineered from a table of magnitudes (see :func:`photometric_features`):
apparent magnitudes, adjacent colours, parallax, parallax S/N and absolute magnitudes; NaN-tolerant through
a missing-indicator per feature (the value is replaced by the training mean, i.e. 0 after standardisation,
and a 0/1 column says it was missing). The paper only says "additional strategies" handle NaNs; indicators
plus training-time band dropout (``photometric.train``) make the network learn to use partial photometry.

A model directory holds ``catalogbuilder.yaml`` (family ``photometric``, name, bands, feature statistics,
target statistics, architecture) and ``weights.pt`` (one ``state_dict`` of a ``ModuleDict`` with one network
per target).
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from catalogbuilder.constants import NOISELESS_PREFIX
from catalogbuilder.models.montecarlo import NativeSpectra, draw_statistics
from catalogbuilder.models.registry import ModelInfo, ModelSummary, NetworkFamily, SpectralModel, register_family
from catalogbuilder.models.weight_files import WeightsError, files_sha256
from catalogbuilder.models.weights import load_state_dict

FAMILY = "photometric"
CONFIG_FILE = "catalogbuilder.yaml"
WEIGHTS_FILE = "weights.pt"

# Canonical input columns (mag, Vega for 2MASS, AB-like for SDSS, Gaia Vega; parallax in mas).
TARGETS: tuple[str, ...] = ("teff", "logg", "fe_h")
TARGET_UNITS: dict[str, str] = {"teff": "K", "logg": "dex", "fe_h": "dex"}
PARALLAX = "parallax"
PARALLAX_ERROR = "parallax_error"
GSPPHOT_COLUMNS: tuple[str, ...] = ("teff_gspphot", "logg_gspphot", "mh_gspphot")

# The diamond of the paper: 18 hidden layers, 80 → 160 → 80 wide.
DIAMOND_WIDTHS: tuple[int, ...] = (80, 90, 100, 110, 120, 130, 140, 150, 160, 160, 150, 140, 130, 120, 110, 100, 90, 80)


def error_column(column: str) -> str:
    """Name of the 1σ error column of a magnitude column (``tmass_j`` → ``e_tmass_j``)."""
    return f"e_{column}"


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A float64 column of ``frame``, all-NaN when the table lacks it."""
    if name in frame.columns:
        return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.full(len(frame), np.nan)


def feature_names(bands: Sequence[str], use_gspphot: bool) -> list[str]:
    """Names of the engineered features, in network input order (indicators follow in the same order)."""
    names = [f"mag:{band}" for band in bands]
    names += [f"color:{a}-{b}" for a, b in zip(bands[:-1], bands[1:])]
    names += ["parallax", "parallax_over_error"]
    names += [f"absmag:{band}" for band in bands]
    if use_gspphot:
        names += list(GSPPHOT_COLUMNS)
    return names


def photometric_features(frame: pd.DataFrame, bands: Sequence[str], use_gspphot: bool) -> np.ndarray:
    """Engineered features (n_rows, n_features), NaN where an input is missing.

    Absolute magnitudes use M = m + 5 log10(parallax / mas) − 10 and are NaN for parallax ≤ 0 (no extinction
    correction: the paper's ``*abs_nored`` inputs). Colours are between consecutive ``bands``.
    """
    mags = np.stack([_column(frame, band) for band in bands], axis=1)
    parallax = _column(frame, PARALLAX)
    parallax_error = _column(frame, PARALLAX_ERROR)
    with np.errstate(invalid="ignore", divide="ignore"):
        positive = np.where(parallax > 0, parallax, np.nan)
        absmags = mags + 5.0 * np.log10(positive)[:, None] - 10.0
        over_error = np.where(parallax_error > 0, parallax / parallax_error, np.nan)
    columns = [mags, mags[:, :-1] - mags[:, 1:], parallax[:, None], over_error[:, None], absmags]
    if use_gspphot:
        columns.append(np.stack([_column(frame, name) for name in GSPPHOT_COLUMNS], axis=1))
    return np.concatenate(columns, axis=1)


def diamond_mlp(n_inputs: int, widths: Sequence[int] = DIAMOND_WIDTHS, dropout: float = 0.1,
                negative_slope: float = 0.01) -> nn.Sequential:
    """One per-target network: dense blocks (Linear, LeakyReLU, BatchNorm1d, Dropout), then Linear(…, 1)."""
    layers: list[nn.Module] = []
    previous = n_inputs
    for width in widths:
        layers += [nn.Linear(previous, width), nn.LeakyReLU(negative_slope), nn.BatchNorm1d(width), nn.Dropout(dropout)]
        previous = width
    layers.append(nn.Linear(previous, 1))
    return nn.Sequential(*layers)


@dataclasses.dataclass
class FeatureScaler:
    """Per-feature standardisation learnt on the training set; NaN → 0 plus a missing-indicator column."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureScaler":
        """Mean and std over the finite values of each column (std 1 where a column is constant or empty)."""
        finite = np.where(np.isfinite(features), features, np.nan)
        with warnings.catch_warnings():  # all-NaN columns are expected (e.g. GSP-Phot absent) and handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        return cls(mean=mean, std=std)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(n, 2·n_features) float32: standardised values (0 where missing) then 0/1 missing indicators."""
        missing = ~np.isfinite(features)
        scaled = np.where(missing, 0.0, (np.where(missing, 0.0, features) - self.mean) / self.std)
        return np.concatenate([scaled, missing.astype(np.float64)], axis=1).astype(np.float32)


@dataclasses.dataclass
class PhotometricConfig:
    """Everything but the weights: inputs, statistics, architecture (stored in ``catalogbuilder.yaml``)."""

    name: str
    bands: list[str]
    use_gspphot: bool
    feature_mean: list[float]
    feature_std: list[float]
    target_mean: dict[str, float]  # physical units (K, dex)
    target_std: dict[str, float]
    widths: list[int] = dataclasses.field(default_factory=lambda: list(DIAMOND_WIDTHS))
    dropout: float = 0.1
    negative_slope: float = 0.01
    training: dict = dataclasses.field(default_factory=dict)  # provenance and scores, informational

    @property
    def scaler(self) -> FeatureScaler:
        return FeatureScaler(np.asarray(self.feature_mean), np.asarray(self.feature_std))

    @property
    def n_inputs(self) -> int:
        return 2 * len(feature_names(self.bands, self.use_gspphot))

    def to_yaml(self) -> dict:
        return {"family": FAMILY, "grid": None, **dataclasses.asdict(self)}

    @classmethod
    def from_yaml(cls, content: Mapping) -> "PhotometricConfig":
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in content.items() if key in fields})


def build_networks(config: PhotometricConfig) -> nn.ModuleDict:
    """One diamond MLP per target, in a ``ModuleDict`` keyed by target name."""
    return nn.ModuleDict({
        target: diamond_mlp(config.n_inputs, config.widths, config.dropout, config.negative_slope)
        for target in TARGETS
    })


class PhotometricModel(SpectralModel):
    """A trained photometric model: ``predict(None, None, photometry=table)`` → teff, logg, fe_h (+ MC errors).

    A :class:`SpectralModel` with ``grid`` None and ``needs_photometry`` True; ``flux`` and ``error`` must be None and
    ``photometry`` is a DataFrame or a mapping of per-row arrays with the canonical column names
    (``photometric.table``). Uncertainties: ``draws`` Monte-Carlo realisations of the inputs, each magnitude and the
    parallax perturbed by its 1σ error column (``e_<band>``, ``parallax_error``) when present; value = median, raw
    error = std over draws as the spectral models compute them (``montecarlo.draw_statistics``: lower middle value for
    an even count, Bessel-corrected; NaN when ``draws == 0``), ``noiseless_<target>`` the prediction of the unperturbed
    inputs (the value itself when ``draws == 0``). A row's draws depend only on its own seed.
    """

    needs_photometry = True

    def __init__(self, config: PhotometricConfig, networks: nn.ModuleDict, weights_sha256: str,
                 device: str | torch.device = "cpu", info: ModelInfo | None = None) -> None:
        info = info or ModelInfo(directory=Path("."), name=config.name, family=FAMILY)
        super().__init__(info, None, weights_sha256, TARGETS, torch.device(device))
        self.config = config
        self.networks = networks.to(self.device).eval()

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "PhotometricModel":
        """Load a model directory (``catalogbuilder.yaml`` + ``weights.pt``)."""
        return load_photometric(ModelInfo.read(directory), torch.device(device))

    def save(self, directory: str | Path) -> Path:
        """Write ``catalogbuilder.yaml`` and ``weights.pt``; updates ``weights_sha256``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights_path = directory / WEIGHTS_FILE
        torch.save(self.networks.state_dict(), weights_path)
        (directory / CONFIG_FILE).write_text(yaml.safe_dump(self.config.to_yaml(), sort_keys=False))
        self.weights_sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        return directory

    def network_inputs(self, photometry: pd.DataFrame) -> np.ndarray:
        """Scaled features with missing indicators for a table of canonical columns."""
        features = photometric_features(photometry, self.config.bands, self.config.use_gspphot)
        return self.config.scaler.transform(features)

    @torch.no_grad()
    def predict_scaled(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Physical-unit predictions for already scaled inputs (n, n_inputs)."""
        tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(self.device)
        return {
            target: network(tensor)[:, 0].cpu().numpy().astype(np.float64) * self.config.target_std[target]
            + self.config.target_mean[target]
            for target, network in self.networks.items()
        }

    def _perturbed(self, photometry: pd.DataFrame, normal: np.ndarray) -> pd.DataFrame:
        """One Monte-Carlo realisation: each perturbed column + error × ``normal[:, j]`` (rows, columns)."""
        drawn = photometry.copy()
        for j, column in enumerate([*self.config.bands, PARALLAX]):
            error_name = PARALLAX_ERROR if column == PARALLAX else error_column(column)
            error = np.nan_to_num(_column(photometry, error_name), nan=0.0)
            drawn[column] = _column(photometry, column) + np.clip(error, 0.0, None) * normal[:, j]
        return drawn

    def predict(self, flux: np.ndarray | None = None, error: np.ndarray | None = None, draws: int = 20,
                seeds: Sequence[int] | np.ndarray | None = None,
                photometry: pd.DataFrame | Mapping[str, np.ndarray] | None = None,
                native: NativeSpectra | None = None, noise_on_grid: bool = False) -> dict[str, np.ndarray]:
        """Per-row teff (K), logg, fe_h (dex) with ``raw_e_*`` and ``noiseless_*``, plus the same for ``logteff``."""
        if flux is not None or error is not None or native is not None:
            raise ValueError("the photometric model takes no spectrum: pass photometry=table only")
        if photometry is None:
            raise ValueError("the photometric model needs photometry (a table of magnitudes and parallax)")
        photometry = pd.DataFrame(photometry).reset_index(drop=True)
        n_rows = len(photometry)
        seeds = list(range(n_rows)) if seeds is None else list(seeds)
        if len(seeds) != n_rows:
            raise ValueError(f"{len(seeds)} seeds for {n_rows} rows")
        noiseless = self.predict_scaled(self.network_inputs(photometry))
        result = {f"{NOISELESS_PREFIX}{target}": value for target, value in noiseless.items()}
        if draws <= 0:
            result.update(noiseless)
            result.update({f"raw_e_{target}": np.full(n_rows, np.nan) for target in TARGETS})
        else:
            n_columns = len(self.config.bands) + 1
            normal = np.stack([np.random.default_rng(int(seed)).standard_normal((draws, n_columns)) for seed in seeds]) \
                if n_rows else np.zeros((0, draws, n_columns))  # (rows, draws, columns): a row's noise is its seed's
            samples = [self.predict_scaled(self.network_inputs(self._perturbed(photometry, normal[:, draw])))
                       for draw in range(draws)]
            for target in TARGETS:
                value, raw_error = draw_statistics(torch.from_numpy(np.stack([sample[target] for sample in samples])),
                                                   dim=0)
                result[target], result[f"raw_e_{target}"] = value.numpy(), raw_error.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            result["logteff"] = np.log10(result["teff"])
            result["raw_e_logteff"] = result["raw_e_teff"] / (result["teff"] * np.log(10.0))
            result[f"{NOISELESS_PREFIX}logteff"] = np.log10(result[f"{NOISELESS_PREFIX}teff"])
        return result


def describe_photometric(info: ModelInfo) -> ModelSummary:
    """The :class:`ModelSummary` of a photometric model directory (``catalogbuilder.yaml`` read, weights hashed
    but not loaded); its photometry keys are the model's bands and the parallax."""
    config = PhotometricConfig.from_yaml(yaml.safe_load(_model_file(info, CONFIG_FILE).read_text()))
    return ModelSummary(info.name, info.family, None, TARGETS, True, (*config.bands, PARALLAX), dict(info.domain),
                        files_sha256([_model_file(info, WEIGHTS_FILE)]), info.directory)


def _model_file(info: ModelInfo, name: str) -> Path:
    """A required file of a photometric model directory (``FileNotFoundError`` naming it when absent)."""
    path = info.directory / name
    if not path.is_file():
        raise FileNotFoundError(f"photometric model directory {info.directory} lacks {name}")
    return path


def load_photometric(info: ModelInfo, device: torch.device, **options: object) -> PhotometricModel:
    """Registry builder: a :class:`PhotometricModel` from ``catalogbuilder.yaml`` + ``weights.pt`` in ``info.directory``."""
    if options:
        raise TypeError(f"the photometric family takes no options; got {sorted(options)}")
    config_path, weights_path = _model_file(info, CONFIG_FILE), _model_file(info, WEIGHTS_FILE)
    config = PhotometricConfig.from_yaml(yaml.safe_load(config_path.read_text()))
    networks = build_networks(config)
    state_dict, digest = load_state_dict(weights_path)  # weights_only: a pickled payload is refused (WeightsError)
    try:
        networks.load_state_dict(state_dict)
    except RuntimeError as error:  # keys or shapes of another configuration
        raise WeightsError(f"{weights_path}: weights do not match {config_path.name}: {' '.join(str(error).split())}"
                           ) from error
    return PhotometricModel(config, networks, digest, device, info)


# trained on tables by catalogbuilder.photometric.train, not from spectra
register_family(NetworkFamily(FAMILY, load_photometric, describe_photometric))
