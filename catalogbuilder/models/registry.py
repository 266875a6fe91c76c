"""Model registry: ``load_model(name_or_dir)`` → a :class:`SpectralModel`, whatever its network family.

A model directory holds ``model_args.yaml``, optional ``stats.yaml``, weights (``model_chunk_0..9`` or one ``.pt``) and
an optional ``catalogbuilder.yaml`` (``family``, ``grid``, ``name``, ``description``, ``domain`` and family-specific
keys). Shipped names resolve to ``catalogbuilder/data/models/<name>/``.

Families register themselves: a module ``catalogbuilder/models/<module>.py`` decorates its builder with
``@register_family("<family>")``. ``load_model`` imports ``catalogbuilder.models.<family>`` (or, failing that, every
module of the package) until the family is known, so adding a family never edits this file.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml

from catalogbuilder.constants import DEFAULT_DRAWS

MODEL_INFO_FILE = "catalogbuilder.yaml"
DEFAULT_FAMILY = "bossnet"
_PACKAGE = "catalogbuilder.models"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ``catalogbuilder.yaml`` says about a model directory (defaults when the file is absent).

    ``grid`` may be None here; the family builder then decides (BossNet: from its targets and stats).
    ``extra`` holds family-specific keys.
    """

    directory: Path
    name: str
    family: str = DEFAULT_FAMILY
    grid: str | None = None
    description: str = ""
    domain: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # output -> (low, high), units of the output
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, directory: str | Path) -> ModelInfo:
        """Read ``<directory>/catalogbuilder.yaml`` if present; the name defaults to the directory's basename."""
        directory = Path(directory).resolve()
        info_path = directory / MODEL_INFO_FILE
        fields: dict[str, Any] = {}
        if info_path.exists():
            with open(info_path) as handle:
                fields = yaml.safe_load(handle) or {}
            if not isinstance(fields, dict):
                raise ValueError(f"{info_path}: expected a mapping")
        known = {"name", "family", "grid", "description", "domain"}
        return cls(
            directory=directory,
            name=str(fields.get("name") or directory.name),
            family=str(fields.get("family") or DEFAULT_FAMILY),
            grid=fields.get("grid"),
            description=str(fields.get("description") or ""),
            domain=parse_domain(fields.get("domain"), info_path),
            extra={key: value for key, value in fields.items() if key not in known},
        )


def parse_domain(domain: Any, source: Path) -> dict[str, tuple[float, float]]:
    """The ``domain`` of ``catalogbuilder.yaml``: a mapping output name (teff K, logg, fe_h, rv) → [low, high], the range
    of the training labels; predictions outside it are flagged RESULT_UNRELIABLE by the release stage."""
    if not domain:
        return {}
    if not isinstance(domain, dict):
        raise ValueError(f"{source}: domain must map outputs to [low, high], e.g. {{teff: [4200, 7000]}}; got {domain!r}")
    parsed = {}
    for output, bounds in domain.items():
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and float(bounds[0]) < float(bounds[1])):
            raise ValueError(f"{source}: domain.{output} must be [low, high] with low < high; got {bounds!r}")
        parsed[str(output)] = (float(bounds[0]), float(bounds[1]))
    return parsed


class SpectralModel(abc.ABC):
    """A loaded model of any family (docs/ARCHITECTURE.md).

    Attributes: ``name``, ``family``, ``grid`` (``apogee``/``optical``; None for photometric models),
    ``weights_sha256``, ``outputs`` (canonical names: ``teff`` K, ``logg`` dex, ``fe_h`` dex, ``rv`` km/s),
    ``needs_photometry``, ``info`` (the :class:`ModelInfo`), ``device``.
    """

    needs_photometry: ClassVar[bool] = False

    def __init__(self, info: ModelInfo, grid: str | None, weights_sha256: str, outputs: Sequence[str],
                 device: torch.device) -> None:
        self.info = info
        self.name = info.name
        self.family = info.family
        self.grid = grid
        self.weights_sha256 = weights_sha256
        self.outputs = tuple(outputs)
        self.device = device

    @abc.abstractmethod
    def predict(self, flux: np.ndarray | None, error: np.ndarray | None, draws: int = DEFAULT_DRAWS,
                seeds: Sequence[int] | np.ndarray | None = None,
                photometry: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Per spectrum: every output, ``raw_e_<output>`` (std over draws; NaN when draws=0), ``logteff`` and
        ``raw_e_logteff``. ``flux``/``error`` are (spectra, pixels) on the model grid; ``seeds`` one int per spectrum."""

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

_FAMILIES: dict[str, FamilyBuilder] = {}


def register_family(family: str) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator registering ``builder`` as the loader of model directories whose family is ``family``."""

    def decorate(builder: FamilyBuilder) -> FamilyBuilder:
        if family in _FAMILIES and _FAMILIES[family] is not builder:
            raise ValueError(f"model family {family!r} is already registered by {_FAMILIES[family]!r}")
        _FAMILIES[family] = builder
        return builder

    return decorate


def _package_modules() -> list[str]:
    """Names of the modules of ``catalogbuilder.models`` (where families live)."""
    return sorted(module.name for module in pkgutil.iter_modules(importlib.import_module(_PACKAGE).__path__))


def _family_builder(family: str) -> FamilyBuilder:
    """The registered builder of ``family``: tries module ``<family>`` first, then every module of the package."""
    for module_name in [family, *_package_modules()]:
        if family in _FAMILIES:
            break
        try:
            importlib.import_module(f"{_PACKAGE}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{_PACKAGE}.{module_name}":
                raise
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; registered families: {sorted(_FAMILIES)}")
    return _FAMILIES[family]


def registered_families() -> list[str]:
    """Names of every registered family (imports every module of ``catalogbuilder.models``)."""
    for module_name in _package_modules():
        importlib.import_module(f"{_PACKAGE}.{module_name}")
    return sorted(_FAMILIES)


def shipped_models() -> list[str]:
    """Names of the models shipped in ``catalogbuilder/data/models/``."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(path.name for path in SHIPPED_MODELS_DIR.iterdir() if (path / "model_args.yaml").exists()
                  or (path / MODEL_INFO_FILE).exists())


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A model directory from a path, or from the name of a shipped model."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path.resolve()
    shipped = SHIPPED_MODELS_DIR / str(name_or_dir)
    if shipped.is_dir():
        return shipped
    raise FileNotFoundError(f"no model directory {str(name_or_dir)!r} and no shipped model of that name "
                            f"(shipped: {shipped_models() or 'none'})")


def load_model(name_or_dir: str | Path, device: str | torch.device = "cpu", **options: Any) -> SpectralModel:
    """Load a model by shipped name or directory onto ``device``; ``options`` go to the family builder
    (BossNet: ``max_batch``, ``autocast_dtype``, ``compile``)."""
    info = ModelInfo.read(resolve_model_dir(name_or_dir))
    return _family_builder(info.family)(info, torch.device(device), **options)
