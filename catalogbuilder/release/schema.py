"""The columns of every release table, defined once (name, type, unit, description), and the turn of a frame of rows
into a typed astropy ``Table`` with units, descriptions and header cards, ready for :mod:`catalogbuilder.release.writer`.

Types: ``str`` (never None: missing text is ""), ``float64`` (missing: NaN), ``int64`` and ``bool`` (missing: the
column's ``fill``), ``Int64`` (nullable integer: a masked column, TNULL in FITS, null in Parquet; e.g. Gaia ids).
Units are astropy unit strings; a unit the FITS standard lacks (``dex``) is kept by the writer in the column comment.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from astropy.table import Column, MaskedColumn, Table

from catalogbuilder.calibrate.flags import FlagThresholds
from catalogbuilder.constants import FLAG_BAD_MASK, FLAG_SPECS, FLAG_WARN_MASK, NOISELESS_PREFIX
from catalogbuilder.release.writer import Card

DTYPES: tuple[str, ...] = ("str", "float64", "int64", "bool", "Int64")
PRIMARY_KEYS: tuple[str, ...] = ("SOFTVER", "SURVEY", "LEVEL", "MODEL", "WEIGHTS", "CREATED")  # also in the primary HDU


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """One release column: name, type (one of :data:`DTYPES`), astropy unit string ("" for none) and description;
    ``fill`` is the value of a missing ``int64``/``bool`` entry."""

    name: str
    dtype: str
    unit: str = ""
    description: str = ""
    fill: int | bool = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"column {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")


# label -> (unit, description of the value, short name used in the error descriptions)
LABELS: dict[str, tuple[str, str, str]] = {
    "teff": ("K", "effective temperature", "Teff"),
    "logg": ("dex", "surface gravity log10(g / cm s-2)", "log g"),
    "fe_h": ("dex", "[Fe/H]", "[Fe/H]"),
    "rv": ("km s-1", "radial velocity", "RV"),
}


def _value(label: str) -> ColumnSpec:
    unit, text, _ = LABELS[label]
    return ColumnSpec(label, "float64", unit, text)


def _error(label: str, prefix: str, text: str) -> ColumnSpec:
    """``<prefix><label>`` error column; ``text`` is formatted with the label's short name."""
    unit, _, short = LABELS[label]
    return ColumnSpec(f"{prefix}{label}", "float64", unit, text.format(short=short))


def _flag_group_text(group: str) -> str:
    return "any of " + ", ".join(spec.name for spec in FLAG_SPECS if spec.group == group)


RAW_ERROR_TEXT = "raw Monte-Carlo {short} scatter"
NOISELESS_TEXT = "{short} predicted from the spectrum without noise (the value is the median of the draws)"
FLAG_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("result_flags", "int64", "", "DR19 result flag bits (header FLAGnn cards)"),
    ColumnSpec("flag_warn", "bool", "", _flag_group_text("warn")),
    ColumnSpec("flag_bad", "bool", "", _flag_group_text("bad")),
)
PROVENANCE_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("model_name", "str", "", "model name"),
    ColumnSpec("weights_sha256", "str", "", "SHA-256 of the model weights"),
    ColumnSpec("software_version", "str", "", "catalogbuilder version that computed the row"),
    ColumnSpec("created", "str", "", "UTC time the result was computed (ISO 8601)"),
)
MISSING_BANDS = ColumnSpec("missing_bands", "str", "", "comma-separated missing photometric inputs")

# allStar / allVisit tables of the spectral models, in table order; the RV columns only for models that predict RV.
SPECTRAL_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("spectrum_id", "str", "", "unique spectrum id: survey-file_sha256[:16]-row"),
    ColumnSpec("source_id", "str", "", "survey object id (APOGEE_ID, BOSS/LAMOST designation)"),
    ColumnSpec("survey", "str", "", "apogee, boss or lamost"),
    ColumnSpec("kind", "str", "", "combined or visit"),
    ColumnSpec("file", "str", "", "absolute path of the source file"),
    ColumnSpec("file_sha256", "str", "", "SHA-256 of the source file"),
    ColumnSpec("row", "int64", "", "image row of the spectrum in the file", fill=-1),
    ColumnSpec("visit", "int64", "", "visit number (0 for combined spectra)"),
    ColumnSpec("ra", "float64", "deg", "right ascension (ICRS)"),
    ColumnSpec("dec", "float64", "deg", "declination (ICRS)"),
    ColumnSpec("snr", "float64", "", "survey signal-to-noise ratio"),
    ColumnSpec("mjd", "float64", "d", "modified Julian date of the observation"),
    ColumnSpec("good_pixel_fraction", "float64", "", "fraction of model-grid pixels with finite, positive flux"),
    ColumnSpec("flux_constant", "bool", "", "the flux has no variation (degenerate input)", fill=False),
    ColumnSpec("gaia_source_id", "Int64", "", "Gaia source_id of the counterpart (null when none or not in the catalog)"),
    ColumnSpec("gaia_sep_arcsec", "float64", "arcsec", "separation to the counterpart"),
    ColumnSpec("xmatch_catalog", "str", "", "catalog the counterpart was taken from"),
    ColumnSpec("phot_g_mean_mag", "float64", "mag", "Gaia G"),
    ColumnSpec("phot_bp_mean_mag", "float64", "mag", "Gaia BP"),
    ColumnSpec("phot_rp_mean_mag", "float64", "mag", "Gaia RP"),
    ColumnSpec("parallax", "float64", "mas", "Gaia parallax"),
    ColumnSpec("parallax_error", "float64", "mas", "Gaia parallax error"),
    ColumnSpec("tmass_j", "float64", "mag", "2MASS J"),
    ColumnSpec("tmass_h", "float64", "mag", "2MASS H"),
    ColumnSpec("tmass_k", "float64", "mag", "2MASS Ks"),
    ColumnSpec("e_tmass_j", "float64", "mag", "2MASS J error"),
    ColumnSpec("e_tmass_h", "float64", "mag", "2MASS H error"),
    ColumnSpec("e_tmass_k", "float64", "mag", "2MASS Ks error"),
    ColumnSpec("n_bands", "int64", "", "number of photometric inputs present (of G, BP, RP, J, H, K, parallax)"),
    MISSING_BANDS,
    _value("teff"),
    _error("teff", "e_", "recommended (DR19-calibrated) {short} error"),
    _value("logg"),
    _error("logg", "e_", "recommended {short} error"),
    _value("fe_h"),
    _error("fe_h", "e_", "recommended {short} error"),
    _value("rv"),
    _error("rv", "e_", "{short} error (the raw Monte-Carlo scatter)"),
    *(_error(label, "raw_e_", RAW_ERROR_TEXT) for label in ("teff", "logg", "fe_h", "rv")),
    *(_error(label, NOISELESS_PREFIX, NOISELESS_TEXT) for label in ("teff", "logg", "fe_h", "rv")),
    *FLAG_COLUMNS,
    ColumnSpec("status", "str", "", "ok or no_result"),
    ColumnSpec("reason", "str", "", "why a row has no or an unreliable result"),
    ColumnSpec("n_draws", "int64", "", "Monte-Carlo draws behind raw_e_*"),
    *PROVENANCE_COLUMNS,
)
RV_COLUMNS: frozenset[str] = frozenset({"rv", "e_rv", "raw_e_rv", f"{NOISELESS_PREFIX}rv"})

# allStar table of the photometric stage (sources with photometry but no spectrum).
PHOTOMETRIC_TARGETS: tuple[str, ...] = ("teff", "logg", "fe_h")
PHOTOMETRIC_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("object_id", "str", "", "id of the input row (its id column, or row<N>)"),
    ColumnSpec("ra", "float64", "deg", "right ascension (ICRS)"),
    ColumnSpec("dec", "float64", "deg", "declination (ICRS)"),
    *(spec for label in PHOTOMETRIC_TARGETS for spec in (
        _value(label),
        _error(label, "e_", "recommended {short} error: sqrt(raw_e**2 + test-split scatter**2)"),
        _error(label, "raw_e_", RAW_ERROR_TEXT),
        _error(label, NOISELESS_PREFIX, NOISELESS_TEXT.replace("spectrum", "photometry")),
    )),
    ColumnSpec("logteff", "float64", "", "log10(teff / K)"),
    ColumnSpec("raw_e_logteff", "float64", "", "raw Monte-Carlo log10(Teff) scatter"),
    ColumnSpec("n_inputs", "int64", "", "number of model inputs present"),
    MISSING_BANDS,
    *FLAG_COLUMNS,
    ColumnSpec("status", "str", "", "ok or no_result"),
    ColumnSpec("reason", "str", "", "why a row has no result"),
    ColumnSpec("n_draws", "int64", "", "Monte-Carlo draws behind raw_e_*"),
    ColumnSpec("seed", "int64", "", "seed of the row's Monte-Carlo draws"),
    *PROVENANCE_COLUMNS,
)


def spectral_columns(has_rv: bool) -> tuple[ColumnSpec, ...]:
    """:data:`SPECTRAL_COLUMNS` of a table, without the RV columns for models that do not predict RV."""
    return tuple(spec for spec in SPECTRAL_COLUMNS if has_rv or spec.name not in RV_COLUMNS)


def typed_frame(rows: pd.DataFrame, columns: Sequence[ColumnSpec]) -> pd.DataFrame:
    """The ``columns`` of ``rows`` in order with their types (a column ``rows`` lacks is entirely missing)."""
    typed = pd.DataFrame(index=rows.index)
    for spec in columns:
        values = rows[spec.name] if spec.name in rows.columns else pd.Series(np.nan, index=rows.index, dtype=object)
        if spec.dtype == "Int64":
            typed[spec.name] = values.astype("Int64")
        elif spec.dtype in ("int64", "bool"):
            typed[spec.name] = values.fillna(spec.fill).astype(spec.dtype)
        elif spec.dtype == "float64":
            typed[spec.name] = values.astype(np.float64)
        else:
            typed[spec.name] = values.fillna("").astype(str).astype(object)
    return typed


def to_table(rows: pd.DataFrame, columns: Sequence[ColumnSpec], meta: Mapping[str, object] | None = None) -> Table:
    """An astropy ``Table`` of the ``columns`` of ``rows`` (typed as :func:`typed_frame`) with units, descriptions and
    ``meta`` (FITS keyword → value or (value, comment)), as :func:`catalogbuilder.release.writer.write_table` takes it."""
    typed = typed_frame(rows, columns)
    table = Table(meta=dict(meta or {}))
    for spec in columns:
        values = typed[spec.name]
        if spec.dtype == "Int64":
            column = MaskedColumn(values.fillna(0).to_numpy(np.int64), mask=values.isna().to_numpy(), name=spec.name)
        elif spec.dtype == "str":
            column = Column(np.asarray(values.to_list(), dtype=str) if len(values) else np.zeros(0, "U1"), name=spec.name)
        else:
            column = Column(values.to_numpy(spec.dtype), name=spec.name)
        column.unit = spec.unit or None
        column.description = spec.description
        table.add_column(column)
    return table


def flag_cards(thresholds: FlagThresholds, required_bands: Sequence[str]) -> list[Card]:
    """Header cards of the flag bits (``FLAGnn``: name and rule with the thresholds in force) and the two masks."""
    rules = thresholds.describe(required_bands)
    cards: list[Card] = [(f"FLAG{spec.bit:02d}", f"{spec.name}: {rules[spec.flag]}", f"result_flags bit {spec.bit}")
                         for spec in FLAG_SPECS]
    cards.append(("FLAGWARN", int(FLAG_WARN_MASK), "flag_warn = result_flags & FLAGWARN != 0"))
    cards.append(("FLAGBAD", int(FLAG_BAD_MASK), "flag_bad = result_flags & FLAGBAD != 0"))
    return cards


def table_meta(cards: Sequence[Card]) -> dict[str, tuple[object, str]]:
    """``Table.meta`` of header cards: keyword → (value, comment)."""
    return {key: (value, comment) for key, value, comment in cards}
