"""One training path for every network family: APOGEE Net I/II train like BossNet (same split, weights, augmentation,
masking, early stopping) on real APOGEE spectra of ../shared/data, write a directory ``load_model`` reads back with
identical predictions, and ``catalogbuilder train --family`` picks the family (photometric → its own trainer)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from astropy.io import fits
from astropy.table import Table

from catalogbuilder.cli import main as cli_main
from catalogbuilder.inference import photometry as phot
from catalogbuilder.models.apogeenet import (
    METADATA_KEYS,
    NET1_LABELS,
    NET2_LABELS,
    normalize_metadata,
)
from catalogbuilder.models.registry import load_model, network_family
from catalogbuilder.store import SpectrumStore
from catalogbuilder.training import data as tdata
from catalogbuilder.training.train import (
    load_store_spectra,
    predict_labels,
    store_metadata,
    train_from_store,
    train_network,
)

CALIBRATED_STAR = "2M19485057+5005279"  # Berger Teff and asteroseismic log g in the DR17 calibration tables
LABEL_COLUMNS = {"teff": "TEFF", "logg": "LOGG", "fe_h": "FE_H"}
# With seed 0 the 4 stars split into train {2M00242666+5341178, 2M17335483-2753043}, validation {2M01183798+8403419}
# and test {CALIBRATED_STAR}; with seed 2 the calibrated star (no [Fe/H]) trains next to one other star only.
SEED = 0
TRAINING = {"epochs": 2, "patience": 2, "batch_size": 4, "learning_rate": 1e-4, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def apogee_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two apStar files (7 spectra, one row all zero) and the two apVisit files: 9 spectra of 4 stars."""
    path = tmp_path_factory.mktemp("families") / "store"
    report = SpectrumStore.open(path, create=True).ingest(sorted((shared_data / "apogee").glob("ap*.fits")), progress=False)
    assert report.added["apogee"] == 9
    return path


@pytest.fixture(scope="module")
def label_table(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real labels keyed by APOGEE_ID: the calibration Teff (Berger) and log g of CALIBRATED_STAR, no [Fe/H] for it
    (NaN: masked); the Doppler grid Teff/log g/[Fe/H] of the file headers for the other three stars."""
    labels = shared_data / "labels"
    teff = Table.read(labels / "sdss_apogee__data_calib_teff_berger.fits")
    logg = Table.read(labels / "sdss_apogee__data_calib_logg_cal.fits")
    rows = []
    for path in sorted((shared_data / "apogee").glob("ap*.fits")):
        header = fits.getheader(path, 0)
        star = header["OBJID"].strip()
        if star == CALIBRATED_STAR:
            rows.append({"APOGEE_ID": star, "TEFF": float(teff["TEFF"][np.char.strip(teff["APOGEE_ID"]) == star][0]),
                         "LOGG": float(logg["LOGG"][np.char.strip(logg["APOGEE_ID"]) == star][0]), "FE_H": np.nan})
        else:
            prefix = "RV_" if "RV_TEFF" in header else "RV"
            rows.append({"APOGEE_ID": star, "TEFF": header[f"{prefix}TEFF"], "LOGG": header[f"{prefix}LOGG"],
                         "FE_H": header[f"{prefix}FEH"]})
    out = tmp_path_factory.mktemp("labels") / "labels.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def crossmatch_table(apogee_store: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`catalogbuilder crossmatch` of the store against the real astroNN APOGEE x Gaia DR2 table (parallax, G)."""
    out = tmp_path_factory.mktemp("xmatch") / "crossmatch.parquet"
    argv = ["crossmatch", "--store", str(apogee_store), "--out", str(out), "--catalog",
            str(shared_data / "gaia" / "astroNN_gaiadr2_apogeedr14_parallax.npz"), "--column", "phot_g_mean_mag=g"]
    assert cli_main(argv) == 0
    return out


def _train(store: Path, labels: Path, out: Path, family: str, photometry: Path | None = None):
    return train_from_store(store, labels, None, out, LABEL_COLUMNS, key_column="APOGEE_ID", family=family,
                            photometry=photometry, seed=SEED, **TRAINING)


def _assert_reload_identical(trained, out: Path, store: Path, photometry: Path | None = None) -> None:
    """``load_model(out)`` predicts (no draws) exactly what the trained network predicts, on every store spectrum."""
    _, flux, error, coords = load_store_spectra(store)
    model = load_model(out)
    assert model.info.family == trained.family.name and model.weights_sha256 == trained.weights_sha256
    extra, metadata = {}, None
    if trained.family.metadata_width:
        header = coords[list(phot.HEADER_KEYS)]
        inputs = phot.gather_inputs(photometry, coords["spectrum_id"].to_numpy(str), header, METADATA_KEYS)
        extra = {"photometry": {key: inputs[key].to_numpy() for key in METADATA_KEYS}}
        metadata, _ = normalize_metadata(extra["photometry"], len(flux))
    loaded = model.predict(flux, error, draws=0, **extra)
    direct = predict_labels(trained.model, flux, trained.targets, trained.stats, preprocess=trained.family.preprocess,
                            metadata=metadata)
    for name in ("teff", "logg", "fe_h"):
        assert np.all(np.isfinite(loaded[name]))
        np.testing.assert_allclose(loaded[name], direct[name], rtol=1e-6, err_msg=name)


def _assert_trained_like_bossnet(trained, out: Path, family: str, targets: tuple[str, ...]) -> None:
    history = trained.history
    assert len(history.val_loss) - 1 == TRAINING["epochs"] and np.isfinite(history.train_loss[1:]).all()
    assert np.isfinite(history.val_loss).all()
    # split by star; apStar rows 1 (the all-zero one of CALIBRATED_STAR among them) are never loaded, its row 0 is the
    # test split
    assert [len(rows) for rows in trained.split.values()] == [5, 1, 1]
    stats = yaml.safe_load((out / "stats.yaml").read_text())
    assert list(stats) == list(targets)  # the names and order the family's loader de-normalises with
    info = yaml.safe_load((out / "catalogbuilder.yaml").read_text())
    assert info["family"] == family and info["grid"] == "apogee" and info["training"]["n_train"] == 5
    assert yaml.safe_load((out / "model_args.yaml").read_text()) == {"dropout": pytest.approx(0.07646)}
    assert sorted(p.name for p in out.glob("model_chunk_*")) == [f"model_chunk_{i}" for i in range(10)]
    report = json.loads((out / "training_report" / "report.json").read_text())
    assert report["provenance"]["spectra_matched"] == 7  # 9 stored, apStar rows 1 never used
    assert set(trained.test_metrics) == {"teff", "logg"}  # the test star has no [Fe/H]: nothing to score


def test_apogeenet1_trains_and_reloads_identically(apogee_store: Path, label_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "net1"
    trained = _train(apogee_store, label_table, out, "apogeenet1")
    _assert_trained_like_bossnet(trained, out, "apogeenet1", NET1_LABELS)
    teff = tdata.labels_to_targets(pd.DataFrame({"teff": [3676.877300542052, 4500.0], "logg": 0.0, "fe_h": 0.0}),
                                   ("Teff",))
    assert teff[:, 0].tolist() == [3676.877300542052, 4500.0]  # Net I trains Teff in K, not log
    _assert_reload_identical(trained, out, apogee_store)


def test_apogeenet2_with_and_without_photometry(apogee_store: Path, label_table: Path, crossmatch_table: Path,
                                                tmp_path: Path) -> None:
    _, _, _, coords = load_store_spectra(apogee_store)
    with_table, missing = store_metadata(crossmatch_table, coords)
    header_only, missing_header = store_metadata(None, coords)
    gaia = pd.read_parquet(crossmatch_table).set_index("spectrum_id").loc[coords["spectrum_id"]]
    matched = np.isfinite(gaia["parallax"].to_numpy())
    assert matched.any() and missing_header.all()  # no table: Gaia inputs imputed for every spectrum
    # the table's parallax reaches the network input, normalised by the model's own function
    expected, _ = normalize_metadata({"parallax": gaia["parallax"].to_numpy()}, len(coords))
    np.testing.assert_allclose(with_table[matched, 0], expected[matched, 0])
    assert not np.allclose(with_table[matched, 0], header_only[matched, 0])
    np.testing.assert_allclose(with_table[:, 4:], header_only[:, 4:])  # 2MASS J/H/K from the same headers
    for photometry in (crossmatch_table, None):
        out = tmp_path / ("table" if photometry else "header")
        trained = _train(apogee_store, label_table, out, "apogeenet2", photometry)
        _assert_trained_like_bossnet(trained, out, "apogeenet2", NET2_LABELS)
        _assert_reload_identical(trained, out, apogee_store, photometry)
        provenance = yaml.safe_load((out / "catalogbuilder.yaml").read_text())["training"]
        assert provenance["spectra_missing_photometry"] == int((missing if photometry else missing_header).sum())


def test_nan_labels_are_masked_and_seed_reproduces(apogee_store: Path, label_table: Path) -> None:
    _, flux, error, coords = load_store_spectra(apogee_store)
    labels = tdata.join_labels(coords, tdata.read_label_table(label_table), LABEL_COLUMNS, key_column="APOGEE_ID")
    ids = coords["source_id"].to_numpy(str)
    validation_star = "2M01183798+8403419"
    split = {"train": np.flatnonzero(ids != validation_star), "validation": np.flatnonzero(ids == validation_star),
             "test": np.array([], dtype=int)}
    family = network_family("apogeenet1").architecture()
    runs = [train_network(family, flux, error, ids, labels, split=split, seed=3, **TRAINING) for _ in range(2)]
    trained = runs[0]
    assert np.nan_to_num(flux).any(axis=1).all()  # apStar rows 1 (one of them all zero) are not training inputs
    assert len(coords) == 7 and "combined-alt" not in set(coords["kind"])
    assert CALIBRATED_STAR in set(ids[trained.split["train"]])  # its NaN [Fe/H] is in the training set...
    fe_h = labels["fe_h"].to_numpy()[trained.split["train"]]
    assert np.isnan(fe_h).sum() == 1
    finite = fe_h[np.isfinite(fe_h)]
    assert trained.stats["FeH"] == pytest.approx((finite.mean(), finite.std()))  # ...out of the stats
    assert np.isfinite(trained.history.train_loss[1:]).all()  # ...and out of the loss
    assert runs[0].history.val_loss == runs[1].history.val_loss
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key


def test_train_command_family_option(apogee_store: Path, label_table: Path, crossmatch_table: Path, tmp_path: Path,
                                     capsys) -> None:
    common = ["train", "--store", str(apogee_store), "--labels", str(label_table), "--label-key", "APOGEE_ID",
              "--epochs", "2", "--batch-size", "4", "--learning-rate", "1e-4", "--no-progress"]
    out = tmp_path / "cli-net2"
    assert cli_main([*common, "--family", "apogeenet2", "--photometry", str(crossmatch_table), "--out", str(out),
                     "--seed", str(SEED)]) == 0
    assert "apogeenet2 model written" in capsys.readouterr().out
    assert load_model(out).info.family == "apogeenet2"
    bad = tmp_path / "bad"
    failures = [
        ([*common, "--family", "apogeenet1", "--photometry", str(crossmatch_table)], "--photometry is not used"),
        ([*common, "--family", "bossnet"], "needs --config"),
        ([*common, "--family", "apogeenet1", "--seed", "2"], "fewer than 2 distinct"),  # train: 1 star with [Fe/H]
        ([*common, "--family", "apogeenet1", "--grid", "optical"], "optical"),
        (["train", "--family", "photometric", "--store", str(apogee_store)], "--store is not used"),
        (["train", "--family", "photometric", "--apokasc", "x.fits"], "needs --gaia"),
        (["train", "--family", "apogeenet3", "--training-set", "x.npz"], "cannot train family 'apogeenet3'"),
    ]
    for argv, message in failures:
        assert cli_main([*argv, "--out", str(bad)]) == 2, argv
        assert message in capsys.readouterr().err
    assert not bad.exists()
    config = tmp_path / "dropout.yaml"
    config.write_text("model_dim: 4\n")
    assert cli_main([*common, "--family", "apogeenet1", "--config", str(config), "--out", str(bad)]) == 2
    assert "may only set dropout" in capsys.readouterr().err


def test_train_command_photometric_family_runs_the_photometric_trainer(shared_data: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """``--family photometric`` trains the MLP on APOKASC x Gaia DR2 with the shared options mapped to its settings."""
    out = tmp_path / "phot"
    argv = ["train", "--family", "photometric", "--out", str(out), "--name", "phot-family-test",
            "--apokasc", str(shared_data / "labels" / "sdss_apogee__data_apokasc_APOKASC_Catalog.v7.1.fits"),
            "--gaia", str(shared_data / "gaia" / "astroNN_gaiadr2_apogeedr14_parallax.npz"),
            "--epochs-mae", "1", "--epochs-smape", "1", "--seed", "7", "--batch-size", "256", "--threads", "1"]
    assert cli_main(argv) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"teff", "logg", "fe_h"} and scores["teff"]["test"]["n"] > 100
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert (settings["seed"], settings["batch_size"], settings["epochs_mae"], settings["epochs_smape"]) == (7, 256, 1, 1)
    model = load_model(out)
    assert model.info.family == "photometric" and model.name == "phot-family-test"
