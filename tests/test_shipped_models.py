"""The shipped demo models: they load by name like official weights, are small, document a machine-readable domain,
and predict finite values on the shipped sample spectra; the anet3 model reproduces its model card's validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from catalogbuilder.models.registry import SHIPPED_MODELS_DIR, load_model
from catalogbuilder.models.weights import find_weights
from catalogbuilder.readers import read_spectra
from catalogbuilder.store.resample import to_model_grid
from catalogbuilder.training.data import join_labels, read_label_table

SAMPLE = Path(__file__).resolve().parents[1] / "catalogbuilder" / "data" / "sample"
SHIPPED = {"bossnet-lamost-demo": "optical", "anet3-payne-demo": "apogee"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _info(name: str) -> dict:
    return yaml.safe_load((SHIPPED_MODELS_DIR / name / "catalogbuilder.yaml").read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_by_name_with_its_recorded_checksum(name: str) -> None:
    model = load_model(name)
    info = _info(name)
    assert model.name == name and model.family == "bossnet" and model.grid == SHIPPED[name]
    assert model.weights_sha256 == info["training"]["weights_sha256"]
    size = sum(path.stat().st_size for path in find_weights(SHIPPED_MODELS_DIR / name))
    assert size < 1_000_000, f"{name} weights are {size} bytes; shipped demo models must stay small"
    assert (SHIPPED_MODELS_DIR / name / "MODEL_CARD.md").read_text().count(info["training"]["weights_sha256"]) == 1
    for label, bounds in info["domain"].items():
        assert label in ("teff", "logg", "fe_h") and len(bounds) == 2 and bounds[0] < bounds[1]


def test_lamost_demo_predicts_finite_values_on_sample_optical_spectra() -> None:
    files = sorted((SAMPLE / "lamost").rglob("spec-*.fits*")) + sorted((SAMPLE / "boss").glob("spec-*.fits"))
    spectra = [spectrum for path in files for spectrum in read_spectra(path)]
    grids = [to_model_grid(spectrum) for spectrum in spectra]
    flux, error = np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids])
    model = load_model("bossnet-lamost-demo")
    result = model.predict(flux, error, draws=5, seeds=list(range(len(flux))))
    for name in ("teff", "logg", "fe_h", "rv", "raw_e_teff"):
        assert np.isfinite(result[name]).all(), name
    assert np.all((result["teff"] > 2500) & (result["teff"] < 20000))
    assert np.all((result["logg"] > -1) & (result["logg"] < 7))
    assert np.all(result["raw_e_teff"] > 0)


def test_lamost_demo_orders_its_sample_stars_by_teff() -> None:
    """The 8 DR1 sample stars (mostly training stars of the demo model) span 3972–8403 K in LASP Teff; the model must
    order them: a rank correlation that an untrained or broken network would not reach."""
    files = sorted((SAMPLE / "lamost" / "dr1").glob("spec-*.fits"))
    coords = pd.DataFrame({"source_id": [""] * len(files), "file_path": [str(path) for path in files]})
    labels = join_labels(coords, read_label_table(SAMPLE / "lamost" / "dr1" / "lasp_labels.csv"), {"teff": "teff"},
                         "file")
    flux = np.stack([to_model_grid(read_spectra(path)[0])[0] for path in files])
    predicted = load_model("bossnet-lamost-demo").predict(flux, None, draws=0)["teff"]
    assert spearmanr(predicted, labels["teff"]).statistic > 0.7


def test_anet3_demo_reproduces_its_validation_on_the_sample_apstar() -> None:
    info = _info("anet3-payne-demo")
    row0 = read_spectra(SAMPLE / "apogee" / "apStar-dr17-2M19485057+5005279.fits")[0]
    result = load_model("anet3-payne-demo").predict(row0.flux[None, :], row0.error[None, :], draws=20,
                                                    seeds=[info["training"]["seed"]])
    for name in ("teff", "logg", "fe_h"):
        assert np.isfinite(result[name][0]) and np.isfinite(result[f"raw_e_{name}"][0])
        assert result[name][0] == pytest.approx(info["validation"]["predicted"][name], rel=1e-3, abs=1e-3)
    domain = info["domain"]
    assert domain["teff"][0] <= info["validation"]["reference"]["teff"] <= domain["teff"][1]
