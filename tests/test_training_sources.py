"""Training sets from MILES, the Cannon emulator and real survey files (catalogbuilder.training.sources).

The wavelength, broadening, unpickling, emulator-algebra and training-set tests need nothing installed; the tests on
the real MILES and Cannon files skip when the training data packages are absent (CI installs only ``.[test]``)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catalogbuilder.constants import APOGEE_NPIX, GRID_SPECS, apogee_wavelength
from catalogbuilder.readers import read_spectra
from catalogbuilder.training import sources

needs_packages = pytest.mark.skipif(not sources.sources_available(),
                                    reason="training data packages not installed (" + sources.INSTALL_HINT + ")")


def test_air_to_vacuum_matches_known_lines_and_inverts() -> None:
    # Hα and the Ca II triplet line 8542: air 6562.80 → vacuum 6564.61, air 8542.09 → vacuum 8544.44 (NIST)
    np.testing.assert_allclose(sources.air_to_vacuum(np.array([6562.80, 8542.09])), [6564.61, 8544.44], atol=0.02)
    wavelength = np.linspace(3500.0, 17000.0, 50)
    np.testing.assert_allclose(sources.vacuum_to_air(sources.air_to_vacuum(wavelength)), wavelength, atol=1e-8)


def test_broaden_gives_the_requested_gaussian_and_keeps_flux() -> None:
    wavelength = np.arange(5000.0, 5100.0, 0.1)
    line = np.zeros_like(wavelength)
    line[500] = 1.0
    broadened = sources.broaden(wavelength, line, 0.0, 2.0)
    assert broadened.sum() == pytest.approx(1.0)
    half = broadened >= broadened.max() / 2
    assert np.ptp(wavelength[half]) == pytest.approx(2.0, abs=0.2)  # FWHM 2 Å (0.1 Å pixels)
    # already at (or above) the target resolution: unchanged
    np.testing.assert_array_equal(sources.broaden(wavelength, line, 3.0, 2.0), line)
    with pytest.raises(ValueError, match="evenly spaced"):
        sources.broaden(np.sort(np.random.default_rng(0).uniform(0, 1, 20)), np.ones(20), 0.0, 0.1)


class _Code:  # any non-numpy global in a pickle must be refused
    pass


def test_numpy_unpickler_refuses_anything_but_numpy(tmp_path: Path) -> None:
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"theta": np.arange(6.0).reshape(2, 3), "n": np.int64(3)}))
    loaded = sources.load_numpy_pickle(good)
    np.testing.assert_array_equal(loaded["theta"], np.arange(6.0).reshape(2, 3))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"x": _Code()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        sources.load_numpy_pickle(bad)


def _small_emulator(rng: np.random.Generator) -> sources.PolynomialEmulator:
    terms = (((0, 1.0),), ((1, 1.0),), ((2, 1.0),), ((0, 2.0),), ((1, 1.0), (0, 1.0)))
    wavelength = np.arange(15000.0, 15020.0, 0.1)
    theta = np.column_stack([1.0 - 0.3 * np.exp(-0.5 * ((wavelength - 15010.0) / 0.2) ** 2),
                             *rng.normal(0.0, 0.05, (len(terms), len(wavelength)))])
    return sources.PolynomialEmulator(wavelength, theta, terms, np.array([5000.0, 3.0, 0.0]),
                                      np.array([2000.0, 3.0, 1.5]), np.array([[3500, 8000], [0, 5], [-2.5, 0.5]]))


def test_emulating_after_degrading_the_coefficients_equals_degrading_each_spectrum() -> None:
    emulator = _small_emulator(np.random.default_rng(1))
    labels = np.array([[4500.0, 2.0, -0.5], [6000.0, 4.4, 0.1]])
    target = np.linspace(15001.0, 15019.0, 70)
    fwhm = lambda wavelength: wavelength / 22500.0  # noqa: E731
    degraded_first = emulator.onto(target, fwhm)(labels)
    spectra = emulator(labels)
    direct = np.stack([np.interp(target, emulator.wavelength, sources.broaden(emulator.wavelength, row, 0.0,
                                                                              fwhm(emulator.wavelength)))
                       for row in spectra])
    np.testing.assert_allclose(degraded_first, direct, atol=1e-9)
    # the design matrix is The Cannon's: 1, then each term's product of scaled labels
    scaled = (labels - emulator.fiducials) / emulator.scales
    np.testing.assert_allclose(emulator.design(labels)[:, [1, 4, 5]],
                               np.column_stack([scaled[:, 0], scaled[:, 0] ** 2, scaled[:, 1] * scaled[:, 0]]))


def test_training_set_round_trip_split_and_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stars = np.array(["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"])
    split_of = sources.assign_split(stars, {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=3)
    assert sorted(np.unique(list(split_of.values()))) == ["test", "train", "validation"]
    split = np.array([split_of[star] for star in stars])
    part = sources.TrainingSet("optical", rng.normal(size=(10, 5)).astype(np.float32),
                               np.ones((10, 5), np.float32), np.zeros((10, 5), np.int64),
                               pd.DataFrame({"teff": np.linspace(4000, 6000, 10), "logg": 4.0}), stars,
                               np.full(10, "lamost"), split, "tiny")
    assert part.labels.columns.tolist() == ["teff", "logg", "fe_h", "rv"] and part.labels["rv"].isna().all()
    loaded = sources.TrainingSet.load(part.save(tmp_path / "set.npz"))
    np.testing.assert_array_equal(loaded.flux, part.flux)
    pd.testing.assert_frame_equal(loaded.labels, part.labels)
    assert loaded.split.tolist() == split.tolist() and loaded.description == "tiny"
    both = sources.concatenate([part, loaded])
    assert len(both) == 20 and both.counts()["train"]["lamost"] == 2 * (split == "train").sum()
    with pytest.raises(ValueError, match="unknown split"):
        sources.TrainingSet("optical", part.flux, part.error, part.mask, part.labels, stars, part.origin,
                            np.full(10, "holdout"))
    with pytest.raises(ValueError, match="not a training set"):
        np.savez(tmp_path / "other.npz", flux=part.flux)
        sources.TrainingSet.load(tmp_path / "other.npz")


def test_apstar_conditions_and_observe_reproduce_real_chip_gaps_and_snr(shared_data: Path) -> None:
    pixels = np.zeros(APOGEE_NPIX, dtype=bool)
    pixels[::7] = True
    conditions = sources.apstar_conditions([shared_data / "apogee" / "apVisit-r13-9518-57729-104.fits"], pixels)
    real = read_spectra(shared_data / "apogee" / "apVisit-r13-9518-57729-104.fits")[0]
    assert len(conditions) == 1 and np.array_equal(conditions.empty[0], ~(real.flux > 0))
    assert [stop - start for start, stop in sources.chips(conditions.empty[0])] == [3123, 2592, 2087]
    assert conditions.snr[0] == pytest.approx(real.snr, rel=0.25)  # the file's S/N, measured from its error array
    rng = np.random.default_rng(0)
    flux, error = sources.observe(np.ones((3, APOGEE_NPIX)), conditions, np.zeros(3, int), np.array([50.0, 500.0, 5e3]),
                                  np.array([40.0, 100.0, 300.0]), rng)
    empty = conditions.empty[0]
    assert np.all(flux[:, empty] == 0) and np.all(error[:, empty] == 0) and np.all(error[:, ~empty] > 0)
    np.testing.assert_allclose(np.median(flux[:, ~empty], axis=1), [50.0, 500.0, 5e3], rtol=0.02)
    np.testing.assert_allclose(np.median(flux[:, ~empty] / error[:, ~empty], axis=1), [40.0, 100.0, 300.0], rtol=0.1)


@needs_packages
def test_cannon_emulator_matches_the_real_apstar_dwarf_at_its_labels(shared_data: Path) -> None:
    emulator = sources.CannonEmulator.load("coolstars")
    assert emulator.label_range.tolist() == [[3500.0, 8000.0], [0.0, 5.0], [-2.5, 0.5]]
    on_apstar = emulator.onto(apogee_wavelength(), sources.apogee_instrument().fwhm)
    row = read_spectra(shared_data / "apogee" / "apStar-dr17-2M19485057+5005279.fits")[0]
    good = row.flux > 0
    normalised = row.flux / sources.smooth_continuum(apogee_wavelength(), row.flux, good, degree=12)
    model = on_apstar.flux(np.array([[4734.0, 4.63, -0.3]]), normalized=True)[0]
    lags = {lag: np.corrcoef(np.roll(model, lag)[good], normalised[good])[0, 1] for lag in range(-3, 4)}
    assert max(lags, key=lags.get) == 0 and lags[0] > 0.7  # vacuum wavelengths line up; the lines match
    giant = on_apstar.flux(np.array([[3680.0, 0.5, -0.3]]), normalized=True)[0]
    assert np.corrcoef(giant[good], normalised[good])[0, 1] < lags[0]  # a cool giant's spectrum fits worse


@needs_packages
def test_miles_spectra_on_lamost_pixels_are_continued_by_the_emulator(shared_data: Path) -> None:
    miles = sources.MilesLibrary.load()
    assert len(miles.labels) >= 980 and miles.labelled().labels.shape[0] == 944
    assert miles.wavelength[0] == pytest.approx(sources.air_to_vacuum(np.array([3540.5]))[0])
    subset = sources.MilesLibrary(miles.wavelength, miles.flux[:4], miles.labels.iloc[:4]).labelled()
    instrument = sources.lamost_instrument(next((shared_data / sources.LAMOST_DIR).glob("spec-*.fits")))
    emulators = (sources.CannonEmulator.load("coolstars"), sources.CannonEmulator.load("hotdwarfs"))
    flux, no_miles = sources.miles_on_instrument(subset, emulators, instrument)
    beyond = instrument.native_wavelength > sources.MILES_RED_LIMIT_AA
    assert flux.shape == (len(subset.labels), len(instrument.native_wavelength))
    assert np.array_equal(no_miles[0], beyond) and np.isfinite(flux).all() and (flux > 0).all()
    edge = np.searchsorted(instrument.native_wavelength, sources.MILES_RED_LIMIT_AA)
    jump = flux[:, edge] / np.median(flux[:, edge - 20:edge], axis=1)
    assert np.all(np.abs(jump - 1.0) < 0.15)  # the splice is continuous in flux


@needs_packages
def test_small_optical_set_mixes_real_and_degraded_library_spectra(shared_data: Path, monkeypatch) -> None:
    full = sources.MilesLibrary.load()
    monkeypatch.setattr(sources.MilesLibrary, "load", classmethod(
        lambda cls: sources.MilesLibrary(full.wavelength, full.flux[:30], full.labels.iloc[:30])))
    training_set = sources.build_optical_set(shared_data, seed=0, miles_copies=1, real_copies=2)
    counts = training_set.counts()
    assert counts["test"] == {"lamost": 27, "miles": 0}  # real LAMOST stars only in the test split
    assert counts["train"]["lamost"] == 2 * 55 and counts["validation"]["lamost"] == 9
    miles = training_set.origin == "miles"
    assert np.all(training_set.mask[miles][:, -1] & GRID_SPECS['optical'].no_coverage)  # beyond MILES: marked
    assert not np.any(training_set.mask[~miles] & GRID_SPECS['optical'].no_coverage)
    real_level = np.median(training_set.flux[~miles], axis=1)
    library_level = np.median(training_set.flux[miles], axis=1)
    assert 0.2 < np.median(library_level) / np.median(real_level) < 5  # realistic flux levels
    test_files = set(training_set.source_id[training_set.split == "test"])
    assert not test_files & set(training_set.source_id[training_set.split != "test"])
