"""The BossNet-family networks, their official weight format, preprocessing and Monte-Carlo uncertainties."""
from catalogbuilder.models.bossnet import BossNet, BossNetConfig
from catalogbuilder.models.preprocess import load_label_stats, log_scale_flux, unnormalize
from catalogbuilder.models.weights import WeightsError, load_state_dict, save_state_dict

__all__ = [
    "BossNet",
    "BossNetConfig",
    "WeightsError",
    "load_label_stats",
    "load_state_dict",
    "log_scale_flux",
    "save_state_dict",
    "unnormalize",
]
