"""Model registry: ``load_model(name_or_dir)`` → a :class:`SpectralModel`, whatever its network family.

A model directory holds ``model_args.yaml``, optional ``stats.yaml``, weights (``model_chunk_0..9`` or one ``.pt``) and
an optional ``catalogbuilder.yaml`` (``family``, ``grid``, ``name``, ``description``, ``domain`` and family-specific
keys). Shipped names resolve to ``catalogbuilder/data/models/<name>/``.

Families register themselves: a module ``catalogbuilder/models/<module>.py`` calls ``register_family`` with one
:class:`NetworkFamily` carrying both what inference needs (its loader and its weight-free ``describe``) and what
training needs (targets, preprocessing, metadata width, grid, how to build and save the network). ``load_model``,
``describe_model`` and training import ``catalogbuilder.models.<family>`` (or, failing that, every module of the
package) until the family is known, so adding a family never edits this file, nor training.

``describe_model(name_or_dir)`` is what a client needs to plan a run (name, grid, outputs, photometry inputs, domain,
weights checksum) without loading any weights: the family's ``describe`` reads only its small configuration files and
the checksum is a streamed SHA-256 of the weight files (cached per path, size and modification time).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from catalogbuilder.config import MODEL_INFO_FILE, ConfigError, ModelInfoSettings, problem, resolve_model_dir
from catalogbuilder.constants import DEFAULT_DRAWS, GRID_SPECS, GridSpec
from catalogbuilder.store.layout import derived_grid
from catalogbuilder.models.montecarlo import NativeSpectra

_PACKAGE = "catalogbuilder.models"


class ModelInfo(ModelInfoSettings):
    """What ``catalogbuilder.yaml`` says about a model directory (defaults when the file is absent), validated by
    :class:`~catalogbuilder.config.ModelInfoSettings`, plus the directory.

    ``grid`` may be None here; the family builder then decides (BossNet: from its targets and stats). A grid other
    than the ingest grids comes with ``grid_wavelengths`` (:func:`model_grid_spec`).
    ``domain`` maps an output to its (low, high) training range in the output's units; ``extra`` holds the
    family-specific keys.
    """

    directory: Path

    @classmethod
    def read(cls, directory: str | Path) -> ModelInfo:
        """Read ``<directory>/catalogbuilder.yaml`` if present; the name defaults to the directory's basename.
        Raises :class:`~catalogbuilder.config.ConfigError` naming the file, key and value of every problem (a name
        that is not one safe folder name, a domain bound that is not [low, high], ...)."""
        directory = Path(directory).resolve()
        settings = ModelInfoSettings.read(directory)
        return cls.model_validate({**settings.model_dump(), "directory": directory})


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """A model as a client plans with it, read without loading weights (:func:`describe_model`).

    ``grid``: ``apogee``/``optical``, None for photometric models; ``outputs``: canonical names (``teff`` K, ``logg``
    dex, ``fe_h`` dex, ``rv`` km/s); ``photometry_keys``: per-spectrum inputs read from a photometry table (empty when
    ``needs_photometry`` is False); ``domain``: output → (low, high) of the training labels; ``weights_sha256``: SHA-256
    of the weight file bytes (equal to a loaded model's)."""

    name: str
    family: str
    grid: str | None
    outputs: tuple[str, ...]
    needs_photometry: bool
    photometry_keys: tuple[str, ...]
    domain: dict[str, tuple[float, float]]
    weights_sha256: str
    directory: Path

    @functools.cached_property
    def grid_spec(self) -> GridSpec | None:
        """The wavelengths of :attr:`grid` (:func:`model_grid_spec`); None for photometric models."""
        return model_grid_spec(ModelInfo.read(self.directory), self.grid)


def model_grid_spec(info: ModelInfo, grid: str | None) -> GridSpec | None:
    """The :class:`~catalogbuilder.constants.GridSpec` a model predicts on: an ingest grid by name, or the model's own
    grid (``grid`` + ``grid_wavelengths`` of its ``catalogbuilder.yaml``, filled in a store by ``store regrid``)."""
    if grid is None or grid in GRID_SPECS:
        return None if grid is None else GRID_SPECS[grid]
    if info.grid != grid or info.grid_wavelengths is None:
        raise ConfigError([problem(info.directory / MODEL_INFO_FILE, "grid", grid,
                                   f"one of {', '.join(GRID_SPECS)}, or a grid described by grid_wavelengths")])
    return derived_grid(grid, **info.grid_wavelengths.model_dump())


class SpectralModel(abc.ABC):
    """A loaded model of any family (docs/ARCHITECTURE.md).

    Attributes: ``name``, ``family``, ``grid`` (``apogee``/``optical`` or the model's own grid; None for photometric
    models) and ``grid_spec`` (its wavelengths, :func:`model_grid_spec`), ``weights_sha256``, ``outputs`` (canonical names: ``teff`` K, ``logg`` dex, ``fe_h`` dex, ``rv`` km/s),
    ``needs_photometry``, ``info`` (the :class:`ModelInfo`), ``device``.
    """

    needs_photometry: ClassVar[bool] = False

    def __init__(self, info: ModelInfo, grid: str | None, weights_sha256: str, outputs: Sequence[str],
                 device: torch.device) -> None:
        self.info = info
        self.name = info.name
        self.family = info.family
        self.grid = grid
        self.grid_spec = model_grid_spec(info, grid)
        self.weights_sha256 = weights_sha256
        self.outputs = tuple(outputs)
        self.device = device

    @abc.abstractmethod
    def predict(self, flux: np.ndarray | None, error: np.ndarray | None, draws: int = DEFAULT_DRAWS,
                seeds: Sequence[int] | np.ndarray | None = None,
                photometry: dict[str, np.ndarray] | None = None, native: NativeSpectra | None = None,
                noise_on_grid: bool = False) -> dict[str, np.ndarray]:
        """Per spectrum: every output, ``raw_e_<output>`` (std over draws; NaN when draws=0), ``noiseless_<output>``
        (prediction of the grid flux without noise; equal to the output when draws=0), and the same three for
        ``logteff``. ``flux``/``error`` are (spectra, pixels) on the model grid; ``seeds`` one int per spectrum.
        ``native``: the same spectra on their native pixels, where the noise is drawn; optical-grid models refuse
        draws without it unless ``noise_on_grid=True`` (noise on the resampled grid, other statistics)."""

    def outside_domain(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """True per spectrum where a predicted output with a ``domain`` range lies outside it (NaN is not judged
        here: it is a missing result). All False for models without a domain."""
        n_rows = len(next(iter(values.values()))) if values else 0
        outside = np.zeros(n_rows, dtype=bool)
        for output, (low, high) in self.info.domain.items():
            if output in values:
                predicted = np.asarray(values[output], dtype=float)
                outside |= (predicted < low) | (predicted > high)
        return outside

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, grid={self.grid!r}, "
                f"weights_sha256={self.weights_sha256[:16]!r}…, outputs={self.outputs}, device={str(self.device)!r})")


FamilyBuilder = Callable[..., SpectralModel]
"""``builder(info: ModelInfo, device: torch.device, **options) -> SpectralModel``."""
FamilyDescriber = Callable[[ModelInfo], ModelSummary]
"""``describe(info: ModelInfo) -> ModelSummary`` from the directory's small files only (no weights loaded)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A network family with its constructor arguments (``model_args.yaml``): what training builds and saves.

    ``targets``: network outputs in order (the ``stats.yaml`` keys the family's loader de-normalises with);
    ``build()``: a fresh untrained network; ``write_args(directory)``: writes ``model_args.yaml``.
    """

    family: NetworkFamily
    arguments: Any
    targets: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def preprocess(self) -> Callable[[torch.Tensor | np.ndarray], torch.Tensor]:
        return self.family.preprocess  # type: ignore[return-value]

    @property
    def metadata_width(self) -> int:
        return self.family.metadata_width

    @property
    def grid(self) -> str | None:
        return self.family.grid

    def build(self) -> torch.nn.Module:
        return self.family.build(self.arguments)  # type: ignore[misc]

    def write_args(self, directory: str | Path) -> None:
        self.family.write_args(self.arguments, Path(directory))  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class NetworkFamily:
    """Everything the pipeline knows about one network family, declared once next to its network.

    Inference: ``load(info, device, **options) -> SpectralModel`` and ``describe(info) -> ModelSummary`` (from the
    small files only; None: :func:`describe_model` loads the model on the CPU). Training from spectra on a model grid (None for a
    family trained otherwise, e.g. the photometric MLP): ``read_args(model_args.yaml or None) -> arguments``,
    ``build(arguments) -> nn.Module``, ``targets(arguments) -> output names``, ``write_args(arguments, directory)``,
    ``preprocess`` (flux rows on the model grid → network input, the same function inference applies),
    ``metadata_width`` (extra per-spectrum inputs, Net II photometry: 7) and ``grid`` (the only grid it runs on, None:
    any).
    """

    name: str
    load: FamilyBuilder
    describe: FamilyDescriber | None = None
    read_args: Callable[[Path | None], Any] | None = None
    build: Callable[[Any], torch.nn.Module] | None = None
    targets: Callable[[Any], tuple[str, ...]] | None = None
    write_args: Callable[[Any, Path], None] | None = None
    preprocess: Callable[[torch.Tensor | np.ndarray], torch.Tensor] | None = None
    metadata_width: int = 0
    grid: str | None = None

    @property
    def trains_on_spectra(self) -> bool:
        """True when ``catalogbuilder train`` can train this family from spectra (every training fact is declared)."""
        return None not in (self.read_args, self.build, self.targets, self.write_args, self.preprocess)

    def architecture(self, config_path: str | Path | None = None) -> Architecture:
        """The family with the constructor arguments of ``config_path`` (``model_args.yaml``; None: the family's
        defaults where it has them). ``ValueError`` for a family that does not train on spectra."""
        if not self.trains_on_spectra:
            raise ValueError(f"the {self.name} family is not trained from spectra")
        path = None if config_path is None else Path(config_path)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"config {path} not found")
        return self.with_arguments(self.read_args(path))  # type: ignore[misc]

    def with_arguments(self, arguments: Any) -> Architecture:
        """The family with already parsed constructor arguments (e.g. a ``BossNetConfig``)."""
        if not self.trains_on_spectra:
            raise ValueError(f"the {self.name} family is not trained from spectra")
        return Architecture(self, arguments, tuple(self.targets(arguments)))  # type: ignore[misc]


_FAMILIES: dict[str, NetworkFamily] = {}


def register_family(family: NetworkFamily | str) -> Any:
    """Register a :class:`NetworkFamily`. With a name instead, returns a decorator registering a load-only family
    whose ``load`` is the decorated builder. A second, different registration of a name raises ``ValueError``."""
    if isinstance(family, str):
        def decorate(builder: FamilyBuilder) -> FamilyBuilder:
            register_family(NetworkFamily(family, builder))
            return builder

        return decorate
    known = _FAMILIES.get(family.name)
    if known is not None and known != family:
        raise ValueError(f"model family {family.name!r} is already registered by {known.load!r}")
    _FAMILIES[family.name] = family
    return family


def _package_modules() -> list[str]:
    """Names of the modules of ``catalogbuilder.models`` (where families live)."""
    return sorted(module.name for module in pkgutil.iter_modules(importlib.import_module(_PACKAGE).__path__))


def network_family(name: str, source: Path | None = None) -> NetworkFamily:
    """The registered family ``name``: tries module ``catalogbuilder.models.<name>`` first, then every module;
    ConfigError naming ``source`` (the model's catalogbuilder.yaml) for an unknown family."""
    for module_name in [name, *_package_modules()]:
        if name in _FAMILIES:
            break
        try:
            importlib.import_module(f"{_PACKAGE}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{_PACKAGE}.{module_name}":
                raise
    if name not in _FAMILIES:
        raise ConfigError([problem(source or "model info", "family", name, f"one of {', '.join(sorted(_FAMILIES))}")])
    return _FAMILIES[name]


def registered_families(trains_on_spectra: bool = False) -> list[str]:
    """Names of every registered family (imports every module of ``catalogbuilder.models``); with
    ``trains_on_spectra`` only those ``catalogbuilder train`` trains from spectra."""
    for module_name in _package_modules():
        importlib.import_module(f"{_PACKAGE}.{module_name}")
    return sorted(name for name, family in _FAMILIES.items() if family.trains_on_spectra or not trains_on_spectra)


def load_model(name_or_dir: str | Path, device: str | torch.device = "cpu", **options: Any) -> SpectralModel:
    """Load a model by shipped name or directory onto ``device``; ``options`` go to the family builder
    (BossNet: ``max_batch``, ``autocast_dtype``, ``compile``)."""
    info = ModelInfo.read(resolve_model_dir(name_or_dir))
    return network_family(info.family, info.directory / MODEL_INFO_FILE).load(info, torch.device(device), **options)


def describe_model(name_or_dir: str | Path) -> ModelSummary:
    """The :class:`ModelSummary` of a shipped model name or model directory, without loading its weights.

    Raises like :func:`load_model` for an unknown name, a missing directory or unreadable configuration files; weights
    that are missing raise :class:`~catalogbuilder.models.weights.WeightsError` (their contents are checked only when
    a worker loads them)."""
    info = ModelInfo.read(resolve_model_dir(name_or_dir))
    family = network_family(info.family, info.directory / MODEL_INFO_FILE)
    if family.describe is not None:
        return family.describe(info)
    model = load_model(info.directory)
    return ModelSummary(model.name, model.family, model.grid, tuple(model.outputs), bool(model.needs_photometry),
                        tuple(getattr(model, "photometry_keys", ())), dict(info.domain), model.weights_sha256,
                        info.directory)
