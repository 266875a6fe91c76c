"""Training report: loss curves and test-set residuals per parameter (JSON + PNG)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:  # the loss record train.fit returns; train imports this module (no circle at run time)
    from catalogbuilder.training.train import History

UNITS: dict[str, str] = {"teff": "K", "logg": "dex", "fe_h": "dex", "rv": "km/s"}


def residual_metrics(
    predicted: Mapping[str, np.ndarray], truth: pd.DataFrame | Mapping[str, np.ndarray], baseline: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Per parameter over the finite (prediction, label) pairs: ``n``, ``bias`` (mean of predicted − label), ``rms``,
    ``mad_std`` (1.4826 × median |residual − median|), and ``baseline_rms``: the RMS of always predicting
    ``baseline[param]`` (the training-set mean), the yardstick a model must beat."""
    metrics: dict[str, dict[str, float]] = {}
    for name, values in predicted.items():
        label = np.asarray(truth[name], dtype=float)
        values = np.asarray(values, dtype=float)
        usable = np.isfinite(label) & np.isfinite(values)
        residual = values[usable] - label[usable]
        if residual.size == 0:
            continue
        metrics[name] = {
            "n": int(residual.size),
            "bias": float(residual.mean()),
            "rms": float(np.sqrt(np.mean(residual**2))),
            "mad_std": float(1.4826 * np.median(np.abs(residual - np.median(residual)))),
            "baseline_rms": float(np.sqrt(np.mean((baseline[name] - label[usable]) ** 2))),
        }
    return metrics


def plot_loss_curves(history: History, path: str | Path) -> None:
    """PNG of training and validation loss per epoch, the best (restored) epoch marked."""
    epochs = np.arange(len(history.val_loss))
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs[1:], history.train_loss[1:], label="train (augmented)")
    axis.plot(epochs, history.val_loss, label="validation")
    axis.axvline(history.best_epoch, color="grey", linestyle=":", label=f"best epoch {history.best_epoch}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("weighted masked MSE (z-score units)")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_residuals(predicted: Mapping[str, np.ndarray], truth: pd.DataFrame | Mapping[str, np.ndarray],
                   path: str | Path, title: str = "test set") -> None:
    """PNG with one panel per parameter: predicted vs label, the one-to-one line and the RMS in the title."""
    names = [name for name in predicted if np.isfinite(np.asarray(truth[name], dtype=float)).any()]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        label = np.asarray(truth[name], dtype=float)
        values = np.asarray(predicted[name], dtype=float)
        usable = np.isfinite(label) & np.isfinite(values)
        axis.scatter(label[usable], values[usable], s=12)
        low, high = np.nanmin([label[usable], values[usable]]), np.nanmax([label[usable], values[usable]])
        axis.plot([low, high], [low, high], color="grey", linewidth=1)
        rms = np.sqrt(np.mean((values[usable] - label[usable]) ** 2))
        unit = UNITS.get(name, "")
        axis.set_title(f"{name}: RMS {rms:.3g} {unit} (n={usable.sum()})")
        axis.set_xlabel(f"label {name} [{unit}]")
        axis.set_ylabel(f"predicted {name} [{unit}]")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(out_dir: str | Path, history: History, predicted: Mapping[str, np.ndarray],
                 truth: pd.DataFrame | Mapping[str, np.ndarray], metrics: Mapping[str, Mapping[str, float]],
                 extra: Mapping[str, object] | None = None) -> Path:
    """Write ``loss_curves.png``, ``test_residuals.png`` and ``report.json`` (history, metrics, ``extra``) into
    ``out_dir``; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(history, out_dir / "loss_curves.png")
    if metrics:
        plot_residuals(predicted, truth, out_dir / "test_residuals.png")
    content = {"history": history.to_dict(), "test_metrics": dict(metrics), **dict(extra or {})}
    (out_dir / "report.json").write_text(json.dumps(content, indent=2, default=float))
    return out_dir


def plot_kiel(truth: pd.DataFrame | Mapping[str, np.ndarray], predicted: Mapping[str, np.ndarray], path: str | Path,
              marked: Mapping[str, tuple[float, float]] | None = None) -> None:
    """PNG of the Teff–log g plane: left the labels, right the predictions (colour [Fe/H] of the labels), both with the
    usual reversed axes; ``marked``: name → (Teff K, log g) points drawn on the right panel (e.g. real stars)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    colour = np.asarray(truth["fe_h"], dtype=float)
    for axis, values, title in ((axes[0], truth, "labels"), (axes[1], predicted, "predicted")):
        points = axis.scatter(np.asarray(values["teff"], dtype=float), np.asarray(values["logg"], dtype=float), s=6,
                              c=colour, cmap="viridis", vmin=-2.5, vmax=0.5)
        axis.set_title(f"{title} (n={len(colour)})")
        axis.set_xlabel("Teff [K]")
    for name, (teff, logg) in (marked or {}).items():
        axes[1].scatter([teff], [logg], marker="*", s=180, color="red", edgecolor="black", zorder=3)
        axes[1].annotate(name, (teff, logg), textcoords="offset points", xytext=(6, 6), fontsize=8)
    axes[0].set_ylabel("log g [dex]")
    axes[0].invert_xaxis()
    axes[0].invert_yaxis()
    figure.colorbar(points, ax=axes, label="[Fe/H] of the label")
    figure.savefig(path, dpi=100)
    plt.close(figure)
