"""APOGEE Net I and II: parameter names/shapes of the published code, forward passes on real apStar spectra,
Monte-Carlo uncertainties and the Net II photometry (metadata) handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from catalogbuilder.constants import APOGEE_NPIX, LABEL_STATS
from catalogbuilder.models import load_model
from catalogbuilder.models.apogeenet import (
    METADATA_KEYS, METADATA_MEAN, METADATA_REPLACEMENT, METADATA_STD, ApogeeNetCNN, expected_parameter_shapes,
    normalize_metadata, write_initialised_model,
)
from catalogbuilder.models.weights import save_state_dict

torch.set_num_threads(1)

# Derived by hand from Sprague et al. 2022, appendix A: Conv1d(in, out, 3) weights are (out, in, 3);
# Linear(in, out) weights are (out, in); fc1 takes 64 channels × 133 pixels (+ 64 metadata features for Net II).
APPENDIX_A_NET2: dict[str, tuple[int, ...]] = {
    "conv1.weight": (8, 1, 3), "conv1.bias": (8,), "conv2.weight": (8, 8, 3), "conv2.bias": (8,),
    "conv3.weight": (16, 8, 3), "conv3.bias": (16,), "conv4.weight": (16, 16, 3), "conv4.bias": (16,),
    "conv5.weight": (16, 16, 3), "conv5.bias": (16,), "conv6.weight": (16, 16, 3), "conv6.bias": (16,),
    "conv7.weight": (32, 16, 3), "conv7.bias": (32,), "conv8.weight": (32, 32, 3), "conv8.bias": (32,),
    "conv9.weight": (32, 32, 3), "conv9.bias": (32,), "conv10.weight": (32, 32, 3), "conv10.bias": (32,),
    "conv11.weight": (64, 32, 3), "conv11.bias": (64,), "conv12.weight": (64, 64, 3), "conv12.bias": (64,),
    "metadata.l1.weight": (8, 7), "metadata.l1.bias": (8,), "metadata.l2.weight": (16, 8), "metadata.l2.bias": (16,),
    "metadata.l3.weight": (32, 16), "metadata.l3.bias": (32,), "metadata.l4.weight": (32, 32), "metadata.l4.bias": (32,),
    "metadata.l5.weight": (64, 32), "metadata.l5.bias": (64,),
    "fc1.weight": (512, 64 * 133 + 64), "fc1.bias": (512,), "fc2.weight": (512, 512), "fc2.bias": (512,),
    "fc3.weight": (3, 512), "fc3.bias": (3,),
}
APPENDIX_NET1: dict[str, tuple[int, ...]] = {
    **{key: value for key, value in APPENDIX_A_NET2.items() if not key.startswith("metadata.")},
    "fc1.weight": (512, 64 * 133),
}


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_net2_parameter_names_and_shapes_are_appendix_a():
    network = ApogeeNetCNN(with_metadata=True)
    assert _shapes(network) == APPENDIX_A_NET2
    assert list(network.state_dict()) == list(APPENDIX_A_NET2)  # same order as the published module
    assert expected_parameter_shapes(with_metadata=True) == APPENDIX_A_NET2
    assert sum(p.numel() for p in network.parameters()) == sum(int(np.prod(s)) for s in APPENDIX_A_NET2.values())


def test_net1_is_the_cnn_without_the_metadata_branch():
    network = ApogeeNetCNN(with_metadata=False)
    assert _shapes(network) == APPENDIX_NET1
    assert expected_parameter_shapes(with_metadata=False) == APPENDIX_NET1


def test_six_pools_bring_8575_pixels_to_133():
    network = ApogeeNetCNN(with_metadata=False).eval()
    with torch.no_grad():
        out = network(torch.ones(2, 1, APOGEE_NPIX))
    assert out.shape == (2, 3)
    with pytest.raises(RuntimeError):  # a spectrum of another length does not flatten to 64·133
        network(torch.ones(1, 1, 8000))


@pytest.fixture(scope="module")
def apstar_spectra(shared_data):
    from catalogbuilder.readers import read_spectra

    spectra = read_spectra(shared_data / "apogee" / "apStar-dr17-2M17335483-2753043.fits")
    flux = np.stack([spectrum.flux for spectrum in spectra])
    error = np.stack([spectrum.error for spectrum in spectra])
    return spectra, flux, error


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("apogeenet")
    digests = {family: write_initialised_model(root / family, family, seed=7) for family in ("apogeenet1", "apogeenet2")}
    return root, digests


@pytest.mark.parametrize("family", ["apogeenet1", "apogeenet2"])
def test_load_model_from_directory_with_family(model_dirs, family):
    root, digests = model_dirs
    model = load_model(root / family)
    assert (model.family, model.grid, model.outputs) == (family, "apogee", ("teff", "logg", "fe_h"))
    assert model.weights_sha256 == digests[family]
    assert model.needs_photometry == (family == "apogeenet2")
    info = yaml.safe_load((root / family / "catalogbuilder.yaml").read_text())
    assert info["family"] == family


def test_wrong_weights_for_the_family_are_refused(model_dirs, tmp_path):
    root, _ = model_dirs
    save_state_dict(ApogeeNetCNN(with_metadata=False).state_dict(), tmp_path)
    (tmp_path / "catalogbuilder.yaml").write_text(yaml.safe_dump({"family": "apogeenet2"}))
    with pytest.raises(ValueError, match="missing.*metadata.l1"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ["apogeenet1", "apogeenet2"])
def test_forward_pass_on_real_apstar_rows(model_dirs, apstar_spectra, family):
    root, _ = model_dirs
    spectra, flux, error = apstar_spectra
    model = load_model(root / family)
    result = model.predict(flux, error, draws=0)
    for name in ("teff", "logg", "fe_h", "logteff"):
        assert result[name].shape == (len(spectra),)
        assert np.all(np.isfinite(result[name]))
        assert np.all(np.isnan(result[f"raw_e_{name}"]))
    # untrained weights give z-scores near 0 → values near the label means of the family
    assert np.allclose(np.log10(result["teff"]), result["logteff"])
    mean_logg = LABEL_STATS[family]["logg"][0]
    assert np.all(np.abs(result["logg"] - mean_logg) < 3 * LABEL_STATS[family]["logg"][1])
    # raw flux in: scaling the spectrum changes the output (no normalisation inside the model)
    scaled = model.predict(flux * 3.0, error * 3.0, draws=0)
    assert not np.allclose(scaled["logg"], result["logg"])


@pytest.mark.parametrize("family", ["apogeenet1", "apogeenet2"])
def test_monte_carlo_uncertainties_are_per_spectrum_and_reproducible(model_dirs, apstar_spectra, family):
    root, _ = model_dirs
    _, flux, error = apstar_spectra
    model = load_model(root / family)
    seeds = [11, 12, 13, 14, 15]
    first = model.predict(flux, error, draws=6, seeds=seeds)
    again = model.predict(flux, error, draws=6, seeds=seeds)
    alone = model.predict(flux[2:3], error[2:3], draws=6, seeds=seeds[2:3])
    for name in ("teff", "logg", "fe_h"):
        raw = first[f"raw_e_{name}"]
        assert np.all(np.isfinite(raw)) and np.all(raw > 0)
        np.testing.assert_array_equal(first[name], again[name])
        np.testing.assert_allclose(alone[name][0], first[name][2], rtol=1e-6)
    # more noise → more scatter
    noisy = model.predict(flux, error * 20.0, draws=6, seeds=seeds)
    assert np.median(noisy["raw_e_logg"]) > np.median(first["raw_e_logg"])


def test_net2_photometry_is_used_and_missing_bands_are_imputed_and_marked(model_dirs, apstar_spectra):
    root, _ = model_dirs
    spectra, flux, error = apstar_spectra
    model = load_model(root / "apogeenet2")
    n = len(spectra)
    complete = {"parallax": np.full(n, 0.35), "phot_g_mean_mag": np.full(n, 15.2), "phot_bp_mean_mag": np.full(n, 16.9),
                "phot_rp_mean_mag": np.full(n, 14.0), **{f"tmass_{band}": np.array([s.meta[f"tmass_{band}"] for s in spectra])
                                                         for band in "jhk"}}
    full = model.predict(flux, error, draws=0, photometry=complete)
    assert not full["missing_photometry"].any()
    without = model.predict(flux, error, draws=0, photometry=None)
    assert without["missing_photometry"].all()
    assert np.all(np.isfinite(without["teff"]))  # still a value: computed with the reference replacements
    assert not np.allclose(without["logg"], full["logg"])  # the metadata branch matters
    partial = dict(complete, phot_bp_mean_mag=np.full(n, np.nan))
    assert model.predict(flux, error, draws=0, photometry=partial)["missing_photometry"].all()


def test_net1_ignores_photometry(model_dirs, apstar_spectra):
    root, _ = model_dirs
    _, flux, error = apstar_spectra
    model = load_model(root / "apogeenet1")
    plain = model.predict(flux, error, draws=0)
    with_phot = model.predict(flux, error, draws=0, photometry={"parallax": np.ones(len(flux))})
    np.testing.assert_array_equal(plain["logg"], with_phot["logg"])
    assert "missing_photometry" not in plain


def test_metadata_normalisation_follows_the_reference_rules():
    values = {
        "parallax": [1.5, -5.0, np.nan], "phot_g_mean_mag": [12.0, 99.99, 12.0], "phot_bp_mean_mag": [12.5, 12.5, 12.5],
        "phot_rp_mean_mag": [11.5, 11.5, 11.5], "tmass_j": [10.0, -9999.0, 10.0], "tmass_h": [9.5, 9.5, 9.5],
        "tmass_k": [9.4, 9.4, 9.4],
    }
    normalised, missing = normalize_metadata(values, 3)
    assert list(missing) == [False, True, True]
    raw_first = np.array([values[key][0] for key in METADATA_KEYS])
    np.testing.assert_allclose(normalised[0], (raw_first - METADATA_MEAN) / METADATA_STD, rtol=1e-6)
    replaced = (METADATA_REPLACEMENT - METADATA_MEAN) / METADATA_STD
    assert normalised[1][0] == pytest.approx(replaced[0], rel=1e-6)  # parallax ≤ −1 mas
    assert normalised[1][1] == pytest.approx(replaced[1], rel=1e-6)  # G = 99.99 sentinel
    assert normalised[1][4] == pytest.approx(replaced[4], rel=1e-6)  # J = −9999 sentinel
    assert normalised[2][0] == pytest.approx(replaced[0], rel=1e-6)  # NaN parallax
    with pytest.raises(ValueError, match="3 spectra"):
        normalize_metadata({"parallax": [1.0, 2.0]}, 3)


def test_bad_flux_shape_is_a_clear_error(model_dirs):
    root, _ = model_dirs
    model = load_model(root / "apogeenet1")
    with pytest.raises(ValueError, match="8575"):
        model.predict(np.ones((1, 4000), np.float32), None, draws=0)
    with pytest.raises(ValueError, match="errors"):
        model.predict(np.ones((1, APOGEE_NPIX), np.float32), None, draws=3)


def test_net1_runs_through_the_dask_inference_stage_unchanged(model_dirs, shared_data, tmp_path):
    from distributed import Client, LocalCluster

    from catalogbuilder.inference.graph import run_inference
    from catalogbuilder.store import SpectrumStore

    root, digests = model_dirs
    store_path = tmp_path / "store"
    SpectrumStore.open(store_path, create=True).ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            report = run_inference(client, SpectrumStore.open(store_path), root / "apogeenet1", draws=3, seed=1,
                                   progress=False)
    assert report.n_spectra == 5  # row 0 and 3 visits of the 3-visit star, row 0 of the 1-visit star (rows 1: never)
    rows = SpectrumStore.open(store_path).results.read()
    rows = rows[rows["model_name"] == "apogeenet1"]
    assert len(rows) == 5 and set(rows["weights_sha256"]) == {digests["apogeenet1"]}
    assert (rows["status"] == "ok").all()
    assert np.all(np.isfinite(rows[["teff", "logg", "fe_h", "raw_e_teff"]].to_numpy()))

    from catalogbuilder.release.build import build_release, read_table

    build_release(SpectrumStore.open(store_path), tmp_path / "release")
    stem = "apogee/apogeenet1/allStar-apogeenet1-apogee"
    star = read_table(tmp_path / "release", stem)
    assert len(star) == 2 and (tmp_path / "release" / f"{stem}.fits.gz").exists()  # one row per star
    assert set(star["weights_sha256"]) == {digests["apogeenet1"]}


def test_net2_with_real_header_and_gaia_photometry(model_dirs, apstar_spectra, shared_data):
    import pandas as pd

    from catalogbuilder.photometric.table import join_by_position, read_astronn_gaia

    root, _ = model_dirs
    spectra, flux, error = apstar_spectra
    rows = pd.DataFrame({"ra": [s.ra for s in spectra], "dec": [s.dec for s in spectra],
                         **{f"tmass_{band}": [s.meta[f"tmass_{band}"] for s in spectra] for band in "jhk"}})
    joined = join_by_position(rows, read_astronn_gaia(shared_data / "gaia" / "astroNN_gaiadr2_apogeedr14_parallax.npz"),
                              ["parallax", "phot_g_mean_mag"], radius_arcsec=1.0)
    assert (joined["join_sep_arcsec"] < 0.1).all() and joined["parallax"].notna().all()
    model = load_model(root / "apogeenet2")
    result = model.predict(flux, error, draws=4, seeds=range(len(spectra)), photometry=joined)
    assert np.all(np.isfinite(result["teff"])) and np.all(result["raw_e_teff"] > 0)
    assert result["missing_photometry"].all()  # the DR2 table has no BP/RP: imputed and marked
