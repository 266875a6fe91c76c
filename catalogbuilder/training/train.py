"""Training: a generic loop over (model, batch provider), and training of the spectral families from spectra + labels.

The loop (:func:`fit`) knows nothing about spectra: a :class:`BatchProvider` yields :class:`Batch` objects
(``model(*inputs)`` vs z-scored ``targets`` with per-sample ``weights``). Loss: weighted MSE over the finite targets
only (a missing label, NaN, is masked out); optimiser Adamax; early stopping on the validation loss with ``patience``
epochs, restoring the best weights.

:func:`train_network` adds what BOSS Net does (Sizemore et al. 2024) for every spectral family — BossNet (APOGEE
Net III, BOSS Net) and APOGEE Net I/II, each described by the :class:`~catalogbuilder.models.registry.Architecture` of
its registered :class:`~catalogbuilder.models.registry.NetworkFamily` (the object inference loads it with): 80/10/10 split by star, z-score stats
from the training set, loss weights ∝ 1/KDE density in the standardised Teff–log g plane (cap 5, mean 1),
augmentation by a fresh noise draw flux + error × N(0, 1) per epoch (errors capped as in the Monte-Carlo step) before
the family's own input preprocessing, then :func:`write_model_dir` writes a directory ``load_model`` reads
(``model_args.yaml``, ``stats.yaml``, ``model_chunk_0..9``, ``catalogbuilder.yaml``) and a training report.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from catalogbuilder import __version__
from catalogbuilder.models import apogeenet
from catalogbuilder.models.bossnet import BossNetConfig
from catalogbuilder.models.montecarlo import canonical_outputs, cap_errors
from catalogbuilder.models.preprocess import log_scale_flux, unnormalize
from catalogbuilder.models.registry import MODEL_INFO_FILE, Architecture, network_family
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


LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(prediction (B, T), target (B, T) with NaN = missing, weight (B,)) -> scalar``."""


def masked_weighted(elementwise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFunction:
    """The loss Σ_i w_i Σ_t m_it e(p_it, y_it) / Σ_it m_it of an elementwise error e, m = isfinite(y): NaN targets
    contribute nothing. It is 0 (with a gradient path) when no target of the batch is finite."""

    def loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        mask = torch.isfinite(target)
        error = torch.where(mask, elementwise(prediction, torch.nan_to_num(target)), torch.zeros_like(prediction))
        return (error.sum(dim=1) * weight).sum() / mask.sum().clamp(min=1)

    return loss


masked_weighted_mse: LossFunction = masked_weighted(lambda prediction, target: (prediction - target) ** 2)
masked_weighted_mae: LossFunction = masked_weighted(lambda prediction, target: (prediction - target).abs())


def adamax(parameters: Iterable[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """Adamax, the optimiser of the BossNet family's training."""
    return torch.optim.Adamax(parameters, lr=learning_rate)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a training schedule: ``epochs`` at most, its ``loss``, a fresh ``optimiser(parameters,
    learning_rate)`` and, with ``cosine``, the learning rate annealed to 0 over the phase (stepped per epoch)."""

    epochs: int
    loss: LossFunction = masked_weighted_mse
    learning_rate: float = DEFAULT_LEARNING_RATE
    optimiser: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] = adamax
    cosine: bool = False
    name: str = "train"


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


def evaluate_loss(model: nn.Module, provider: BatchProvider, device: torch.device,
                  loss: LossFunction = masked_weighted_mse) -> float:
    """Mean ``loss`` per finite target over every batch of ``provider`` (no augmentation, model in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in provider.batches(epoch=0, augment=False):
            inputs = tuple(tensor.to(device) for tensor in batch.inputs)
            prediction = model(*inputs)
            n_finite = int(torch.isfinite(batch.targets).sum())
            total += float(loss(prediction, batch.targets.to(device), batch.weights.to(device))) * n_finite
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
    schedule: Sequence[Phase] | None = None,
    validation_loss: LossFunction = masked_weighted_mse,
    min_improvement: float = 0.0,
) -> History:
    """The one training loop: train ``model`` through the phases of ``schedule`` (default: one phase of ``epochs``
    with the masked weighted MSE and Adamax at ``learning_rate``), early stopping on ``validation_loss``.

    A phase ends after ``patience`` epochs without a validation loss lower than the best so far by more than
    ``min_improvement``; the next phase starts from the current weights with a fresh optimiser. The model ends holding
    the weights of the best trained epoch (≥ 1, in eval mode). The loss before training is recorded as epoch 0 but
    never chosen: an untrained network is no result.
    """
    schedule = list(schedule) if schedule is not None else [Phase(epochs, learning_rate=learning_rate)]
    if patience < 1 or not schedule or min(phase.epochs for phase in schedule) < 1:
        raise ValueError(f"every phase needs >= 1 epoch and patience must be >= 1, got "
                         f"{[phase.epochs for phase in schedule]} and {patience}")
    device = torch.device(device)
    model.to(device)
    history = History()
    history.val_loss.append(evaluate_loss(model, validation, device, validation_loss))
    history.train_loss.append(math.nan)
    history.seconds.append(0.0)
    best_state = copy.deepcopy(model.state_dict())
    epoch = 0
    bar = tqdm(total=sum(phase.epochs for phase in schedule), desc="training", unit="epoch", disable=not progress)
    for phase in schedule:
        optimiser = phase.optimiser(model.parameters(), phase.learning_rate)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=phase.epochs) if phase.cosine else None
        phase_start = epoch
        for _ in range(phase.epochs):
            epoch += 1
            start = time.perf_counter()
            history.train_loss.append(_train_epoch(model, train, epoch, optimiser, phase.loss, device))
            if scheduler is not None:
                scheduler.step()
            history.val_loss.append(evaluate_loss(model, validation, device, validation_loss))
            history.seconds.append(time.perf_counter() - start)
            if epoch == 1 or history.val_loss[-1] < history.best_val_loss - min_improvement:
                history.best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.update()
            bar.set_postfix(phase=phase.name, train=f"{history.train_loss[-1]:.4f}", val=f"{history.val_loss[-1]:.4f}",
                            best=history.best_epoch)
            log.info("epoch %d (%s): train loss %.4f, validation loss %.4f (%.0f s)", epoch, phase.name,
                      history.train_loss[-1], history.val_loss[-1], history.seconds[-1])
            if epoch - max(history.best_epoch, phase_start) >= patience:
                history.stopped_early = True
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return history


def _train_epoch(model: nn.Module, train: BatchProvider, epoch: int, optimiser: torch.optim.Optimizer,
                 loss_function: LossFunction, device: torch.device) -> float:
    """One pass over ``train``'s augmented batches; returns the mean loss per finite target."""
    model.train()
    total, count = 0.0, 0
    for batch in train.batches(epoch=epoch, augment=True):
        if len(batch.weights) < 2:  # BatchNorm cannot train on a single sample
            continue
        inputs = tuple(tensor.to(device) for tensor in batch.inputs)
        loss = loss_function(model(*inputs), batch.targets.to(device), batch.weights.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        n_finite = int(torch.isfinite(batch.targets).sum())
        total += float(loss.detach()) * n_finite
        count += n_finite
    return total / count if count else math.nan


class SpectraBatches:
    """Batches from spectra on a model grid: the family's network input [+ ``metadata``] → z-scored targets.

    flux, error: (N, pixels) in the store's units; targets: (N, T) z-scores (NaN = missing); weights: (N,);
    ``preprocess``: the family's input transform (default the BossNet log scaling); ``metadata``: (N, k) extra inputs
    passed as the network's second argument (Net II photometry), never perturbed.
    With ``augment`` each epoch draws fresh noise flux + error × N(0, 1) (errors capped by
    :func:`catalogbuilder.models.montecarlo.cap_errors`) and shuffles; draws depend only on (seed, epoch). A small
    training set can be passed several times per epoch, each pass with its own shuffle and noise, until at least
    ``samples_per_epoch`` samples were seen — so that an epoch, and the early-stopping patience counted in epochs,
    holds enough optimiser steps.
    """

    def __init__(self, flux: np.ndarray, error: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                 batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, samples_per_epoch: int = 0,
                 preprocess: Callable[[torch.Tensor | np.ndarray], torch.Tensor] = log_scale_flux,
                 metadata: np.ndarray | None = None) -> None:
        if not (len(flux) == len(error) == len(targets) == len(weights)):
            raise ValueError("flux, error, targets and weights must have one row per spectrum")
        if metadata is not None and len(metadata) != len(flux):
            raise ValueError("metadata must have one row per spectrum")
        self.flux = torch.as_tensor(np.asarray(flux, dtype=np.float32))
        self.error = cap_errors(self.flux, torch.as_tensor(np.asarray(error, dtype=np.float32)))
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.batch_size = batch_size
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.preprocess = preprocess
        self.metadata = None if metadata is None else torch.as_tensor(np.asarray(metadata, dtype=np.float32))
        self._clean_input = preprocess(self.flux)

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
                model_input = self.preprocess(self.flux[index] + self.error[index] * noise)
            else:
                model_input = self._clean_input[index]
            inputs = (model_input,) if self.metadata is None else (model_input, self.metadata[index])
            yield Batch(inputs, self.targets[index], self.weights[index])


def predict_labels(model: nn.Module, flux: np.ndarray, targets: Sequence[str], stats: Mapping[str, tuple[float, float]],
                   device: str | torch.device = "cpu", batch_size: int = 256,
                   preprocess: Callable[[torch.Tensor | np.ndarray], torch.Tensor] = log_scale_flux,
                   metadata: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Deterministic (no noise draws) canonical predictions (``teff`` K, ``logg``, ``fe_h``[, ``rv``]) of spectra;
    ``preprocess`` and ``metadata`` as in :class:`SpectraBatches`."""
    device = torch.device(device)
    model.to(device).eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            model_input = preprocess(np.asarray(flux[start:start + batch_size], dtype=np.float32)).to(device)
            extra = () if metadata is None else (
                torch.as_tensor(np.asarray(metadata[start:start + batch_size], dtype=np.float32)).to(device),)
            outputs.append(unnormalize(model(model_input, *extra), list(targets), dict(stats)).double().cpu())
    value = torch.cat(outputs).numpy()
    result = canonical_outputs(list(targets), value, np.full_like(value, np.nan))
    return {name: result[name] for name in ("teff", "logg", "fe_h", "rv") if name in result}


@dataclasses.dataclass
class TrainedModel:
    """What :func:`train_network` produced: the network, its stats and split, the history and the test metrics."""

    model: nn.Module
    family: Architecture
    stats: dict[str, tuple[float, float]]
    history: History
    split: dict[str, np.ndarray]  # "train"/"validation"/"test" row indices into the labelled spectra
    test_metrics: dict[str, dict[str, float]]
    test_predicted: dict[str, np.ndarray]  # canonical predictions of the test rows
    test_labels: pd.DataFrame  # their canonical labels
    train_label_means: dict[str, float] = dataclasses.field(default_factory=dict)  # the predict-the-mean baseline
    weights_sha256: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """Network outputs in order (the ``stats.yaml`` keys)."""
        return self.family.targets


def rows_with_data(flux: np.ndarray, block: int = 4096) -> np.ndarray:
    """(N,) bool: which flux rows hold at least one finite non-zero value (checked in row blocks to bound memory)."""
    return np.concatenate([np.any(np.isfinite(part) & (part != 0), axis=1)
                           for part in (flux[start:start + block] for start in range(0, len(flux), block))]
                          or [np.zeros(0, dtype=bool)])


def train_network(
    family: Architecture,
    flux: np.ndarray,
    error: np.ndarray,
    source_ids: Sequence[str],
    labels: pd.DataFrame,
    metadata: np.ndarray | None = None,
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
    """Train a network of ``family`` on spectra (N, pixels) with canonical labels (DataFrame, N rows, NaN = missing).

    ``metadata``: (N, ``family.metadata_width``) normalised extra inputs (Net II: :func:`apogeenet.normalize_metadata`).
    Rows without any finite target, and spectra without any non-zero finite flux (no data: nothing to learn from), are
    left out. ``split`` (train/validation/test row indices into the inputs) defaults to :func:`data.split_by_star`
    80/10/10 with ``seed``. Seeds torch with ``seed`` before building the network. Indices in the result refer to the
    input rows. ``samples_per_epoch``: see :class:`SpectraBatches`.
    """
    if family.metadata_width and (metadata is None or np.shape(metadata) != (len(flux), family.metadata_width)):
        raise ValueError(f"{family.name} needs metadata of shape ({len(flux)}, {family.metadata_width}), "
                         f"got {None if metadata is None else np.shape(metadata)}")
    if not family.metadata_width:
        metadata = None
    targets = tdata.labels_to_targets(labels, family.targets)
    source_ids = np.asarray(source_ids, dtype=str)
    has_targets = np.isfinite(targets).any(axis=1)
    has_data = rows_with_data(flux)
    if (~has_targets).any():
        log.warning("%d spectra have none of the labels %s and are not used", int((~has_targets).sum()),
                    family.targets)
    if (has_targets & ~has_data).any():
        log.warning("%d labelled spectra hold no non-zero finite flux and are not used",
                    int((has_targets & ~has_data).sum()))
    labelled = np.flatnonzero(has_targets & has_data)
    if split is None:
        parts = tdata.split_by_star(source_ids[labelled], seed=seed)
        split = dict(zip(("train", "validation", "test"), (labelled[part] for part in parts)))
    else:
        split = {name: np.intersect1d(np.asarray(rows, dtype=int), labelled) for name, rows in split.items()}
    labels = labels.reset_index(drop=True)
    stats = tdata.fit_stats(targets[split["train"]], family.targets)
    z_scores = tdata.standardise(targets, family.targets, stats)
    train_labels = labels.iloc[split["train"]]
    weights = np.ones(len(flux))
    weights[split["train"]] = kde_weights(train_labels["teff"].to_numpy(float), train_labels["logg"].to_numpy(float))

    def provider(name: str) -> SpectraBatches:
        rows = split[name]
        return SpectraBatches(flux[rows], error[rows], z_scores[rows], weights[rows], batch_size, seed,
                              samples_per_epoch if name == "train" else 0, family.preprocess,
                              None if metadata is None else metadata[rows])

    torch.manual_seed(seed)
    model = family.build()
    log.info("training %s on %d spectra (%d stars), validating on %d, testing on %d", family.name,
             len(split["train"]), len(np.unique(source_ids[split["train"]])), len(split["validation"]),
             len(split["test"]))
    history = fit(model, provider("train"), provider("validation"), epochs, patience, learning_rate, device, progress)
    test_rows = split["test"]
    metrics: dict[str, dict[str, float]] = {}
    predicted: dict[str, np.ndarray] = {}
    train_mean = {name: float(np.nanmean(train_labels[name])) for name in tdata.CANONICAL_LABELS
                  if name in train_labels and np.isfinite(train_labels[name]).any()}
    if len(test_rows):
        from catalogbuilder.training.report import residual_metrics

        predicted = predict_labels(model, flux[test_rows], family.targets, stats, device,
                                   preprocess=family.preprocess,
                                   metadata=None if metadata is None else metadata[test_rows])
        metrics = residual_metrics(predicted, labels.iloc[test_rows], train_mean)
    return TrainedModel(model, family, stats, history, split, metrics, predicted,
                        labels.iloc[test_rows].reset_index(drop=True), train_mean)


def train_bossnet(flux: np.ndarray, error: np.ndarray, source_ids: Sequence[str], labels: pd.DataFrame,
                  config: BossNetConfig, **training: Any) -> TrainedModel:
    """:func:`train_network` for a BossNet-family model of ``config`` (``training``: its keyword arguments)."""
    return train_network(network_family("bossnet").with_arguments(config), flux, error, source_ids, labels, **training)


def write_model_dir(
    trained: TrainedModel,
    out_dir: str | Path,
    grid: str,
    name: str,
    description: str = "",
    domain: Mapping[str, Sequence[float]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write a model directory ``load_model`` reads: ``model_args.yaml`` (the family's architecture arguments),
    ``stats.yaml`` (z-score constants keyed by the family's output names, in output order), ``model_chunk_0..9`` (the
    official chunked state_dict) and ``catalogbuilder.yaml`` (family, grid, name, description, domain, training
    provenance); returns weights_sha256."""
    if trained.family.grid is not None and grid != trained.family.grid:
        raise ValueError(f"{trained.family.name} models run on the {trained.family.grid!r} grid, not {grid!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.family.write_args(out_dir)
    tdata.write_stats_yaml(out_dir / "stats.yaml", trained.stats)
    sha256 = save_state_dict(trained.model.state_dict(), out_dir)
    trained.weights_sha256 = sha256
    info: dict[str, Any] = {"family": trained.family.name, "grid": grid, "name": name, "description": description}
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
        "train_label_means": trained.train_label_means,
        "test_metrics": trained.test_metrics,
        **dict(provenance or {}),
    }
    (out_dir / MODEL_INFO_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(info)), sort_keys=False))
    return sha256


SPECTRUM_KINDS: tuple[str, ...] = ("all", "combined", "visit")


def load_store_spectra(store_path: str | Path, grid: str | None = None,
                       kind: str = "all") -> tuple[str, np.ndarray, np.ndarray, pd.DataFrame]:
    """(grid, flux, error, per-spectrum columns) of the active spectra of a store, loaded into memory.

    ``grid`` None picks the store's only non-empty grid (``ValueError`` when it holds both). ``kind`` keeps
    ``combined`` or ``visit`` spectra only (apStar row 1 is never used). Non-finite flux/error are kept:
    preprocessing floors them. The columns are ``spectrum_id, source_id, file_path, kind`` plus the file headers'
    2MASS ``tmass_j/h/k`` (mag).
    """
    from catalogbuilder.constants import PREDICTED_KINDS
    from catalogbuilder.inference.photometry import HEADER_KEYS
    from catalogbuilder.store import SpectrumStore

    if kind not in SPECTRUM_KINDS:
        raise ValueError(f"kind must be one of {SPECTRUM_KINDS}, got {kind!r}")
    store = SpectrumStore.open(store_path)
    if grid is None:
        present = store.grids()
        if len(present) != 1:
            raise ValueError(f"store {store_path} holds grids {present}; choose one with --grid")
        grid = present[0]
    columns = store.columns(grid, ("spectrum_id", "source_id", "file_path", "kind", "active", *HEADER_KEYS))
    keep = columns["active"].astype(bool) & columns["kind"].isin(PREDICTED_KINDS if kind == "all" else (kind,))
    if not keep.any():
        raise ValueError(f"store {store_path} holds no active {kind} spectra on the {grid!r} grid")
    pixels = store.pixels(grid, np.flatnonzero(keep.to_numpy()))
    coords = columns.loc[keep].drop(columns="active").reset_index(drop=True)
    return grid, pixels["flux"].astype(np.float32), pixels["error"].astype(np.float32), coords


def store_metadata(photometry: str | Path | None, coords: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """APOGEE Net II inputs of the spectra ``coords`` (from :func:`load_store_spectra`), exactly as inference builds
    them: the photometry table's value (Parquet with ``spectrum_id`` + the crossmatch columns) where finite, else the
    file header's 2MASS J/H/K, then :func:`apogeenet.normalize_metadata` (missing → the reference replacement values).
    Returns the (N, 7) normalised metadata and the (N,) ``missing_photometry`` mask."""
    from catalogbuilder.inference import photometry as phot

    keys = apogeenet.METADATA_KEYS
    path = None if photometry is None else phot.check_photometry_table(photometry, keys)
    header = coords[[key for key in phot.HEADER_KEYS if key in coords]].reset_index(drop=True)
    inputs = phot.gather_inputs(path, coords["spectrum_id"].to_numpy(str), header, keys)
    return apogeenet.normalize_metadata({key: inputs[key].to_numpy() for key in keys}, len(coords))


def train_from_store(
    store_path: str | Path,
    labels_path: str | Path,
    config_path: str | Path | None,
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
    family: str = "bossnet",
    photometry: str | Path | None = None,
    **training: Any,
) -> TrainedModel:
    """The ``catalogbuilder train`` command: store spectra ⋈ label table → trained model directory + report.

    ``family``: a family that trains on spectra (``registered_families(trains_on_spectra=True)``); ``config_path``: its
    ``model_args.yaml`` (required for bossnet; APOGEE Net may only set dropout). ``photometry``: for
    ``apogeenet2``, the crossmatch Parquet table (see :func:`store_metadata`; None: header 2MASS only, Gaia imputed).
    ``training`` goes to :func:`train_network` (epochs, seed, device, batch_size, samples_per_epoch, learning_rate,
    patience, progress); ``extra_provenance`` entries are added to (or replace) the recorded training provenance.
    Spectra without a matching label row are left out (counted in the provenance); the star of a spectrum for the
    split is its ``source_id``. Every input is checked before training starts, and nothing is written on bad input.
    """
    spec = network_family(family).architecture(config_path)
    if photometry is not None and not spec.metadata_width:
        raise ValueError(f"the {family} family reads no photometry; drop --photometry")
    grid, flux, error, coords = load_store_spectra(store_path, grid or spec.grid, kind)
    if spec.grid is not None and grid != spec.grid:
        raise ValueError(f"{family} models run on the {spec.grid!r} grid, not {grid!r}")
    metadata, missing_photometry = store_metadata(photometry, coords) if spec.metadata_width else (None, None)
    labels = tdata.join_labels(coords, tdata.read_label_table(labels_path), label_columns, join_on, key_column)
    matched = labels["matched"].to_numpy()
    if not matched.any():
        raise ValueError(f"no spectrum of {store_path} matched a row of {labels_path} (join on {join_on})")
    trained = train_network(spec, flux[matched], error[matched], coords["source_id"].to_numpy(str)[matched],
                            labels.loc[matched].reset_index(drop=True),
                            None if metadata is None else metadata[matched], **training)
    out_dir = Path(out_dir)
    provenance = {
        "store": str(Path(store_path).resolve()),
        "labels": str(Path(labels_path).resolve()),
        "label_columns": dict(label_columns),
        "join_on": join_on,
        "spectra_in_store": int(len(coords)),
        "spectra_matched": int(matched.sum()),
        "seed": int(training.get("seed", 0)),
    }
    if spec.metadata_width:
        provenance["photometry"] = str(Path(photometry).resolve()) if photometry is not None else "store header 2MASS"
        provenance["spectra_missing_photometry"] = int(missing_photometry[matched].sum())
    provenance.update(extra_provenance or {})
    write_trained(trained, out_dir, grid, name or out_dir.name, description, domain, provenance)
    return trained


def write_trained(trained: TrainedModel, out_dir: Path, grid: str, name: str, description: str,
                  domain: Mapping[str, Sequence[float]] | None, provenance: Mapping[str, Any]) -> None:
    """:func:`write_model_dir` plus the training report (loss curves, test residuals, report.json) in
    ``out_dir/training_report``."""
    from catalogbuilder.training.report import write_report

    write_model_dir(trained, out_dir, grid, name, description, domain, provenance)
    write_report(out_dir / "training_report", trained.history, trained.test_predicted, trained.test_labels,
                 trained.test_metrics, {"provenance": dict(provenance), "weights_sha256": trained.weights_sha256})


DOMAIN_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")


def label_domain(labels: pd.DataFrame, names: Sequence[str] = DOMAIN_LABELS) -> dict[str, tuple[float, float]]:
    """[min, max] of each label over ``labels`` (the training split): the model's ``domain``."""
    return {name: (float(np.nanmin(labels[name])), float(np.nanmax(labels[name]))) for name in names
            if np.isfinite(labels[name]).any()}


def train_from_set(
    set_path: str | Path,
    config_path: str | Path | None,
    out_dir: str | Path,
    family: str = "bossnet",
    name: str | None = None,
    description: str = "",
    extra_provenance: Mapping[str, Any] | None = None,
    **training: Any,
) -> TrainedModel:
    """``catalogbuilder train --training-set``: a saved :class:`~catalogbuilder.training.sources.TrainingSet` (spectra
    on a model grid, labels and a fixed train/validation/test split) → trained model directory + report.

    The split of the set is used as it is (its test rows never reach training or early stopping); the ``domain``
    written to ``catalogbuilder.yaml`` is the label range of the training split. ``training`` as in
    :func:`train_from_store` (families with metadata inputs cannot train from a set: it holds no photometry).
    """
    from catalogbuilder.training.sources import TrainingSet

    spec = network_family(family).architecture(config_path)
    if spec.metadata_width:
        raise ValueError(f"the {family} family needs photometry inputs, which a training set does not hold; "
                         "train it from a store with --photometry")
    training_set = TrainingSet.load(set_path)
    if spec.grid is not None and training_set.grid != spec.grid:
        raise ValueError(f"{family} models run on the {spec.grid!r} grid, not {training_set.grid!r}")
    split = training_set.split_indices()
    trained = train_network(spec, training_set.flux, training_set.error, training_set.source_id,
                            training_set.labels, split=split, **training)
    out_dir = Path(out_dir)
    provenance = {
        "training_set": str(Path(set_path).resolve()),
        "training_set_description": training_set.description,
        "spectra_per_split_and_origin": training_set.counts(),
        "seed": int(training.get("seed", 0)),
    }
    provenance.update(extra_provenance or {})
    domain = label_domain(training_set.labels.iloc[trained.split["train"]])
    write_trained(trained, out_dir, training_set.grid, name or out_dir.name, description, domain, provenance)
    return trained
