"""Training stage: KDE weights, label joins, splits by star, masked loss, the training loop, the official-format output,
and the ``catalogbuilder train`` command — on real spectra and labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from catalogbuilder.cli import main as cli_main
from catalogbuilder.constants import BOSSNET_PARAMS_BOSS
from catalogbuilder.models.bossnet import BossNetConfig
from catalogbuilder.models.registry import load_model
from catalogbuilder.readers import read_spectra
from catalogbuilder.store.resample import to_model_grid
from catalogbuilder.training import data as tdata
from catalogbuilder.training.kde import kde_weights, scale_to_mean_one
from catalogbuilder.training.train import (
    Batch,
    Phase,
    SpectraBatches,
    fit,
    masked_weighted_mae,
    masked_weighted_mse,
    predict_labels,
    train_bossnet,
    write_model_dir,
)

SAMPLE_DR1 = Path(__file__).resolve().parents[1] / "catalogbuilder" / "data" / "sample" / "lamost" / "dr1"
LASP_COLUMNS = {"teff": "teff", "logg": "logg", "fe_h": "feh", "rv": "rv"}
TINY_OPTICAL = BossNetConfig(model_dim=2, dim_mults=(1, 2), kernel_size=9, num_targets=4, adapt_pool_output_dim=64,
                             num_linear=1, linear_dim=16, pos_enc=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _labelled_spectra(files: list[Path], labels_csv: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """flux, error on the optical grid, per-spectrum coordinates and LASP labels joined on file name."""
    spectra = [read_spectra(path)[0] for path in files]
    grids = [to_model_grid(spectrum) for spectrum in spectra]
    coords = pd.DataFrame({"source_id": [s.object_id for s in spectra], "file_path": [str(p) for p in files]})
    labels = tdata.join_labels(coords, tdata.read_label_table(labels_csv), LASP_COLUMNS, join_on="file")
    return np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids]), coords, labels


@pytest.fixture(scope="module")
def sample_set() -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """The 8 shipped LAMOST DR1 sample spectra with their LASP labels (no ../shared needed)."""
    return _labelled_spectra(sorted(SAMPLE_DR1.glob("spec-*.fits")), SAMPLE_DR1 / "lasp_labels.csv")


@pytest.fixture(scope="module")
def dr1_set(shared_data: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """40 labelled LAMOST DR1 spectra of the development data."""
    folder = shared_data / "lamost" / "dr1_learninglamost"
    table = pd.read_csv(folder / "my_data3_lasp_labels.csv")
    names = sorted(set(table["filename"]) & {path.name for path in folder.glob("spec-*.fits")})[:40]
    return _labelled_spectra([folder / name for name in names], folder / "my_data3_lasp_labels.csv")


# --- KDE weights ------------------------------------------------------------------------------------------------


def test_kde_weights_mean_one_and_capped_on_real_labels(shared_data: Path) -> None:
    table = pd.read_csv(shared_data / "lamost" / "dr1_learninglamost" / "my_data3_lasp_labels.csv")
    weights = kde_weights(table["teff"].to_numpy(), table["logg"].to_numpy())
    assert weights.shape == (len(table),)
    assert weights.mean() == pytest.approx(1.0, abs=1e-9)
    assert weights.max() <= 5.0 + 1e-12 and weights.min() > 0
    # the cap binds on this real Kiel diagram (isolated hot and giant stars) and the rarest star weighs most
    assert np.isclose(weights.max(), 5.0)
    dense = np.argmin(np.abs(table["teff"] - table["teff"].median()) + np.abs(table["logg"] - table["logg"].median()))
    assert weights[dense] < 1.0


def test_kde_weights_missing_labels_and_degenerate_input() -> None:
    teff = np.array([5000.0, 5100, 5200, np.nan, 6500, 4000])
    logg = np.array([4.5, 4.4, 4.6, 4.0, 2.0, np.nan])
    weights = kde_weights(teff, logg)
    assert weights[3] == 1.0 and weights[5] == 1.0
    assert weights.mean() == pytest.approx(1.0) and weights.max() <= 5.0
    assert np.all(kde_weights(np.array([5000.0, 5000.0]), np.array([4.0, 4.0])) == 1.0)
    collinear = kde_weights(np.array([4000.0, 5000, 6000, 7000]), np.array([1.0, 2, 3, 4]))
    assert np.all(collinear == 1.0)


def test_scale_to_mean_one_water_fills_under_the_cap() -> None:
    raw = np.array([1.0] * 9 + [1000.0])
    weights = scale_to_mean_one(raw, cap=5.0)
    assert weights.mean() == pytest.approx(1.0) and weights[-1] == pytest.approx(5.0)
    assert np.allclose(weights[:9], 5.0 / 9.0)  # the rest share the remaining mass in their original ratios
    with pytest.raises(ValueError):
        scale_to_mean_one(raw, cap=0.5)


# --- label joins, targets, stats, splits --------------------------------------------------------------------------


def test_join_on_file_name_matches_lasp_labels(sample_set) -> None:
    _, _, coords, labels = sample_set
    assert labels["matched"].all() and len(labels) == 8
    table = pd.read_csv(SAMPLE_DR1 / "lasp_labels.csv").set_index("filename")
    for path, teff in zip(coords["file_path"], labels["teff"]):
        assert teff == table.loc[Path(path).name, "teff"]
    gz = coords.assign(file_path=coords["file_path"] + ".gz")  # compressed copies still find their label row
    joined = tdata.join_labels(gz, tdata.read_label_table(SAMPLE_DR1 / "lasp_labels.csv"), LASP_COLUMNS, "file")
    assert joined["matched"].all()


def test_join_on_source_id_with_missing_values_and_duplicates(tmp_path: Path) -> None:
    spectra = pd.DataFrame({"source_id": ["2M1", "2M1", "2M2", "2M9"], "file_path": ["a", "b", "c", "d"]})
    table_path = tmp_path / "labels.csv"
    pd.DataFrame({"APOGEE_ID": ["2M1", "2M2", None, None], "TEFF": [4800.0, 5100.0, 6000.0, 6100.0],
                  "FE_H": [-9999.0, 0.1, 0.0, 0.0]}).to_csv(table_path)  # rows without an id are ignored
    joined = tdata.join_labels(spectra, tdata.read_label_table(table_path), {"teff": "TEFF", "fe_h": "FE_H"},
                               "source_id", key_column="APOGEE_ID")
    assert joined["matched"].tolist() == [True, True, True, False]
    assert joined["teff"].tolist()[:3] == [4800.0, 4800.0, 5100.0]
    assert np.isnan(joined.loc[0, "fe_h"]) and np.isnan(joined.loc[3, "teff"]) and joined["logg"].isna().all()
    with pytest.raises(KeyError, match="NOPE"):
        tdata.join_labels(spectra, tdata.read_label_table(table_path), {"teff": "NOPE"}, key_column="APOGEE_ID")
    pd.DataFrame({"APOGEE_ID": ["2M1", "2M1"], "TEFF": [1.0, 2.0]}).to_csv(table_path)
    with pytest.raises(ValueError, match="appear twice"):
        tdata.join_labels(spectra, tdata.read_label_table(table_path), {"teff": "TEFF"}, key_column="APOGEE_ID")


def test_parse_label_columns() -> None:
    assert tdata.parse_label_columns("teff=TEFF, logg=LOGG,fe_h=FEH") == {"teff": "TEFF", "logg": "LOGG", "fe_h": "FEH"}
    for bad in ("teff", "mass=M", ""):
        with pytest.raises(ValueError):
            tdata.parse_label_columns(bad)


def test_targets_in_model_order_and_stats_yaml(sample_set, tmp_path: Path) -> None:
    labels = sample_set[3]
    targets = tdata.labels_to_targets(labels, BOSSNET_PARAMS_BOSS)
    assert np.allclose(targets[:, 0], labels["logg"]) and np.allclose(targets[:, 1], np.log10(labels["teff"]))
    assert np.allclose(targets[:, 2], labels["fe_h"]) and np.allclose(targets[:, 3], labels["rv"])
    stats = tdata.fit_stats(targets, BOSSNET_PARAMS_BOSS)
    z = tdata.standardise(targets, BOSSNET_PARAMS_BOSS, stats)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-12) and np.allclose(z.std(axis=0), 1)
    tdata.write_stats_yaml(tmp_path / "stats.yaml", stats)
    assert yaml.safe_load((tmp_path / "stats.yaml").read_text())["logTeff"]["MEAN"] == pytest.approx(stats["logTeff"][0])


def test_split_by_star_keeps_each_star_in_one_split() -> None:
    ids = np.repeat([f"2M{i:03d}" for i in range(50)], np.arange(50) % 4 + 1)  # 1-4 visits per star
    train, val, test = tdata.split_by_star(ids, seed=3)
    assert len(train) + len(val) + len(test) == len(ids)
    stars = [set(ids[part]) for part in (train, val, test)]
    assert not (stars[0] & stars[1]) and not (stars[0] & stars[2]) and not (stars[1] & stars[2])
    assert [len(s) for s in stars] == [40, 5, 5]
    assert np.array_equal(tdata.split_by_star(ids, seed=3)[2], test)


# --- loss, loop, output format ------------------------------------------------------------------------------------


def test_nan_labels_are_masked_out_of_the_loss() -> None:
    prediction = torch.tensor([[0.5, 1.0], [2.0, -1.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    loss = masked_weighted_mse(prediction, target, torch.tensor([1.0, 2.0]))
    assert float(loss.detach()) == pytest.approx((0.25 + 2 * (1.0 + 1.0)) / 3)
    loss.backward()
    assert prediction.grad[0, 1] == 0.0 and prediction.grad[0, 0] != 0.0
    empty = masked_weighted_mse(prediction, torch.full((2, 2), float("nan")), torch.ones(2))
    assert float(empty.detach()) == 0.0


def test_training_lowers_validation_loss_and_is_reproducible(dr1_set) -> None:
    flux, error, coords, labels = dr1_set
    runs = [train_bossnet(flux, error, coords["source_id"], labels, TINY_OPTICAL, epochs=6, seed=5, batch_size=8,
                          samples_per_epoch=96, learning_rate=5e-3, progress=False) for _ in range(2)]
    history = runs[0].history
    assert history.best_val_loss < history.initial_val_loss
    assert np.isfinite(history.train_loss[1:]).all()
    assert history.val_loss == runs[1].history.val_loss
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key
    stars = [set(coords["source_id"].to_numpy(str)[rows]) for rows in runs[0].split.values()]
    assert not (stars[0] & stars[1]) and not (stars[0] & stars[2])
    assert set(runs[0].test_metrics) == {"teff", "logg", "fe_h", "rv"}


def test_spectra_batches_augment_with_error_scaled_noise(sample_set) -> None:
    flux, error, _, labels = sample_set
    targets = tdata.labels_to_targets(labels, BOSSNET_PARAMS_BOSS)
    provider = SpectraBatches(flux, error, targets, np.ones(len(flux)), batch_size=3, seed=1)
    clean = torch.cat([batch.inputs[0] for batch in provider.batches(epoch=0, augment=False)])
    noisy = [torch.cat([b.inputs[0] for b in provider.batches(epoch=e, augment=True)]) for e in (1, 1, 2)]
    assert clean.shape == (8, flux.shape[1]) and torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(torch.sort(noisy[0], dim=0).values, torch.sort(clean, dim=0).values)


def test_weights_round_trip_through_official_format(sample_set, tmp_path: Path) -> None:
    flux, error, coords, labels = sample_set
    trained = train_bossnet(flux, error, coords["source_id"], labels, TINY_OPTICAL, epochs=1, seed=0, batch_size=4,
                            progress=False)
    sha = write_model_dir(trained, tmp_path / "m", "optical", "tiny-test", "unit test", {"teff": (3900, 9500)})
    assert sorted(p.name for p in (tmp_path / "m").glob("model_chunk_*")) == [f"model_chunk_{i}" for i in range(10)]
    published = load_model(tmp_path / "m", convolution="direct", inference_forms=False)
    assert published.weights_sha256 == sha and published.grid == "optical" and published.name == "tiny-test"
    direct = predict_labels(trained.model, flux, trained.targets, trained.stats)
    for model, tolerance in ((published, 1e-6), (load_model(tmp_path / "m"), 1e-5)):  # inference forms: rounding
        loaded = model.predict(flux, error, draws=0)
        for name in ("teff", "logg", "fe_h", "rv"):
            np.testing.assert_allclose(loaded[name], direct[name], rtol=tolerance)
    info = yaml.safe_load((tmp_path / "m" / "catalogbuilder.yaml").read_text())
    assert info["family"] == "bossnet" and info["domain"] == {"teff": [3900.0, 9500.0]}
    assert info["training"]["weights_sha256"] == sha


def test_fit_is_generic_over_model_and_batch_provider() -> None:
    """A non-spectral model (a linear map of 3 features) trains through the same loop."""

    class Features:
        def __init__(self, seed: int) -> None:
            generator = torch.Generator().manual_seed(seed)
            self.x = torch.randn(64, 3, generator=generator)
            self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])

        def batches(self, epoch: int, augment: bool):
            for start in range(0, 64, 16):
                yield Batch((self.x[start:start + 16],), self.y[start:start + 16], torch.ones(16))

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    history = fit(model, Features(1), Features(2), epochs=30, patience=5, learning_rate=0.05, progress=False)
    assert history.best_val_loss < 0.1 * history.initial_val_loss

    # a schedule: a phase that cannot learn (learning rate 0) stops after its patience, the next phase (another loss,
    # a fresh optimiser, cosine annealing) trains on from the same weights; early stopping watches the validation MAE
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    schedule = [Phase(10, masked_weighted_mse, 0.0, name="frozen"),
                Phase(40, masked_weighted_mae, 0.05, lambda p, lr: torch.optim.Adam(p, lr=lr), cosine=True)]
    history = fit(model, Features(1), Features(2), patience=3, progress=False, schedule=schedule,
                  validation_loss=masked_weighted_mae)
    assert history.val_loss[1:5] == [history.val_loss[1]] * 4  # frozen: epoch 1 is best, 3 more, then phase 2
    assert history.best_epoch > 4 and history.best_val_loss < 0.1 * history.initial_val_loss
    with pytest.raises(ValueError, match="phase needs"):
        fit(model, Features(1), Features(2), schedule=[Phase(0)])


# --- the command ------------------------------------------------------------------------------------------------


def test_train_command_end_to_end(tmp_path: Path, capsys) -> None:
    from catalogbuilder.store import SpectrumStore

    store = SpectrumStore.open(tmp_path / "store", create=True)
    store.ingest(sorted(SAMPLE_DR1.glob("spec-*.fits")), progress=False)
    config = tmp_path / "model_args.yaml"
    TINY_OPTICAL.to_yaml(config)
    out = tmp_path / "model"
    status = cli_main(["train", "--store", str(tmp_path / "store"), "--labels", str(SAMPLE_DR1 / "lasp_labels.csv"),
                       "--config", str(config), "--out", str(out), "--label-columns", "teff=teff,logg=logg,fe_h=feh,rv=rv",
                       "--join-on", "file", "--epochs", "2", "--seed", "1", "--batch-size", "4", "--no-progress"])
    assert status == 0
    assert "weights_sha256" in capsys.readouterr().out
    for name in ("model_args.yaml", "stats.yaml", "catalogbuilder.yaml", "training_report/loss_curves.png",
                 "training_report/report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "training_report" / "report.json").read_text())
    assert report["provenance"]["spectra_matched"] == 8 and report["provenance"]["join_on"] == "file"
    assert set(yaml.safe_load((out / "stats.yaml").read_text())) == {"logg", "logTeff", "FeH", "rv"}
    assert load_model(out).outputs == ("teff", "logg", "fe_h", "rv")
    common = ["train", "--store", str(tmp_path / "store"), "--labels", str(SAMPLE_DR1 / "lasp_labels.csv"),
              "--config", str(config), "--out", str(tmp_path / "x"), "--epochs", "1", "--no-progress"]
    assert cli_main([*common, "--join-on", "source_id", "--label-key", "obsid",
                     "--label-columns", "teff=teff,logg=logg,fe_h=feh,rv=rv"]) == 2
    assert "no spectrum" in capsys.readouterr().err
    assert cli_main([*common, "--join-on", "file"]) == 2  # default columns TEFF/LOGG/FE_H are not in this table
    assert "label column 'TEFF' not in the table" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_command_from_a_training_set_keeps_its_split(sample_set, tmp_path: Path, capsys) -> None:
    from catalogbuilder.training.sources import TrainingSet

    flux, error, coords, labels = sample_set
    split = np.array(["train"] * 5 + ["validation", "test", "test"])
    training_set = TrainingSet("optical", flux, error, np.zeros(flux.shape, np.int64), labels[list(LASP_COLUMNS)].copy(),
                               coords["source_id"].to_numpy(str), np.full(len(flux), "lamost"), split, "8 DR1 stars")
    set_path = training_set.save(tmp_path / "set.npz")
    config = tmp_path / "tiny.yaml"
    TINY_OPTICAL.to_yaml(config)
    out = tmp_path / "from-set"
    argv = ["train", "--training-set", str(set_path), "--config", str(config), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--seed", "1", "--no-progress"]
    assert cli_main(argv) == 0
    info = yaml.safe_load((out / "catalogbuilder.yaml").read_text())
    assert (info["training"]["n_train"], info["training"]["n_validation"], info["training"]["n_test"]) == (5, 1, 2)
    train_teff = labels["teff"].to_numpy()[:5]
    assert info["domain"]["teff"] == pytest.approx([train_teff.min(), train_teff.max()])
    assert info["training"]["train_label_means"]["teff"] == pytest.approx(train_teff.mean())
    assert info["training"]["training_set_description"] == "8 DR1 stars"
    assert load_model(out).grid == "optical"
    capsys.readouterr()
    assert cli_main([*argv[:-1], "--store", str(tmp_path)]) == 2
    assert "--store belongs to training from a store" in capsys.readouterr().err
    assert cli_main(["train", "--family", "apogeenet2", "--training-set", str(set_path), "--out", str(tmp_path / "n2")]) == 2
    assert "needs photometry inputs" in capsys.readouterr().err
