"""Train the Survey-of-Surveys photometric MLP on APOKASC × Gaia DR2 (the shipped ``sos-photometric-demo``).

Training set: the APOKASC catalogue (ASPCAP labels, 2MASS and SDSS magnitudes) joined within 1″ to the astroNN
APOGEE DR14 × Gaia DR2 table (parallax, its error, G). Labels are the calibrated ``CORR_ASPCAP`` Teff, log g, [M/H]
where APOKASC gives them (giants) and the raw ``FIT_ASPCAP`` values otherwise (dwarfs/subgiants); stars flagged
``STAR_BAD`` or without labels are left out. [M/H] stands in for [Fe/H]. The split is by star, deterministic on
the SHA-1 of the 2MASS id: 10 % test, 10 % validation, 80 % training (as the paper).

Per target (one network each): standardised target, AdamW, mean absolute error for the first phase, then SMAPE for
the second (the paper's schedule), run by the one training loop :func:`catalogbuilder.training.train.fit`. SMAPE is computed on the target mapped affinely to [1, 2] over the training
range, because it is undefined around zero and [Fe/H] crosses zero. Early stopping on the validation MAE.
Augmentation: each training star appears ``augment_copies`` more times with every input column (each band, the
parallax) independently blanked with probability ``band_dropout``, so the network learns to use partial photometry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from catalogbuilder.models.photometric import (
    PARALLAX, PARALLAX_ERROR, TARGETS, FeatureScaler, PhotometricConfig, PhotometricModel, build_networks,
    photometric_features,
)
from catalogbuilder.photometric.table import join_by_position, read_astronn_gaia, read_photometric_table
from catalogbuilder.tables import as_measured
from catalogbuilder.training.train import Batch, LossFunction, Phase, fit, masked_weighted, masked_weighted_mae

log = logging.getLogger(__name__)

DEMO_BANDS: tuple[str, ...] = ("sdss_g", "sdss_r", "sdss_i", "sdss_z", "tmass_j", "tmass_h", "tmass_k", "phot_g_mean_mag")
APOKASC_LABELS: dict[str, tuple[str, str]] = {  # target -> (calibrated column, raw-fit column)
    "teff": ("CORR_ASPCAP TEFF", "FIT_ASPCAP TEFF"),
    "logg": ("CORR_ASPCAP LOGG", "FIT_ASPCAP LOGG"),
    "fe_h": ("CORR_ASPCAP METALS", "FIT_ASPCAP METALS"),
}
SMAPE_EPSILON = 1e-3  # the paper's ε


@dataclasses.dataclass
class TrainingSettings:
    """Hyper-parameters of :func:`train_model` (defaults: the shipped demo model, a few CPU minutes)."""

    bands: tuple[str, ...] = DEMO_BANDS
    use_gspphot: bool = False
    epochs_mae: int = 120
    epochs_smape: int = 40
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    patience: int = 30
    augment_copies: int = 3
    band_dropout: float = 0.15
    seed: int = 20240601
    threads: int = 1


def split_of(object_id: str) -> str:
    """``train``/``val``/``test`` from the SHA-1 of the star id: stable across runs, machines and row order."""
    bucket = int(hashlib.sha1(object_id.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def load_apokasc_training_set(apokasc_path: str | Path, gaia_path: str | Path, radius_arcsec: float = 1.0) -> pd.DataFrame:
    """APOKASC stars with canonical photometry, Gaia DR2 parallax/G joined by position, labels and split."""
    frame = read_photometric_table(apokasc_path)
    frame = join_by_position(frame, read_astronn_gaia(gaia_path), [PARALLAX, PARALLAX_ERROR, "phot_g_mean_mag"], radius_arcsec)
    for target, (calibrated, fitted) in APOKASC_LABELS.items():
        corr = pd.Series(as_measured(frame[calibrated]), index=frame.index)
        fit = pd.Series(as_measured(frame[fitted]), index=frame.index)
        frame[target] = corr.fillna(fit)
        frame[f"{target}_label_source"] = np.where(corr.notna(), "corr", np.where(fit.notna(), "fit", "none"))
    bad = frame["ASPCAPFLAGS"].astype(str).str.contains("STAR_BAD")
    has_labels = frame[list(TARGETS)].notna().all(axis=1)
    frame = frame[~bad & has_labels].reset_index(drop=True)
    frame["split"] = [split_of(object_id) for object_id in frame["object_id"]]
    return frame


def _blank_inputs(frame: pd.DataFrame, bands: tuple[str, ...], probability: float, rng: np.random.Generator) -> pd.DataFrame:
    """A copy with each band (and the parallax) blanked to NaN independently per row with ``probability``."""
    out = frame.copy()
    for column in (*bands, PARALLAX):
        if column in out.columns:
            out[column] = out[column].mask(rng.random(len(out)) < probability)
    return out


class TableBatches:
    """Mini-batches of one table split for :func:`~catalogbuilder.training.train.fit`: inputs (N, features) → one
    z-scored target (N,), weight 1. With ``augment`` (training) a fresh shuffle from ``generator`` per epoch and
    batches of ``batch_size``; otherwise the whole split as one batch."""

    def __init__(self, inputs: np.ndarray, target: np.ndarray, batch_size: int,
                 generator: torch.Generator | None = None) -> None:
        self.inputs = torch.as_tensor(np.array(inputs, dtype=np.float32))
        self.target = torch.as_tensor(np.array(target, dtype=np.float32))[:, None]
        self.batch_size = batch_size
        self.generator = generator

    def batches(self, epoch: int, augment: bool) -> Iterator[Batch]:
        if not augment:
            yield Batch((self.inputs,), self.target, torch.ones(len(self.target)))
            return
        order = torch.randperm(len(self.target), generator=self.generator)
        for start in range(0, len(order) - 1, self.batch_size):
            index = order[start:start + self.batch_size]
            yield Batch((self.inputs[index],), self.target[index], torch.ones(len(index)))


def smape_on(low: float, high: float) -> LossFunction:
    """SMAPE (the paper's, ε = :data:`SMAPE_EPSILON`) of z-scored targets mapped affinely from [low, high] (the training
    range) to [1, 2]: SMAPE is undefined around zero, and [Fe/H] crosses zero."""

    def to_positive(z: torch.Tensor) -> torch.Tensor:
        return 1.0 + (z - low) / (high - low)

    return masked_weighted(lambda prediction, target: 2.0 * (to_positive(prediction) - to_positive(target)).abs()
                           / (to_positive(prediction).abs() + to_positive(target).abs() + SMAPE_EPSILON))


def _fit_network(network: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 settings: TrainingSettings, generator: torch.Generator) -> dict:
    """Train one per-target network in place (z-scored targets) with the paper's schedule — MAE, then SMAPE at a
    quarter of the learning rate, AdamW with cosine annealing in each phase — through the one training loop
    :func:`~catalogbuilder.training.train.fit`, early stopping on the validation MAE; returns the history summary."""

    def adamw(parameters: Iterable[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=settings.weight_decay)

    schedule = [
        Phase(settings.epochs_mae, masked_weighted_mae, settings.learning_rate, adamw, cosine=True, name="mae"),
        Phase(settings.epochs_smape, smape_on(float(y_train.min()), float(y_train.max())), settings.learning_rate / 4,
              adamw, cosine=True, name="smape"),
    ]
    history = fit(network, TableBatches(x_train, y_train, settings.batch_size, generator),
                  TableBatches(x_val, y_val, len(y_val)), patience=settings.patience, progress=False,
                  schedule=schedule, validation_loss=masked_weighted_mae, min_improvement=1e-5)
    return {"best_val_mae_z": history.best_val_loss, "epochs_run": len(history.val_loss) - 1}


def scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Bias, scatter (std) and MAD (×1.4826, as the paper) of prediction − truth."""
    residual = prediction - truth
    median = float(np.median(residual))
    return {"mean": float(np.mean(residual)), "median": median, "std": float(np.std(residual)),
            "mad": float(1.4826 * np.median(np.abs(residual - median))), "n": int(len(residual))}


def train_model(training_set: pd.DataFrame, name: str, settings: TrainingSettings | None = None) -> tuple[PhotometricModel, dict]:
    """Train the three networks on the ``train`` split, early-stop on ``val``; score ``test`` vs a mean baseline."""
    settings = settings or TrainingSettings()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    parts = {split: training_set[training_set["split"] == split].reset_index(drop=True) for split in ("train", "val", "test")}
    augmented = pd.concat([parts["train"]] + [_blank_inputs(parts["train"], settings.bands, settings.band_dropout, rng)
                                               for _ in range(settings.augment_copies)], ignore_index=True)
    scaler = FeatureScaler.fit(photometric_features(parts["train"], settings.bands, settings.use_gspphot))
    config = PhotometricConfig(
        name=name, bands=list(settings.bands), use_gspphot=settings.use_gspphot,
        feature_mean=scaler.mean.tolist(), feature_std=scaler.std.tolist(),
        target_mean={t: float(parts["train"][t].mean()) for t in TARGETS},
        target_std={t: float(parts["train"][t].std()) for t in TARGETS},
        dropout=settings.dropout,
    )
    networks = build_networks(config)
    model = PhotometricModel(config, networks, weights_sha256="")
    x_train, x_val = model.network_inputs(augmented), model.network_inputs(parts["val"])
    summary: dict = {"settings": dataclasses.asdict(settings), "n": {k: len(v) for k, v in parts.items()}, "targets": {}}
    for target in TARGETS:
        z = lambda frame: ((frame[target] - config.target_mean[target]) / config.target_std[target]).to_numpy()  # noqa: E731
        log.info("training %s on %d rows (%d stars)", target, len(x_train), len(parts["train"]))
        summary["targets"][target] = _fit_network(networks[target], x_train, z(augmented), x_val, z(parts["val"]), settings, generator)
    networks.eval()
    predicted = model.predict(photometry=parts["test"], draws=0)
    for target in TARGETS:
        truth = parts["test"][target].to_numpy()
        baseline = np.full(len(truth), config.target_mean[target])
        summary["targets"][target]["test"] = scores(predicted[target], truth)
        summary["targets"][target]["test_baseline_mean"] = scores(baseline, truth)
    config.training = json.loads(json.dumps(summary))
    return model, summary


def train_demo(apokasc_path: str | Path, gaia_path: str | Path, out_dir: str | Path, name: str = "sos-photometric-demo",
               settings: TrainingSettings | None = None) -> dict:
    """Build the APOKASC × Gaia set, train, save the model directory and ``metrics.json``; returns the metrics."""
    training_set = load_apokasc_training_set(apokasc_path, gaia_path)
    model, summary = train_model(training_set, name, settings)
    model.config.training["data"] = {"apokasc": Path(apokasc_path).name, "gaia": Path(gaia_path).name}
    out_dir = Path(out_dir)
    model.save(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(model.config.training, indent=2) + "\n")
    write_model_card(out_dir, model)
    return model.config.training


PAPER_SCATTER: dict[str, float] = {"teff": 85.0, "logg": 0.14, "fe_h": 0.12}  # Turchi et al. 2024, Table 2 (St.Dev)
PAPER_MAD: dict[str, float] = {"teff": 70.5, "logg": 0.086, "fe_h": 0.083}


def write_model_card(out_dir: str | Path, model: PhotometricModel) -> Path:
    """``MODEL_CARD.md`` of a trained model directory, written from its recorded training metrics."""
    metrics = model.config.training
    units = {"teff": "K", "logg": "dex", "fe_h": "dex"}
    fmt = {"teff": "{:.1f}", "logg": "{:.3f}", "fe_h": "{:.3f}"}
    lines = [
        f"# {model.name}",
        "",
        "Survey-of-Surveys-style photometric MLP (Turchi et al. 2024): one diamond network (18 hidden dense blocks,",
        "80-160 wide, LeakyReLU + BatchNorm + Dropout) per target, trained with `catalogbuilder photometric-train`.",
        "",
        f"* Inputs: bands {', '.join(model.config.bands)}, parallax and parallax S/N; colours of consecutive bands and",
        "  absolute magnitudes derived from them; missing values → training mean + missing indicator (docs/other_models.md).",
        f"* Training data: {metrics.get('data', {}).get('apokasc', 'APOKASC')} joined within 1 arcsec to "
        f"{metrics.get('data', {}).get('gaia', 'Gaia DR2')}; labels CORR_ASPCAP (FIT_ASPCAP where no calibrated value),",
        "  STAR_BAD dropped; [M/H] used as [Fe/H]. Split by star (SHA-1 of the 2MASS id): "
        + ", ".join(f"{k} {v}" for k, v in metrics["n"].items()) + " stars.",
        "* Loss: MAE, then SMAPE on targets mapped to [1, 2]; AdamW; early stopping on validation MAE; band-dropout"
        " augmentation.",
        f"* Weights: `weights.pt`, sha256 `{model.weights_sha256}`.",
        "",
        "## Held-out test split (prediction − label)",
        "",
        "| target | std | MAD (×1.4826) | bias (median) | baseline std (predict the mean) | baseline MAD | paper std | paper MAD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        test, base = metrics["targets"][target]["test"], metrics["targets"][target]["test_baseline_mean"]
        f = fmt[target].format
        lines.append(f"| {target} ({units[target]}) | {f(test['std'])} | {f(test['mad'])} | {f(test['median'])} | "
                     f"{f(base['std'])} | {f(base['mad'])} | {f(PAPER_SCATTER[target])} | {f(PAPER_MAD[target])} |")
    lines += [
        "",
        "The paper's numbers come from ~600 000 stars with SkyMapper photometry, Bailer-Jones distances and GSP-Phot;",
        "this model sees ~1800 Kepler-field stars (mostly red giants) with SDSS griz, 2MASS, Gaia DR2 G and parallax,",
        "so its domain is narrow: see docs/other_models.md (Limits). It is a demonstration, not a survey product.",
        "",
    ]
    path = Path(out_dir) / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
