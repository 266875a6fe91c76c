"""Spectral models: the BossNet family (APOGEE Net III, BOSS Net), the official weight format, reference preprocessing,
Monte-Carlo uncertainties and the registry ``load_model(name_or_dir)`` that other families plug into (docs/models.md)."""
from catalogbuilder.models.bossnet import BossNet, BossNetConfig, BossNetModel
from catalogbuilder.models.montecarlo import cap_errors, canonical_outputs, monte_carlo_predict, spectrum_seed
from catalogbuilder.models.preprocess import load_label_stats, log_scale_flux, unnormalize
from catalogbuilder.models.registry import (ModelInfo, ModelSummary, SpectralModel, describe_model, load_model,
                                            register_family, registered_families)
from catalogbuilder.models.weights import WeightsError, load_state_dict, save_state_dict

__all__ = [
    "BossNet",
    "BossNetConfig",
    "BossNetModel",
    "ModelInfo",
    "ModelSummary",
    "SpectralModel",
    "WeightsError",
    "canonical_outputs",
    "cap_errors",
    "describe_model",
    "load_label_stats",
    "load_model",
    "load_state_dict",
    "log_scale_flux",
    "monte_carlo_predict",
    "register_family",
    "registered_families",
    "save_state_dict",
    "spectrum_seed",
    "unnormalize",
]
