"""DR19 error calibration and result flags: every bit at its thresholds, random property checks, NO_RESULT rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from catalogbuilder.calibrate.errors import calibrate_errors, calibration_relations
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags, flag_bad, flag_warn, result_flags
from catalogbuilder.constants import ERROR_CALIBRATION, FLAG_BAD_MASK, FLAG_WARN_MASK, ResultFlag

SAMPLE_APSTAR = Path(__file__).resolve().parents[1] / "catalogbuilder/data/sample/apogee/apStar-dr17-2M19485057+5005279.fits"
THRESHOLDS = FlagThresholds()
F = ResultFlag


def good_row(**changes: object) -> pd.DataFrame:
    """A calibrated row that sets no bit (a 5000 K dwarf with small errors and full photometry), with changes."""
    row = {
        "status": "ok", "teff": 5000.0, "logg": 4.4, "fe_h": 0.0,
        "raw_e_teff": 40.0, "raw_e_logg": 0.05, "raw_e_fe_h": 0.04,
        "snr": 100.0, "good_pixel_fraction": 0.95, "flux_constant": False, "gaia_matched": True, "missing_bands": "",
    }
    row.update(changes)
    return calibrate_errors(pd.DataFrame([row]))


def flags_of(**changes: object) -> int:
    return int(result_flags(good_row(**changes), THRESHOLDS)[0])


def test_good_row_sets_no_flag() -> None:
    assert flags_of() == 0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # bit 0: 3.1 < log10(teff) < 4.7 (10**3.1 = 1258.9 K, 10**4.7 = 50118.7 K)
        ({"teff": 1259.0}, 0), ({"teff": 1258.0}, F.TEFF_UNRELIABLE), ({"teff": 10**3.1}, F.TEFF_UNRELIABLE),
        ({"teff": 6600.0}, 0), ({"teff": -5.0}, F.TEFF_UNRELIABLE),
        # bit 1: -1.5 < logg < 6
        ({"logg": 5.999}, 0), ({"logg": 6.0}, F.LOGG_UNRELIABLE), ({"logg": -1.499}, 0), ({"logg": -1.5}, F.LOGG_UNRELIABLE),
        # bit 2: -2 < fe_h < 0.5, or log10(teff) > 3.82 (6606.9 K), value kept
        ({"fe_h": 0.499}, 0), ({"fe_h": 0.5}, F.FE_H_UNRELIABLE), ({"fe_h": -1.999}, 0), ({"fe_h": -2.0}, F.FE_H_UNRELIABLE),
        ({"teff": 6606.0}, 0), ({"teff": 6608.0}, F.FE_H_UNRELIABLE),
        # bits 3-5: raw error not finite or not positive
        ({"raw_e_teff": 0.0}, F.E_TEFF_UNRELIABLE), ({"raw_e_teff": np.nan}, F.E_TEFF_UNRELIABLE),
        ({"raw_e_teff": np.inf}, F.E_TEFF_UNRELIABLE), ({"raw_e_teff": 1e-9}, 0),
        ({"raw_e_logg": -0.1}, F.E_LOGG_UNRELIABLE), ({"raw_e_logg": np.nan}, F.E_LOGG_UNRELIABLE),
        ({"raw_e_fe_h": 0.0}, F.E_FE_H_UNRELIABLE), ({"raw_e_fe_h": -np.inf}, F.E_FE_H_UNRELIABLE),
        # bits 6-8 on the calibrated error: e_teff > 0.05 teff (250 K at 5000 K: raw 192 K), e_logg > 0.3, e_fe_h > 0.3
        ({"raw_e_teff": 191.9}, 0), ({"raw_e_teff": 192.1}, F.E_TEFF_LARGE),
        ({"raw_e_logg": 0.2311}, 0), ({"raw_e_logg": 0.2322}, F.E_LOGG_LARGE),
        ({"raw_e_fe_h": 0.2899}, 0), ({"raw_e_fe_h": 0.2901}, F.E_FE_H_LARGE),
        # bit 9: no counterpart or a missing band
        ({"gaia_matched": False}, F.MISSING_PHOTOMETRY), ({"missing_bands": "phot_bp_mean_mag"}, F.MISSING_PHOTOMETRY),
        # bit 10: snr < 10, good-pixel fraction < 0.5, constant flux; unknown snr is not low
        ({"snr": 10.0}, 0), ({"snr": 9.99}, F.RESULT_UNRELIABLE), ({"snr": np.nan}, 0),
        ({"good_pixel_fraction": 0.5}, 0), ({"good_pixel_fraction": 0.49}, F.RESULT_UNRELIABLE),
        ({"flux_constant": True}, F.RESULT_UNRELIABLE),
        # bit 10 also outside the model's training domain (inference column outside_domain), only for real results
        ({"outside_domain": 1.0}, F.RESULT_UNRELIABLE), ({"outside_domain": 0.0}, 0), ({"outside_domain": np.nan}, 0),
        ({"outside_domain": 1.0, "status": "no_result"}, F.NO_RESULT),
        # bit 11: status or non-finite values; the value/error bits are then not evaluated
        ({"status": "no_result"}, F.NO_RESULT), ({"teff": np.nan}, F.NO_RESULT), ({"logg": np.inf}, F.NO_RESULT),
        ({"fe_h": -np.inf, "raw_e_fe_h": np.nan}, F.NO_RESULT),
        ({"status": "no_result", "gaia_matched": False, "snr": 3.0}, F.NO_RESULT | F.MISSING_PHOTOMETRY | F.RESULT_UNRELIABLE),
    ],
)
def test_each_bit_at_its_threshold(changes: dict, expected: int) -> None:
    assert flags_of(**changes) == int(expected), [bit.name for bit in F if flags_of(**changes) & bit]


def test_thresholds_are_configurable() -> None:
    strict = FlagThresholds(e_logg_max=0.05, snr_min=200.0)
    flags = int(result_flags(good_row(), strict)[0])
    assert flags == int(F.E_LOGG_LARGE | F.RESULT_UNRELIABLE)  # e_logg = 1.25*0.05 + 0.01 = 0.0725


def test_warn_and_bad_follow_the_dr19_masks_for_every_flag_value() -> None:
    every = np.arange(1 << len(ResultFlag), dtype=np.int64)
    assert np.array_equal(flag_warn(every), (every & int(FLAG_WARN_MASK)) != 0)
    assert np.array_equal(flag_bad(every), (every & int(FLAG_BAD_MASK)) != 0)
    warn_bits = {F.E_TEFF_LARGE, F.E_LOGG_LARGE, F.E_FE_H_LARGE, F.MISSING_PHOTOMETRY}
    for bit in ResultFlag:  # each bit alone: warn xor bad, as the DR19 page lists them
        assert bool(flag_warn(np.array([int(bit)]))[0]) == (bit in warn_bits)
        assert bool(flag_bad(np.array([int(bit)]))[0]) == (bit not in warn_bits)


def _expected_bits(row: pd.Series) -> int:
    """The flag rules written out per row, independently of the vectorised implementation."""
    no_result = row["status"] != "ok" or not all(np.isfinite(row[k]) for k in ("teff", "logg", "fe_h"))
    bits = int(F.NO_RESULT) if no_result else 0
    if not no_result:
        log_teff = np.log10(row["teff"]) if row["teff"] > 0 else -np.inf
        bits |= int(F.TEFF_UNRELIABLE) * (not 3.1 < log_teff < 4.7)
        bits |= int(F.LOGG_UNRELIABLE) * (not -1.5 < row["logg"] < 6)
        bits |= int(F.FE_H_UNRELIABLE) * ((not -2 < row["fe_h"] < 0.5) or log_teff > 3.82)
        for label, unreliable, large, limit in (
            ("teff", F.E_TEFF_UNRELIABLE, F.E_TEFF_LARGE, 0.05 * row["teff"] if row["teff"] > 0 else np.inf),
            ("logg", F.E_LOGG_UNRELIABLE, F.E_LOGG_LARGE, 0.3),
            ("fe_h", F.E_FE_H_UNRELIABLE, F.E_FE_H_LARGE, 0.3),
        ):
            raw = row[f"raw_e_{label}"]
            if not (np.isfinite(raw) and raw > 0):
                bits |= int(unreliable)
            elif row[f"e_{label}"] > limit:
                bits |= int(large)
    bits |= int(F.MISSING_PHOTOMETRY) * (not row["gaia_matched"] or row["missing_bands"] != "")
    bits |= int(F.RESULT_UNRELIABLE) * (row["snr"] < 10 or row["good_pixel_fraction"] < 0.5 or row["flux_constant"])
    return bits


def test_random_rows_match_the_rules_written_out() -> None:
    rng = np.random.default_rng(19)
    n = 3000

    def spiced(values: np.ndarray) -> np.ndarray:  # about 8% NaN / +inf / -inf
        pick = rng.random(n)
        return np.where(pick < 0.03, np.nan, np.where(pick < 0.05, np.inf, np.where(pick < 0.08, -np.inf, values)))

    frame = calibrate_errors(pd.DataFrame({
        "status": rng.choice(["ok", "ok", "ok", "no_result"], n),
        "teff": spiced(10 ** rng.uniform(2.9, 4.9, n)), "logg": spiced(rng.uniform(-2.5, 7, n)),
        "fe_h": spiced(rng.uniform(-3, 1, n)),
        "raw_e_teff": spiced(rng.uniform(-50, 800, n)), "raw_e_logg": spiced(rng.uniform(-0.1, 0.6, n)),
        "raw_e_fe_h": spiced(rng.uniform(-0.1, 0.6, n)), "snr": spiced(rng.uniform(0, 60, n)),
        "good_pixel_fraction": rng.uniform(0, 1, n), "flux_constant": rng.random(n) < 0.05,
        "gaia_matched": rng.random(n) < 0.8, "missing_bands": rng.choice(["", "", "", "phot_bp_mean_mag,phot_rp_mean_mag"], n),
    }))
    flags = result_flags(frame, THRESHOLDS)
    expected = np.array([_expected_bits(row) for _, row in frame.iterrows()])
    mismatched = np.flatnonzero(flags != expected)
    assert mismatched.size == 0, frame.iloc[mismatched[:3]].T
    for bit in ResultFlag:  # the random rows exercise every bit both ways
        assert 0 < ((flags & int(bit)) != 0).sum() < n, bit.name


def test_apply_flags_blanks_values_of_no_result_rows_and_keeps_hot_star_fe_h() -> None:
    frame = pd.concat([good_row(status="no_result"), good_row(teff=9000.0, fe_h=-0.4)], ignore_index=True)
    flagged = apply_flags(frame, ["teff", "logg", "fe_h", "e_teff", "e_logg", "e_fe_h", "raw_e_teff"], THRESHOLDS)
    assert flagged.loc[0, ["teff", "logg", "fe_h", "e_teff", "e_logg", "e_fe_h", "raw_e_teff"]].isna().all()
    assert flagged.loc[0, "result_flags"] == int(F.NO_RESULT) and flagged.loc[0, "flag_bad"]
    assert flagged.loc[1, "fe_h"] == -0.4  # kept, but flagged unreliable (log10(9000) > 3.82)
    assert flagged.loc[1, "result_flags"] == int(F.FE_H_UNRELIABLE) and flagged.loc[1, "flag_bad"] and not flagged.loc[1, "flag_warn"]


def test_dr19_error_calibration_keeps_raw_errors() -> None:
    frame = pd.DataFrame({"teff": [5000.0, 4000.0], "raw_e_teff": [40.0, np.nan], "raw_e_logteff": [0.01, 0.002],
                          "raw_e_logg": [0.1, 0.0], "raw_e_fe_h": [0.05, np.nan], "raw_e_rv": [3.0, 1.0]})
    calibrated = calibrate_errors(frame)
    assert np.allclose(calibrated["e_teff"], [1.25 * 40 + 10, 1.25 * 4000 * np.log(10) * 0.002 + 10])
    assert np.allclose(calibrated["raw_e_teff"], [40.0, 4000 * np.log(10) * 0.002])  # filled from raw_e_logteff
    assert np.allclose(calibrated["e_logg"], [1.25 * 0.1 + 0.01, 0.01])
    assert calibrated.loc[0, "e_fe_h"] == pytest.approx(0.06) and np.isnan(calibrated.loc[1, "e_fe_h"])
    assert list(calibrated["e_rv"]) == [3.0, 1.0] and list(calibrated["raw_e_logg"]) == [0.1, 0.0]
    assert calibration_relations()[:3] == [f"e_{k} = {s:g}*raw_e_{k} + {o:g}" for k, (s, o) in ERROR_CALIBRATION.items()]


def test_input_quality_of_a_real_apstar_with_an_all_zero_row() -> None:
    """The quality the ingest stores for the flags: row 0 mostly good, row 1 (all 0) and a row whose errors are
    useless (APOGEE's 1e10 bad-pixel value everywhere) have no good pixel; an all-NaN row is a constant input."""
    from catalogbuilder.store.quality import flux_constant, good_pixel_fraction

    flux = fits.getdata(SAMPLE_APSTAR, 1).astype(np.float64)  # row 0 combined spectrum, row 1 entirely 0
    error = fits.getdata(SAMPLE_APSTAR, 2).astype(np.float64)
    good = good_pixel_fraction(flux, error)
    assert 0.8 < good[0] < 1.0 and good[1] == 0.0
    assert flux_constant(flux).tolist() == [False, True]
    assert good_pixel_fraction(flux[:1], np.full_like(flux[:1], 1e10))[0] == 0.0
    assert good_pixel_fraction(flux[:1], np.zeros_like(flux[:1]))[0] == 0.0
    assert flux_constant(np.full((1, 10), np.nan))[0]
