"""Conformance of the BossNet family with the reference implementation (../shared/conformance, see its README).

Every config folder holding ``vectors.npz`` is checked: preprocessing of the reference flux reproduces ``model_input``
(≤ 1e-5 abs), the network reproduces ``network_output`` (≤ 1e-5 × max(1, |ref|)) and the de-normalised labels reproduce
``predictions`` (≤ 1e-4 × max(1, |ref|)). The official configurations must have the reference state_dict layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catalogbuilder.constants import GRID_OPTICAL, LABEL_STATS, grid_wavelength
from catalogbuilder.models.bossnet import BossNet, BossNetConfig
from catalogbuilder.models.convolution import convolution_layers, set_convolution_mode
from catalogbuilder.models.preprocess import load_label_stats, log_scale_flux, unnormalize
from catalogbuilder.models.weights import load_state_dict
from catalogbuilder.readers.base import Spectrum
from catalogbuilder.store.resample import to_model_grid

INPUT_TOLERANCE = 1e-5
# z-scores: relative above 1 in size. The reference's own float32 output is 6.8e-6 away from a float64 evaluation on
# its largest z-score (21.56, the all-zero apStar row); torch's convolution here is 2.3e-6 away, the FFT form 4.8e-6,
# so an absolute 1e-5 would test the reference's rounding more than ours (we measured 1.14e-5 = 5.3e-7 relative).
OUTPUT_TOLERANCE = 1e-5
PREDICTION_TOLERANCE = 1e-4

OFFICIAL = {"model_apogee": "apogee", "model_boss": "boss"}  # official_shapes.json key → survey of the SDSS files


def conformance_configs(conformance_dir: Path) -> list[Path]:
    """Every reference config folder (one holding vectors.npz)."""
    configs = sorted(path.parent for path in conformance_dir.glob("*/vectors.npz"))
    assert configs, f"no */vectors.npz under {conformance_dir}"
    return configs


def reference_model_flux(vectors: np.lib.npyio.NpzFile) -> tuple[np.ndarray, np.ndarray]:
    """Reference flux and error on the model grid: APOGEE rows as read; optical rows put on the grid by the store's
    ``to_model_grid`` (reference semantics: NaN pixels and padding dropped, np.interp, edges held, float32)."""
    if "linear_grid" not in vectors.files:
        return vectors["raw_flux"], vectors["raw_error"]
    np.testing.assert_array_equal(grid_wavelength(GRID_OPTICAL), vectors["linear_grid"])
    flux, error = [], []
    for wavelength, row_flux, row_error, length in zip(vectors["raw_wavelength"], vectors["raw_flux"],
                                                        vectors["raw_error"], vectors["raw_length"]):
        spectrum = Spectrum(survey="boss", kind="combined", grid=GRID_OPTICAL, row=0, visit=0, flux=row_flux[:length],
                            error=row_error[:length], mask=np.zeros(length, np.int64), wavelength=wavelength[:length],
                            object_id="conformance", ra=np.nan, dec=np.nan, snr=np.nan, mjd=np.nan)
        grid_flux, grid_error, _ = to_model_grid(spectrum)
        flux.append(grid_flux)
        error.append(grid_error)
    return np.stack(flux), np.stack(error)


@pytest.fixture(scope="module")
def configs(conformance_dir: Path) -> list[Path]:
    return conformance_configs(conformance_dir)


@pytest.mark.parametrize("convolution", ["direct", "fft", "auto"])
def test_every_config_reproduces_reference(configs: list[Path], convolution: str) -> None:
    """With torch's convolution, with the FFT form in every layer, and with the per-layer choice by measured speed
    (whichever it picks here; tests/test_convolution.py shows it picking the FFT form)."""
    torch.set_num_threads(1)
    for config_dir in configs:
        vectors = np.load(config_dir / "vectors.npz")
        network = BossNet(BossNetConfig.from_yaml(config_dir)).eval()
        state_dict, _ = load_state_dict(config_dir)
        network.load_weights(state_dict)
        set_convolution_mode(network, convolution)

        model_input = log_scale_flux(reference_model_flux(vectors)[0])
        np.testing.assert_allclose(model_input.numpy(), vectors["model_input"], rtol=0, atol=INPUT_TOLERANCE,
                                   err_msg=f"{config_dir.name}: model_input")
        with torch.inference_mode():
            output = network(model_input)
        output_deviation = np.abs(output.numpy() - vectors["network_output"])
        assert (output_deviation <= OUTPUT_TOLERANCE * np.maximum(1.0, np.abs(vectors["network_output"]))).all(), (
            f"{config_dir.name}: network_output deviates by up to {output_deviation.max():.2e}")
        if convolution != "auto":
            assert {layer.last_implementation for layer in convolution_layers(network)} == {convolution}

        labels = [str(name) for name in vectors["param_names"]]
        predictions = unnormalize(output, labels, load_label_stats(config_dir, "apogee")).numpy()
        reference = vectors["predictions"]
        deviation = np.abs(predictions - reference) / np.maximum(1.0, np.abs(reference))
        assert deviation.max() <= PREDICTION_TOLERANCE, f"{config_dir.name}: predictions deviate by {deviation.max():.2e}"


def test_weights_checksum_is_of_concatenated_chunks(configs: list[Path]) -> None:
    import hashlib

    for config_dir in configs:
        concatenated = b"".join((config_dir / f"model_chunk_{index}").read_bytes() for index in range(10))
        _, sha256 = load_state_dict(config_dir)
        assert sha256 == hashlib.sha256(concatenated).hexdigest()


def test_official_configs_have_reference_state_dict_layout(conformance_dir: Path, shared_data: Path) -> None:
    """The official model_args.yaml files (data/weights/bossnet_stats) build networks whose state_dict keys and shapes
    equal the reference's, and the official stats.yaml files give the constants' label normalisation."""
    official = json.loads((conformance_dir / "official_shapes.json").read_text())
    assert set(official) == set(OFFICIAL)
    for name, survey in OFFICIAL.items():
        config = BossNetConfig.from_yaml(shared_data / "weights" / "bossnet_stats" / f"{name}_model_args.yaml")
        with torch.device("meta"):  # ≈290 MB each if allocated; shapes only
            network = BossNet(config)
        shapes = {key: list(value.shape) for key, value in network.state_dict().items()}
        assert list(shapes) == list(official[name]), f"{name}: key order/names differ"
        assert shapes == official[name], f"{name}: shapes differ"
        stats_file = shared_data / "weights" / "bossnet_stats" / f"stats_{survey}.yaml"
        assert load_label_stats(stats_file, survey) == LABEL_STATS[survey]


def test_mismatched_weights_are_refused(configs: list[Path]) -> None:
    apogee_dir = next(path for path in configs if BossNetConfig.from_yaml(path).num_targets == 3)
    boss_dir = next(path for path in configs if BossNetConfig.from_yaml(path).num_targets == 4)
    network = BossNet(BossNetConfig.from_yaml(apogee_dir))
    state_dict, _ = load_state_dict(boss_dir)
    with pytest.raises(ValueError, match="do not match model_args"):
        network.load_weights(state_dict)
