"""Release tables (SPEC §7): per survey and model an ``allStar`` (combined spectra) and an ``allVisit`` (visit spectra)
table, written as gzipped FITS and Parquet with the same content, one row per input spectrum — failed ones included.

The builder is a set of functions over pandas DataFrames (spectra metadata, results, cross-match, rejects), so it can be
used without a store; :func:`build_release` loads those frames from a spectrum store and writes every table.
Output: ``<out>/<survey>/<model>/allStar-<model>-<survey>.{fits.gz,parquet}`` and ``allVisit-...``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from catalogbuilder import __version__
from catalogbuilder.calibrate.errors import calibrate_errors, calibration_relations
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags, spectrum_quality
from catalogbuilder.constants import FLAG_BAD_MASK, FLAG_WARN_MASK, GRIDS, KIND_COMBINED, KIND_VISIT, SURVEY_GRID, ResultFlag
from catalogbuilder.crossmatch.match import DEFAULT_RADIUS_ARCSEC, REQUIRED_BANDS, TMASS_COLUMNS, CatalogColumns, crossmatch

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = FlagThresholds()
DEFAULT_COLUMNS = CatalogColumns()
LEVELS: dict[str, str] = {KIND_COMBINED: "allStar", KIND_VISIT: "allVisit"}
UNKNOWN_SURVEY = "unknown"
NO_RESULT_REASON = "no result for this model"

# (column, unit, description) in table order; rv columns only for models that predict RV.
RELEASE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("spectrum_id", "", "unique spectrum id: survey-file_sha256[:16]-row"),
    ("source_id", "", "survey object id (APOGEE_ID, BOSS/LAMOST designation)"),
    ("survey", "", "apogee, boss or lamost"),
    ("kind", "", "combined or visit"),
    ("file", "", "absolute path of the source file"),
    ("file_sha256", "", "SHA-256 of the source file"),
    ("row", "", "image row of the spectrum in the file"),
    ("visit", "", "visit number (0 for combined spectra)"),
    ("ra", "deg", "right ascension (ICRS)"),
    ("dec", "deg", "declination (ICRS)"),
    ("snr", "", "survey signal-to-noise ratio"),
    ("mjd", "d", "modified Julian date of the observation"),
    ("good_pixel_fraction", "", "fraction of model-grid pixels with finite, positive flux"),
    ("gaia_source_id", "", "Gaia source_id of the counterpart (null when none or not in the catalog)"),
    ("gaia_sep_arcsec", "arcsec", "separation to the counterpart"),
    ("xmatch_catalog", "", "catalog the counterpart was taken from"),
    ("phot_g_mean_mag", "mag", "Gaia G"),
    ("phot_bp_mean_mag", "mag", "Gaia BP"),
    ("phot_rp_mean_mag", "mag", "Gaia RP"),
    ("parallax", "mas", "Gaia parallax"),
    ("parallax_error", "mas", "Gaia parallax error"),
    ("tmass_j", "mag", "2MASS J"),
    ("tmass_h", "mag", "2MASS H"),
    ("tmass_k", "mag", "2MASS Ks"),
    ("e_tmass_j", "mag", "2MASS J error"),
    ("e_tmass_h", "mag", "2MASS H error"),
    ("e_tmass_k", "mag", "2MASS Ks error"),
    ("n_bands", "", "number of photometric inputs present (of G, BP, RP, J, H, K, parallax)"),
    ("missing_bands", "", "comma-separated missing photometric inputs"),
    ("teff", "K", "effective temperature"),
    ("e_teff", "K", "recommended (DR19-calibrated) Teff error"),
    ("logg", "dex", "surface gravity log10(g / cm s-2)"),
    ("e_logg", "dex", "recommended log g error"),
    ("fe_h", "dex", "[Fe/H]"),
    ("e_fe_h", "dex", "recommended [Fe/H] error"),
    ("rv", "km s-1", "radial velocity"),
    ("e_rv", "km s-1", "RV error (the raw Monte-Carlo scatter)"),
    ("raw_e_teff", "K", "raw Monte-Carlo Teff scatter"),
    ("raw_e_logg", "dex", "raw Monte-Carlo log g scatter"),
    ("raw_e_fe_h", "dex", "raw Monte-Carlo [Fe/H] scatter"),
    ("raw_e_rv", "km s-1", "raw Monte-Carlo RV scatter"),
    ("result_flags", "", "DR19 result flag bits (header FLAGnn cards)"),
    ("flag_warn", "", "any of E_*_LARGE, MISSING_PHOTOMETRY"),
    ("flag_bad", "", "any of *_UNRELIABLE, RESULT_UNRELIABLE, NO_RESULT"),
    ("status", "", "ok or no_result"),
    ("reason", "", "why a row has no or an unreliable result"),
    ("n_draws", "", "Monte-Carlo draws behind raw_e_*"),
    ("model_name", "", "model name"),
    ("weights_sha256", "", "SHA-256 of the model weights"),
    ("software_version", "", "catalogbuilder version that computed the row"),
    ("created", "", "UTC time the result was computed (ISO 8601)"),
)
NON_FITS_UNITS: frozenset[str] = frozenset({"dex"})  # the FITS standard has no "dex"; astropy warns on reading it
RV_COLUMNS: frozenset[str] = frozenset({"rv", "e_rv", "raw_e_rv"})
VALUE_COLUMNS: tuple[str, ...] = (
    "teff", "logg", "fe_h", "rv", "logteff", "e_teff", "e_logg", "e_fe_h", "e_rv",
    "raw_e_teff", "raw_e_logg", "raw_e_fe_h", "raw_e_rv", "raw_e_logteff",
)
# Rejected files have no survey; it is guessed from the standard file names so their NO_RESULT row lands in the right table.
SURVEY_FILE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("apogee", re.compile(r"^(apStar|asStar|apVisit|aspcapStar)-", re.IGNORECASE)),
    ("boss", re.compile(r"^(spec(Lite)?|spPlate)-\d{4,6}-\d{5}-\d{3,5}\.fits", re.IGNORECASE)),
    ("lamost", re.compile(r"^(spec|med)-\d{5}-[A-Za-z0-9]+_sp\d{2}-\d{3}\.fits", re.IGNORECASE)),
)


@dataclasses.dataclass(frozen=True)
class ReleaseTable:
    """One release table: its rows and what it is."""

    survey: str
    model_name: str
    level: str  # allStar | allVisit
    rows: pd.DataFrame

    @property
    def stem(self) -> str:
        """File name without suffix, e.g. ``allStar-apogeenet3-apogee``."""
        return f"{self.level}-{self.model_name}-{self.survey}"


def guess_survey(file_name: str) -> str:
    """Survey of a rejected file from its standard SDSS/LAMOST name, ``unknown`` when it does not look like one."""
    name = Path(str(file_name)).name
    return next((survey for survey, pattern in SURVEY_FILE_PATTERNS if pattern.match(name)), UNKNOWN_SURVEY)


def spectra_from_dataset(dataset: xr.Dataset, grid: str, input_quality: bool = True) -> pd.DataFrame:
    """Per-spectrum metadata of one store grid (its ``spectrum`` coordinates, ``file_path`` renamed ``file``) plus
    ``grid`` and, with ``input_quality``, the columns of :func:`~catalogbuilder.calibrate.flags.spectrum_quality`
    (a pass over every stored flux value; positions alone need none)."""
    frame = pd.DataFrame({
        name: (coord.values.astype(object) if coord.values.dtype.kind in "OTUS" else coord.values)
        for name, coord in dataset.coords.items() if coord.dims == ("spectrum",)
    })
    frame = frame.rename(columns={"file_path": "file"}).reset_index(drop=True)
    frame["grid"] = grid
    if not input_quality:
        return frame
    return pd.concat([frame, spectrum_quality(dataset["flux"].data)], axis=1)


def reject_rows(rejects: pd.DataFrame) -> pd.DataFrame:
    """Spectrum-like rows for files rejected at ingest (columns ``file``, ``sha256``, ``reason``): survey guessed from
    the name, kind ``combined``, ``spectrum_id`` ``<survey>-<sha256[:16]>-reject``."""
    if rejects is None or rejects.empty:
        return pd.DataFrame(columns=["spectrum_id", "survey", "kind", "file", "file_sha256", "reject_reason"])
    survey = rejects["file"].map(guess_survey)
    return pd.DataFrame({
        "spectrum_id": survey + "-" + rejects["sha256"].str[:16] + "-reject",
        "survey": survey,
        "kind": KIND_COMBINED,
        "file": rejects["file"].astype(str),
        "file_sha256": rejects["sha256"].astype(str),
        "source_id": "",
        "row": -1,
        "visit": 0,
        "reject_reason": "rejected at ingest: " + rejects["reason"].astype(str),
    }).drop_duplicates("spectrum_id")


def model_inputs(model_name: str, spectra: pd.DataFrame, results: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """The spectra a model answers for — every spectrum of the grid(s) it ran on, or all spectra when ``spectra``
    has no ``grid`` column — and the surveys whose rejected files belong in its tables."""
    own_ids = results.loc[results["model_name"] == model_name, "spectrum_id"]
    orphans = ~own_ids.isin(spectra["spectrum_id"])
    if orphans.any():
        log.warning("%s: %d results have no spectrum in the store and are not released", model_name, int(orphans.sum()))
    if "grid" not in spectra.columns:
        return spectra, set(spectra["survey"])
    grids = set(spectra.loc[spectra["spectrum_id"].isin(own_ids), "grid"])
    return spectra.loc[spectra["grid"].isin(grids)], {survey for survey, grid in SURVEY_GRID.items() if grid in grids}


def model_rows(
    model_name: str, inputs: pd.DataFrame, failed: pd.DataFrame, results: pd.DataFrame, matches: pd.DataFrame,
    created: str, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
) -> pd.DataFrame:
    """Every row of one model, calibrated and flagged: its input spectra and failed files (:func:`reject_rows`)
    joined with its results (none → NO_RESULT) and the cross-match."""
    own = results.loc[results["model_name"] == model_name]
    rows = pd.concat([inputs, failed], ignore_index=True)
    rows = rows.merge(own, on="spectrum_id", how="left", validate="one_to_one")
    header_photometry = [name for name in TMASS_COLUMNS if name in rows.columns]  # merged into the cross-match already
    rows = rows.drop(columns=header_photometry).merge(matches, on="spectrum_id", how="left", validate="one_to_one")
    rows["gaia_matched"] = rows["gaia_matched"].astype("boolean").fillna(False).astype(bool)
    rows["missing_bands"] = rows["missing_bands"].fillna(",".join(REQUIRED_BANDS))
    rows["n_bands"] = rows["n_bands"].fillna(0).astype(np.int64)
    no_row = rows["status"].isna()
    rows["reason"] = rows["reason"].where(~no_row, rows.get("reject_reason", pd.Series(index=rows.index)).fillna(NO_RESULT_REASON))
    rows["status"] = rows["status"].fillna("no_result")
    rows["model_name"] = model_name
    weights = own["weights_sha256"].dropna().unique()
    rows["weights_sha256"] = rows["weights_sha256"].fillna(weights[0] if len(weights) else "")
    rows["software_version"] = rows["software_version"].fillna(__version__)
    rows["created"] = rows["created"].fillna(created)
    rows["n_draws"] = rows["n_draws"].fillna(0).astype(np.int64)
    calibrated = calibrate_errors(rows)
    return apply_flags(calibrated, list(VALUE_COLUMNS), thresholds)


def release_columns(has_rv: bool) -> list[tuple[str, str, str]]:
    """The :data:`RELEASE_COLUMNS` of a table, without the RV columns for models that do not predict RV."""
    return [column for column in RELEASE_COLUMNS if has_rv or column[0] not in RV_COLUMNS]


def _typed(rows: pd.DataFrame, has_rv: bool) -> pd.DataFrame:
    """The release columns in order with fixed dtypes: str (no None), float64, int64, bool, nullable Int64 id."""
    table = pd.DataFrame(index=rows.index)
    for name, _, _ in release_columns(has_rv):
        values = rows[name] if name in rows.columns else pd.Series(np.nan, index=rows.index)
        if name == "gaia_source_id":
            table[name] = values.astype("Int64")
        elif name in {"row", "visit", "n_bands", "n_draws", "result_flags"}:
            table[name] = values.fillna(-1 if name == "row" else 0).astype(np.int64)
        elif name in {"flag_warn", "flag_bad"}:
            table[name] = values.astype(bool)
        elif values.dtype.kind in "fiu" and name not in {"source_id", "reason", "missing_bands"}:
            table[name] = values.astype(np.float64)
        else:
            table[name] = values.fillna("").astype(str).astype(object)
    return table.sort_values("spectrum_id", kind="stable").reset_index(drop=True)


def assemble_release(
    spectra: pd.DataFrame, results: pd.DataFrame, matches: pd.DataFrame, rejects: pd.DataFrame | None = None,
    thresholds: FlagThresholds = DEFAULT_THRESHOLDS, created: str | None = None,
) -> list[ReleaseTable]:
    """Release tables of every model in ``results``, split by survey and level (combined → allStar, visit → allVisit),
    rows sorted by ``spectrum_id``. A rejected file is listed by the models of its survey's grid, or by every model
    when none covers its survey (so no input is ever missing). Empty tables are not produced."""
    created = created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rejects = rejects if rejects is not None else pd.DataFrame(columns=["file", "sha256", "reason"])
    models = sorted(results["model_name"].dropna().unique())
    inputs = {model_name: model_inputs(model_name, spectra, results) for model_name in models}
    failed = reject_rows(rejects)
    covered = set().union(*(surveys for _, surveys in inputs.values()))
    homeless = failed.loc[~failed["survey"].isin(covered)]  # no model covers their survey: listed by every model
    tables = []
    for model_name in models:
        model_spectra, surveys = inputs[model_name]
        model_failed = pd.concat([failed.loc[failed["survey"].isin(surveys)], homeless], ignore_index=True)
        rows = model_rows(model_name, model_spectra, model_failed, results, matches, created, thresholds)
        has_rv = "rv" in results.columns and results.loc[results["model_name"] == model_name, "rv"].notna().any()
        for (survey, kind), group in rows.groupby(["survey", "kind"], sort=True):
            if kind in LEVELS:
                tables.append(ReleaseTable(str(survey), model_name, LEVELS[kind], _typed(group, bool(has_rv))))
    return tables


def header_cards(table: ReleaseTable, thresholds: FlagThresholds, provenance: dict[str, str]) -> list[tuple[str, object, str]]:
    """FITS header cards of a table: versions, model, weights, creation time, one card per flag bit, the masks and
    the calibration relations (also stored as Parquet metadata)."""
    rows = table.rows
    weights = sorted(set(rows["weights_sha256"]) - {""})
    cards: list[tuple[str, object, str]] = [
        ("SOFTVER", __version__, "catalogbuilder version that wrote the table"),
        ("SURVEY", table.survey, "survey of the spectra"),
        ("LEVEL", table.level, "allStar: combined spectra; allVisit: visits"),
        ("MODEL", table.model_name, "model name"),
        ("WEIGHTS", weights[0] if len(weights) == 1 else ",".join(weights), "SHA-256 of the model weights"),
        ("CREATED", provenance["created"], "UTC time the release was built"),
        ("NROWS", len(rows), "rows, one per input spectrum"),
        ("XRADIUS", float(provenance["radius_arcsec"]), "[arcsec] cross-match radius"),
        ("XCATALOG", provenance["catalogs"], "cross-match catalogs, in priority order"),
        ("XEPOCH", provenance.get("epoch", "as given"), "catalog positions moved to this Julian year"),
    ]
    descriptions = thresholds.describe(REQUIRED_BANDS)
    for bit in ResultFlag:
        cards.append((f"FLAG{bit.bit_length() - 1:02d}", f"{bit.name}: {descriptions[bit]}", f"result_flags bit {bit.bit_length() - 1}"))
    cards.append(("FLAGWARN", int(FLAG_WARN_MASK), "flag_warn = result_flags & FLAGWARN != 0"))
    cards.append(("FLAGBAD", int(FLAG_BAD_MASK), "flag_bad = result_flags & FLAGBAD != 0"))
    for index, relation in enumerate(calibration_relations(), start=1):
        cards.append((f"CALIB{index}", relation, "DR19 error calibration relation"))
    return cards


def _fits_card(key: str, value: object, comment: str) -> fits.Card:
    """A header card; the comment is left out when it would not fit beside the value (long values use CONTINUE)."""
    fits_width = 80 - 10 - 3  # after "KEYWORD = " and " / "
    return fits.Card(key, value, comment if len(repr(value)) + len(comment) <= fits_width - 2 else "")


def fits_ready(table: Table) -> Table:
    """``table`` with its object (str) columns as fixed-width ASCII strings, at least one character wide: FITS holds
    ASCII only, so other characters (e.g. in a file path or a reject reason) are written as Python escapes (``\\xc5``);
    the Parquet table keeps them as they are."""
    for name in table.colnames:
        if table[name].dtype.kind in "OU":
            values = [str(value).encode("ascii", "backslashreplace").decode("ascii") for value in table[name]]
            table[name] = np.asarray(values, dtype=f"U{max(1, max(map(len, values), default=1))}")
    return table


def write_table(table: ReleaseTable, out_dir: str | Path, thresholds: FlagThresholds, provenance: dict[str, str]) -> tuple[Path, Path]:
    """Write ``<out>/<survey>/<model>/<stem>.fits.gz`` and ``.parquet``; returns both paths."""
    folder = Path(out_dir) / table.survey / table.model_name
    folder.mkdir(parents=True, exist_ok=True)
    has_rv = "rv" in table.rows.columns
    units = {name: (unit, text) for name, unit, text in release_columns(has_rv)}
    cards = header_cards(table, thresholds, provenance)

    astropy_table = fits_ready(Table.from_pandas(table.rows))
    hdu = fits.BinTableHDU(astropy_table, name=table.level.upper())
    for index, name in enumerate(astropy_table.colnames, start=1):
        unit, text = units[name]
        if unit in NON_FITS_UNITS:  # not a FITS unit string: said in the column comment instead
            text = f"[{unit}] {text}"
        elif unit:
            hdu.header[f"TUNIT{index}"] = unit
        hdu.header[f"TCOMM{index}"] = text
    for card in cards:
        hdu.header.append(_fits_card(*card))
    fits_path = folder / f"{table.stem}.fits.gz"
    primary = fits.PrimaryHDU(header=fits.Header([_fits_card(*card) for card in cards[:6]]))
    fits.HDUList([primary, hdu]).writeto(fits_path, overwrite=True)

    arrow = pa.Table.from_pandas(table.rows, preserve_index=False)
    metadata = {
        "catalogbuilder": json.dumps({key: value for key, value, _ in cards}),
        "units": json.dumps({name: unit for name, (unit, _) in units.items() if unit}),
    }
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    parquet_path = folder / f"{table.stem}.parquet"
    temporary = parquet_path.with_name(f".{parquet_path.name}.tmp")
    pq.write_table(arrow, temporary)
    temporary.replace(parquet_path)
    return fits_path, parquet_path


def store_spectra(store_path: str | Path, input_quality: bool = True) -> pd.DataFrame:
    """:func:`spectra_from_dataset` of every grid of a spectrum store, concatenated."""
    from catalogbuilder.store.spectra import SpectrumStore

    store = SpectrumStore.open(store_path)
    grids = [spectra_from_dataset(dataset, grid, input_quality)
             for grid in GRIDS if (dataset := store.dataset(grid)) is not None]
    return pd.concat(grids, ignore_index=True) if grids else pd.DataFrame(columns=["spectrum_id", "ra", "dec", "grid"])


def load_store_frames(store_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(spectra, results, rejects) of a spectrum store: the per-spectrum coordinates and input quality of every grid,
    the latest results of every model (``ResultsStore.read``), and the rejected files."""
    from catalogbuilder.inference.results import ResultsStore
    from catalogbuilder.store.spectra import SpectrumStore

    results = ResultsStore.for_store(store_path).read()
    return store_spectra(store_path), results, SpectrumStore.open(store_path).rejects()


def build_release(
    store_path: str | Path, out_dir: str | Path, catalogs: Sequence[str | Path] = (), radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    columns: CatalogColumns = DEFAULT_COLUMNS, thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
    margin_cache: str | Path | None = None, epoch: float | None = None,
) -> list[ReleaseTable]:
    """Cross-match (``epoch``: see :func:`~catalogbuilder.crossmatch.match.crossmatch`), calibrate, flag and write every
    release table of the store at ``store_path`` into ``out_dir``, plus ``crossmatch.parquet`` and the summary
    (``summary.csv``/``summary.json``, ``kiel-<model>.png``). Returns the tables."""
    from catalogbuilder.release.summary import write_summary

    spectra, results, rejects = load_store_frames(store_path)
    if results.empty:
        raise ValueError(f"{store_path} holds no results: run inference before the release")
    matches = crossmatch(spectra, catalogs, radius_arcsec, columns, margin_cache=margin_cache, epoch=epoch)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    tables = assemble_release(spectra, results, matches, rejects, thresholds, created)
    provenance = {"created": created, "radius_arcsec": str(radius_arcsec), "catalogs": ",".join(Path(c).name for c in catalogs),
                  "epoch": "as given" if epoch is None else f"{epoch:g}"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matches.to_parquet(out_dir / "crossmatch.parquet", index=False)
    for table in tables:
        write_table(table, out_dir, thresholds, provenance)
    write_summary(tables, out_dir)
    return tables
