"""Spectral models: the BossNet family (APOGEE Net III, BOSS Net), the official weight format, reference preprocessing,
Monte-Carlo uncertainties and the registry ``load_model(name_or_dir)`` that other families plug into (docs/models.md).

The names below are imported on first use (PEP 562): importing a torch-free module of this package
(:mod:`~catalogbuilder.models.weight_files`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "BossNet": "bossnet",
    "BossNetConfig": "bossnet",
    "BossNetModel": "bossnet",
    "ModelInfo": "registry",
    "ModelSummary": "registry",
    "SpectralModel": "registry",
    "WeightsError": "weight_files",
    "canonical_outputs": "montecarlo",
    "cap_errors": "montecarlo",
    "describe_model": "registry",
    "load_label_stats": "preprocess",
    "load_model": "registry",
    "load_state_dict": "weights",
    "log_scale_flux": "preprocess",
    "monte_carlo_predict": "montecarlo",
    "register_family": "registry",
    "registered_families": "registry",
    "save_state_dict": "weights",
    "spectrum_seed": "montecarlo",
    "unnormalize": "preprocess",
}


def __getattr__(name: str) -> Any:
    """The names of :data:`__all__` from the modules that define them."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_MODULE_OF)
