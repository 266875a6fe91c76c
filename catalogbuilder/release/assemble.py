"""Release rows (SPEC §7), as pure functions over frames: which spectrum is a star's allStar row, which rows a table
gets, and one model's rows of a store range joined with its results and the cross-match, calibrated and flagged.

Which spectrum feeds which table (docs/release.md):

* **allStar** — one row per (survey, star, model): among the star's active ``combined`` spectra (apStar row 0,
  every BOSS/LAMOST spectrum) the one with the highest S/N (then the latest ingested). A star is
  ``(survey, source_id)``: APOGEE_ID, the BOSS catalog id or photometric object id, the LAMOST designation.
* **allVisit** — one row per visit spectrum: apStar visit rows and apVisit files; BOSS and LAMOST spectra, which have
  no separate star-level product here, are all listed as visits too.
* Rejected inputs are allStar rows with NO_RESULT (and an empty ``source_id``) in the tables of their survey.

apStar row 1 (``combined-alt``), superseded and retired spectra are in no table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from catalogbuilder import __version__
from catalogbuilder.calibrate.errors import calibrate_errors, calibration_relations
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags
from catalogbuilder.constants import KIND_COMBINED, KIND_VISIT, NOISELESS_PREFIX, SURVEYS_WITHOUT_STAR_SPECTRUM
from catalogbuilder.crossmatch.match import MATCH_COLUMNS, REQUIRED_BANDS, TMASS_COLUMNS
from catalogbuilder.release.schema import Card, flag_cards

LEVEL_STAR, LEVEL_VISIT = "allStar", "allVisit"
LEVELS: tuple[str, ...] = (LEVEL_STAR, LEVEL_VISIT)
UNKNOWN_SURVEY = "unknown"
NO_RESULT_REASON = "no result for this model"
REJECT_PREFIX = "rejected at ingest: "
VALUE_COLUMNS: tuple[str, ...] = tuple(  # NaN in NO_RESULT rows
    f"{prefix}{label}" for prefix in ("", "e_", "raw_e_", NOISELESS_PREFIX) for label in ("teff", "logg", "fe_h", "rv")
) + ("logteff", "raw_e_logteff", f"{NOISELESS_PREFIX}logteff")


def star_rows(star_key: np.ndarray, combined: np.ndarray, active: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """True for the spectrum that is its star's allStar row: per ``star_key``, among active combined spectra, the
    highest S/N (NaN lowest), then the highest position (the latest ingested). Arrays over one grid's positions."""
    chosen = np.zeros(len(star_key), dtype=bool)
    candidates = np.flatnonzero(np.asarray(active, bool) & np.asarray(combined, bool))
    if not len(candidates):
        return chosen
    quality = np.nan_to_num(np.asarray(snr, dtype=np.float64)[candidates], nan=-np.inf)
    order = np.lexsort((candidates, quality, np.asarray(star_key)[candidates]))  # last of each key is the best
    keys = np.asarray(star_key)[candidates][order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    chosen[candidates[order[last]]] = True
    return chosen


def table_levels(spectra: pd.DataFrame, is_star_row: np.ndarray) -> dict[str, np.ndarray]:
    """Per level, which rows of ``spectra`` (active, predicted kinds) the level's tables list."""
    kind = spectra["kind"].to_numpy(dtype=object)
    without_star_spectrum = spectra["survey"].isin(SURVEYS_WITHOUT_STAR_SPECTRUM).to_numpy()
    return {
        LEVEL_STAR: np.asarray(is_star_row, bool) & (kind == KIND_COMBINED),
        LEVEL_VISIT: (kind == KIND_VISIT) | ((kind == KIND_COMBINED) & without_star_spectrum),
    }


def reject_rows(rejects: pd.DataFrame) -> pd.DataFrame:
    """allStar rows for current rejects (``SpectrumStore.rejects``): the survey the ingest recorded (``unknown``
    when the file could not even be recognised), ``spectrum_id`` ``<survey>-<sha256[:16] or path key>-reject``."""
    columns = ["spectrum_id", "survey", "kind", "file", "file_sha256", "source_id", "row", "visit", "reject_reason"]
    if rejects is None or rejects.empty:
        return pd.DataFrame(columns=columns)
    survey = rejects["survey"].astype(str).replace("", UNKNOWN_SURVEY)
    key = rejects["file_sha256"].astype(str).str[:16].where(rejects["file_sha256"].astype(str) != "",
                                                           rejects["path_key"].map(lambda k: f"{int(k):016x}"))
    return pd.DataFrame({
        "spectrum_id": survey + "-" + key + "-reject",
        "survey": survey,
        "kind": KIND_COMBINED,
        "file": rejects["file_path"].astype(str),
        "file_sha256": rejects["file_sha256"].astype(str),
        "source_id": "",
        "row": -1,
        "visit": 0,
        "reject_reason": REJECT_PREFIX + rejects["reason"].astype(str),
    }, columns=columns).drop_duplicates("spectrum_id").reset_index(drop=True)


def model_rows(model_name: str, weights_sha256: str, inputs: pd.DataFrame, results: pd.DataFrame,
               matches: pd.DataFrame, created: str, thresholds: FlagThresholds) -> pd.DataFrame:
    """Rows of one model, calibrated and flagged: ``inputs`` (store columns of spectra, or :func:`reject_rows`)
    joined by ``spectrum_id`` with the model's result rows (none → NO_RESULT) and the cross-match rows."""
    rows = inputs.rename(columns={"file_path": "file"})
    result_columns = [c for c in results.columns if c not in ("position", "grid") and (c == "spectrum_id" or c not in rows)]
    rows = rows.merge(results[result_columns], on="spectrum_id", how="left", validate="one_to_one")
    match_columns = [c for c in MATCH_COLUMNS if c in matches.columns]
    rows = rows.drop(columns=[c for c in TMASS_COLUMNS if c in rows.columns])  # the match holds the 2MASS values used
    rows = rows.merge(matches[match_columns], on="spectrum_id", how="left", validate="one_to_one")
    rows["gaia_matched"] = rows.get("gaia_matched", pd.Series(False, index=rows.index)).astype("boolean").fillna(
        False).astype(bool)
    rows["missing_bands"] = rows.get("missing_bands", pd.Series(np.nan, index=rows.index)).fillna(",".join(REQUIRED_BANDS))
    rows["n_bands"] = rows.get("n_bands", pd.Series(0, index=rows.index)).fillna(0).astype(np.int64)
    for name, default in (("status", np.nan), ("reason", np.nan), ("weights_sha256", np.nan), ("software_version", np.nan),
                          ("created", np.nan), ("n_draws", np.nan)):
        if name not in rows:
            rows[name] = default
    no_row = rows["status"].isna()
    fallback = rows["reject_reason"] if "reject_reason" in rows else pd.Series(np.nan, index=rows.index)
    rows["reason"] = rows["reason"].where(~no_row, fallback.fillna(NO_RESULT_REASON))
    rows["status"] = rows["status"].fillna("no_result")
    rows["model_name"] = model_name
    rows["weights_sha256"] = rows["weights_sha256"].fillna(weights_sha256)
    rows["software_version"] = rows["software_version"].fillna(__version__)
    rows["created"] = rows["created"].fillna(created)
    rows["n_draws"] = rows["n_draws"].fillna(0).astype(np.int64)
    return apply_flags(calibrate_errors(rows), list(VALUE_COLUMNS), thresholds)


def header_cards(survey: str, model_name: str, level: str, weights_sha256: str, provenance: dict[str, str],
                 thresholds: FlagThresholds) -> list[Card]:
    """Header cards of a table: versions, model, weights, creation time, cross-match settings, one card per flag
    bit, the masks and the calibration relations (also in the Parquet metadata)."""
    cards: list[Card] = [
        ("SOFTVER", __version__, "catalogbuilder version that wrote the table"),
        ("SURVEY", survey, "survey of the spectra"),
        ("LEVEL", level, "allStar: one row per star; allVisit: one per visit spectrum"),
        ("MODEL", model_name, "model name"),
        ("WEIGHTS", weights_sha256, "SHA-256 of the model weights"),
        ("CREATED", provenance["created"], "UTC time the release was built"),
        ("SNAPSHOT", provenance["snapshot"], "spectrum store snapshot released"),
        ("XRADIUS", float(provenance["radius_arcsec"]), "[arcsec] cross-match radius"),
        ("XCATALOG", provenance["catalogs"], "cross-match catalogs, in priority order"),
        ("XEPOCH", provenance["epoch"], "catalog positions moved to this Julian year"),
    ]
    cards += flag_cards(thresholds, REQUIRED_BANDS)
    cards += [(f"CALIB{index}", relation, "DR19 error calibration relation")
              for index, relation in enumerate(calibration_relations(), start=1)]
    return cards


PRIMARY_KEYS: tuple[str, ...] = ("SOFTVER", "SURVEY", "LEVEL", "MODEL", "WEIGHTS", "CREATED")  # also in the primary HDU
