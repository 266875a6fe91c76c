"""Training: a generic loop over (model, batch provider), and BossNet-family training from spectra + labels.

The loop (:func:`fit`) knows nothing about spectra: a :class:`BatchProvider` yields :class:`Batch` objects
(``model(*inputs)`` vs z-scored ``targets`` with per-sample ``weights``), so other families (APOGEE Net I/II with
photometry, the photometric MLP) reuse it with their own provider. Loss: weighted MSE over the finite targets only
(a missing label, NaN, is masked out); optimiser Adamax; early stopping on the validation loss with ``patience``
epochs, restoring the best weights.

:func:`train_bossnet` adds what BOSS Net does (Sizemore et al. 2024): 80/10/10 split by star, z-score stats from the
training set, loss weights ∝ 1/KDE density in the standardised Teff–log g plane (cap 5, mean 1), augmentation by a
fresh noise draw flux + error × N(0, 1) per epoch (errors capped as in the Monte-Carlo step), then writes the model
in the official format (``model_args.yaml``, ``stats.yaml``, ``model_chunk_0..9``) plus ``catalogbuilder.yaml`` and
a training report.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from catalogbuilder import __version__
from catalogbuilder.models.bossnet import BossNet, BossNetConfig
from catalogbuilder.models.montecarlo import canonical_outputs, cap_errors
from catalogbuilder.models.preprocess import log_scale_flux, unnormalize
from catalogbuilder.models.registry import MODEL_INFO_FILE
from catalogbuilder.models.weights import save_state_dict
from catalogbuilder.training import data as tdata
from catalogbuilder.training.kde import kde_weights

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 100
DEFAULT_PATIENCE = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 2e-3  # Adamax's default; BOSS Net used 1e-4 with batches of 512 on ~10^5 spectra


@dataclasses.dataclass
class Batch:
    """One mini-batch: network inputs (``model(*inputs)``), z-scored targets (B, T) with NaN = missing, weights (B,)."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    weights: torch.Tensor


class BatchProvider(Protocol):
    """Yields the mini-batches of one pass over a data split; ``augment`` asks for training-time augmentation."""

    def batches(self, epoch: int, augment: bool) -> Iterator[Batch]: ...


def masked_weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_t m_it (p_it − y_it)² / Σ_it m_it with m = isfinite(y): NaN targets contribute nothing.

    Returns 0 (with a gradient path) when no target of the batch is finite.
    """
    mask = torch.isfinite(target)
    residual = torch.where(mask, prediction - torch.nan_to_num(target), torch.zeros_like(prediction))
    weighted = (residual**2).sum(dim=1) * weight
    return weighted.sum() / mask.sum().clamp(min=1)


@dataclasses.dataclass
class History:
    """Per-epoch losses of a :func:`fit` run; epoch 0 holds the validation loss before any training."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def initial_val_loss(self) -> float:
        return self.val_loss[0]

    @property
    def best_val_loss(self) -> float:
        return self.val_loss[self.best_epoch]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "initial_val_loss": self.initial_val_loss, "best_val_loss": self.best_val_loss}


def evaluate_loss(model: nn.Module, provider: BatchProvider, device: torch.device) -> float:
    """Mean masked weighted MSE over every batch of ``provider`` (no augmentation, model in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in provider.batches(epoch=0, augment=False):
            inputs = tuple(tensor.to(device) for tensor in batch.inputs)
            prediction = model(*inputs)
            n_finite = int(torch.isfinite(batch.targets).sum())
            loss = masked_weighted_mse(prediction, batch.targets.to(device), batch.weights.to(device))
            total += float(loss) * n_finite
            count += n_finite
    return total / count if count else math.nan


def fit(
    model: nn.Module,
    train: BatchProvider,
    validation: BatchProvider,
    epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> History:
    """Train ``model`` with Adamax on the masked weighted MSE; stop after ``patience`` epochs without a lower validation
    loss and leave the model holding the weights of the best trained epoch (≥ 1, in eval mode). The loss before
    training is recorded as epoch 0 but never chosen: an untrained network is no result."""
    if epochs < 1 or patience < 1:
        raise ValueError(f"epochs and patience must be >= 1, got {epochs} and {patience}")
    device = torch.device(device)
    model.to(device)
    optimiser = torch.optim.Adamax(model.parameters(), lr=learning_rate)
    history = History()
    history.val_loss.append(evaluate_loss(model, validation, device))
    history.train_loss.append(math.nan)
    history.seconds.append(0.0)
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for batch in train.batches(epoch=epoch, augment=True):
            if len(batch.weights) < 2:  # BatchNorm cannot train on a single sample
                continue
            inputs = tuple(tensor.to(device) for tensor in batch.inputs)
            loss = masked_weighted_mse(model(*inputs), batch.targets.to(device), batch.weights.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            n_finite = int(torch.isfinite(batch.targets).sum())
            total += float(loss.detach()) * n_finite
            count += n_finite
        history.train_loss.append(total / count if count else math.nan)
        history.val_loss.append(evaluate_loss(model, validation, device))
        history.seconds.append(time.perf_counter() - start)
        if epoch == 1 or history.val_loss[-1] < history.best_val_loss:
            history.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(train=f"{history.train_loss[-1]:.4f}", val=f"{history.val_loss[-1]:.4f}",
                        best=history.best_epoch)
        log.debug("epoch %d: train loss %.4f, validation loss %.4f (%.0f s)", epoch, history.train_loss[-1],
                  history.val_loss[-1], history.seconds[-1])
        if epoch - history.best_epoch >= patience:
            history.stopped_early = True
            break
    model.load_state_dict(best_state)
    model.eval()
    return history


class SpectraBatches:
    """BossNet-family batches from spectra on a model grid: preprocessed flux → z-scored targets.

    flux, error: (N, pixels) in the store's units; targets: (N, T) z-scores (NaN = missing); weights: (N,).
    With ``augment`` each epoch draws fresh noise flux + error × N(0, 1) (errors capped by
    :func:`catalogbuilder.models.montecarlo.cap_errors`) and shuffles; draws depend only on (seed, epoch). A small
    training set can be passed several times per epoch, each pass with its own shuffle and noise, until at least
    ``samples_per_epoch`` samples were seen — so that an epoch, and the early-stopping patience counted in epochs,
    holds enough optimiser steps.
    """

    def __init__(self, flux: np.ndarray, error: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                 batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, samples_per_epoch: int = 0) -> None:
        if not (len(flux) == len(error) == len(targets) == len(weights)):
            raise ValueError("flux, error, targets and weights must have one row per spectrum")
        self.flux = torch.as_tensor(np.asarray(flux, dtype=np.float32))
        self.error = cap_errors(self.flux, torch.as_tensor(np.asarray(error, dtype=np.float32)))
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.batch_size = batch_size
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self._clean_input = log_scale_flux(self.flux)

    def __len__(self) -> int:
        return len(self.flux)

    def batches(self, epoch: int, augment: bool) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if augment:
            passes = max(1, -(-self.samples_per_epoch // max(1, len(self))))
            order = torch.cat([torch.randperm(len(self), generator=generator) for _ in range(passes)])
        else:
            order = torch.arange(len(self))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if augment:
                noise = torch.randn(self.flux[index].shape, generator=generator)
                model_input = log_scale_flux(self.flux[index] + self.error[index] * noise)
            else:
                model_input = self._clean_input[index]
            yield Batch((model_input,), self.targets[index], self.weights[index])


def predict_labels(model: BossNet, flux: np.ndarray, targets: Sequence[str], stats: Mapping[str, tuple[float, float]],
                   device: str | torch.device = "cpu", batch_size: int = 256) -> dict[str, np.ndarray]:
    """Deterministic (no noise draws) canonical predictions (``teff`` K, ``logg``, ``fe_h``[, ``rv``]) of spectra."""
    device = torch.device(device)
    model.to(device).eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            model_input = log_scale_flux(np.asarray(flux[start:start + batch_size], dtype=np.float32)).to(device)
            outputs.append(unnormalize(model(model_input), list(targets), dict(stats)).double().cpu())
    value = torch.cat(outputs).numpy()
    result = canonical_outputs(list(targets), value, np.full_like(value, np.nan))
    return {name: result[name] for name in ("teff", "logg", "fe_h", "rv") if name in result}


@dataclasses.dataclass
class TrainedModel:
    """What :func:`train_bossnet` produced: the network, its stats and split, the history and the test metrics."""

    model: BossNet
    targets: tuple[str, ...]
    stats: dict[str, tuple[float, float]]
    history: History
    split: dict[str, np.ndarray]  # "train"/"validation"/"test" row indices into the labelled spectra
    test_metrics: dict[str, dict[str, float]]
    test_predicted: dict[str, np.ndarray]  # canonical predictions of the test rows
    test_labels: pd.DataFrame  # their canonical labels
    weights_sha256: str | None = None


def train_bossnet(
    flux: np.ndarray,
    error: np.ndarray,
    source_ids: Sequence[str],
    labels: pd.DataFrame,
    config: BossNetConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    patience: int = DEFAULT_PATIENCE,
    split: Mapping[str, np.ndarray] | None = None,
    samples_per_epoch: int = 0,
    progress: bool = True,
) -> TrainedModel:
    """Train a BossNet-family model on spectra (N, pixels) with canonical labels (DataFrame, N rows, NaN = missing).

    Rows without any finite target are left out. ``split`` (train/validation/test row indices into the inputs)
    defaults to :func:`data.split_by_star` 80/10/10 with ``seed``. Seeds torch with ``seed`` before building the
    network. Indices in the result refer to the input rows. ``samples_per_epoch``: see :class:`SpectraBatches`.
    """
    targets_names = tdata.bossnet_targets(config.num_targets)
    targets = tdata.labels_to_targets(labels, targets_names)
    source_ids = np.asarray(source_ids, dtype=str)
    labelled = np.flatnonzero(np.isfinite(targets).any(axis=1))
    if len(labelled) < len(targets):
        log.warning("%d spectra have none of the labels %s and are not used", len(targets) - len(labelled),
                    targets_names)
    if split is None:
        parts = tdata.split_by_star(source_ids[labelled], seed=seed)
        split = dict(zip(("train", "validation", "test"), (labelled[part] for part in parts)))
    else:
        split = {name: np.intersect1d(np.asarray(rows, dtype=int), labelled) for name, rows in split.items()}
    labels = labels.reset_index(drop=True)
    stats = tdata.fit_stats(targets[split["train"]], targets_names)
    z_scores = tdata.standardise(targets, targets_names, stats)
    train_labels = labels.iloc[split["train"]]
    weights = np.ones(len(flux))
    weights[split["train"]] = kde_weights(train_labels["teff"].to_numpy(float), train_labels["logg"].to_numpy(float))

    def provider(name: str) -> SpectraBatches:
        rows = split[name]
        return SpectraBatches(flux[rows], error[rows], z_scores[rows], weights[rows], batch_size, seed,
                              samples_per_epoch if name == "train" else 0)

    torch.manual_seed(seed)
    model = BossNet(config)
    log.info("training on %d spectra (%d stars), validating on %d, testing on %d", len(split["train"]),
             len(np.unique(source_ids[split["train"]])), len(split["validation"]), len(split["test"]))
    history = fit(model, provider("train"), provider("validation"), epochs, patience, learning_rate, device, progress)
    test_rows = split["test"]
    metrics: dict[str, dict[str, float]] = {}
    predicted: dict[str, np.ndarray] = {}
    if len(test_rows):
        from catalogbuilder.training.report import residual_metrics

        predicted = predict_labels(model, flux[test_rows], targets_names, stats, device)
        train_mean = {name: float(np.nanmean(train_labels[name])) for name in predicted}
        metrics = residual_metrics(predicted, labels.iloc[test_rows], train_mean)
    return TrainedModel(model, targets_names, stats, history, split, metrics, predicted,
                        labels.iloc[test_rows].reset_index(drop=True))


def write_model_dir(
    trained: TrainedModel,
    out_dir: str | Path,
    grid: str,
    name: str,
    description: str = "",
    domain: Mapping[str, Sequence[float]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write the official-format model directory (``model_args.yaml``, ``stats.yaml``, ``model_chunk_0..9``) plus
    ``catalogbuilder.yaml`` (family, grid, name, description, domain, training provenance); returns weights_sha256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.model.config.to_yaml(out_dir)
    tdata.write_stats_yaml(out_dir / "stats.yaml", trained.stats)
    sha256 = save_state_dict(trained.model.state_dict(), out_dir)
    trained.weights_sha256 = sha256
    info: dict[str, Any] = {"family": "bossnet", "grid": grid, "name": name, "description": description}
    if domain:
        info["domain"] = {key: [float(low), float(high)] for key, (low, high) in domain.items()}
    info["training"] = {
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": sha256,
        "targets": list(trained.targets),
        "n_train": int(len(trained.split["train"])),
        "n_validation": int(len(trained.split["validation"])),
        "n_test": int(len(trained.split["test"])),
        "best_epoch": trained.history.best_epoch,
        "epochs_run": len(trained.history.val_loss) - 1,
        "best_val_loss": trained.history.best_val_loss,
        "test_metrics": trained.test_metrics,
        **dict(provenance or {}),
    }
    (out_dir / MODEL_INFO_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(info)), sort_keys=False))
    return sha256


SPECTRUM_KINDS: tuple[str, ...] = ("all", "combined", "visit")


def load_store_spectra(store_path: str | Path, grid: str | None = None,
                       kind: str = "all") -> tuple[str, np.ndarray, np.ndarray, pd.DataFrame]:
    """(grid, flux, error, per-spectrum coordinates) of a spectrum store, loaded into memory.

    ``grid`` None picks the store's only non-empty grid (``ValueError`` when it holds both). ``kind`` keeps
    ``combined`` or ``visit`` spectra only. Non-finite flux/error are kept: preprocessing floors them.
    """
    from catalogbuilder.constants import GRIDS
    from catalogbuilder.store.spectra import SpectrumStore

    if kind not in SPECTRUM_KINDS:
        raise ValueError(f"kind must be one of {SPECTRUM_KINDS}, got {kind!r}")
    store = SpectrumStore.open(store_path)
    if grid is None:
        present = [name for name in GRIDS if store.dataset(name) is not None]
        if len(present) != 1:
            raise ValueError(f"store {store_path} holds grids {present}; choose one with --grid")
        grid = present[0]
    dataset = store.dataset(grid)
    if dataset is None:
        raise ValueError(f"store {store_path} holds no spectra on the {grid!r} grid")
    if kind != "all":
        dataset = dataset.isel(spectrum=np.flatnonzero(dataset["kind"].values.astype(str) == kind))
    if dataset.sizes["spectrum"] == 0:
        raise ValueError(f"store {store_path} holds no {kind} spectra on the {grid!r} grid")
    coords = pd.DataFrame({name: dataset[name].values for name in ("spectrum_id", "source_id", "file_path", "kind")})
    return grid, dataset["flux"].values.astype(np.float32), dataset["error"].values.astype(np.float32), coords


def train_from_store(
    store_path: str | Path,
    labels_path: str | Path,
    config_path: str | Path,
    out_dir: str | Path,
    label_columns: Mapping[str, str],
    join_on: str = "source_id",
    key_column: str | None = None,
    grid: str | None = None,
    kind: str = "all",
    name: str | None = None,
    description: str = "",
    domain: Mapping[str, Sequence[float]] | None = None,
    extra_provenance: Mapping[str, Any] | None = None,
    **training: Any,
) -> TrainedModel:
    """The ``catalogbuilder train`` command: store spectra ⋈ label table → trained model directory + report.

    ``training`` goes to :func:`train_bossnet` (epochs, seed, device, batch_size, samples_per_epoch, learning_rate,
    patience, progress); ``extra_provenance`` entries are added to (or replace) the recorded training provenance.
    Spectra without a matching label row are left out (counted in the provenance); the star of a spectrum for the
    split is its ``source_id``.
    """
    from catalogbuilder.training.report import write_report

    config = BossNetConfig.from_yaml(config_path)
    grid, flux, error, coords = load_store_spectra(store_path, grid, kind)
    labels = tdata.join_labels(coords, tdata.read_label_table(labels_path), label_columns, join_on, key_column)
    matched = labels["matched"].to_numpy()
    if not matched.any():
        raise ValueError(f"no spectrum of {store_path} matched a row of {labels_path} (join on {join_on})")
    trained = train_bossnet(flux[matched], error[matched], coords["source_id"].to_numpy(str)[matched],
                            labels.loc[matched].reset_index(drop=True), config, **training)
    out_dir = Path(out_dir)
    provenance = {
        "store": str(Path(store_path).resolve()),
        "labels": str(Path(labels_path).resolve()),
        "label_columns": dict(label_columns),
        "join_on": join_on,
        "spectra_in_store": int(len(coords)),
        "spectra_matched": int(matched.sum()),
        "seed": int(training.get("seed", 0)),
        **dict(extra_provenance or {}),
    }
    write_model_dir(trained, out_dir, grid, name or out_dir.name, description, domain, provenance)
    write_report(out_dir / "training_report", trained.history, trained.test_predicted, trained.test_labels,
                 trained.test_metrics, {"provenance": provenance, "weights_sha256": trained.weights_sha256})
    return trained


def cross_validate(
    flux: np.ndarray,
    error: np.ndarray,
    source_ids: Sequence[str],
    labels: pd.DataFrame,
    config: BossNetConfig,
    folds: int = 5,
    seed: int = 0,
    **training: Any,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """K-fold cross-validation by star: each fold is the test set once, the other stars are split 8:1 into train and
    validation (early stopping). Returns the out-of-fold predictions of every spectrum (canonical names, NaN for rows
    without labels) and metrics against the labels, with the baseline of predicting each training fold's mean.
    ``training`` goes to :func:`train_bossnet`."""
    source_ids = np.asarray(source_ids, dtype=str)
    targets_names = tdata.bossnet_targets(config.num_targets)
    predicted = {tdata.TARGET_SOURCE[name]: np.full(len(flux), np.nan) for name in targets_names}
    baseline = {name: np.full(len(flux), np.nan) for name in predicted}
    for fold, test_rows in enumerate(tdata.kfold_by_star(source_ids, folds, seed)):
        rest = np.setdiff1d(np.arange(len(flux)), test_rows)
        train_part, val_part, _ = tdata.split_by_star(source_ids[rest], (8 / 9, 1 / 9, 0.0), seed + fold)
        split = {"train": rest[train_part], "validation": rest[val_part], "test": test_rows}
        trained = train_bossnet(flux, error, source_ids, labels, config, seed=seed + fold, split=split, **training)
        for name in predicted:
            predicted[name][trained.split["test"]] = trained.test_predicted[name]
            baseline[name][trained.split["test"]] = np.nanmean(labels[name].to_numpy(float)[split["train"]])
        log.info("fold %d/%d: best epoch %d, test %s", fold + 1, folds, trained.history.best_epoch,
                 {name: round(metric["rms"], 3) for name, metric in trained.test_metrics.items()})
    from catalogbuilder.training.report import residual_metrics

    metrics = residual_metrics(predicted, labels, {name: 0.0 for name in predicted})
    for name, metric in metrics.items():
        label = labels[name].to_numpy(float)
        usable = np.isfinite(label) & np.isfinite(predicted[name])
        metric["baseline_rms"] = float(np.sqrt(np.mean((baseline[name][usable] - label[usable]) ** 2)))
    return predicted, metrics
