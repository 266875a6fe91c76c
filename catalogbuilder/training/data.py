"""Training data: joining spectra to a label table, label → target conversion, z-score stats and splits by star.

Canonical label names are the pipeline's output names: ``teff`` (K), ``logg`` (dex), ``fe_h`` (dex), ``rv`` (km/s).
BossNet-family targets are ``logg, logTeff, FeH[, rv]`` (``constants.BOSSNET_PARAMS_BOSS`` order); APOGEE Net I trains
``logg, Teff, FeH`` (Teff linear, K), APOGEE Net II ``logg, logTeff, FeH``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from catalogbuilder.tables import as_measured, read_table

log = logging.getLogger(__name__)

CANONICAL_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "rv")
# model target name -> canonical label it is computed from
TARGET_SOURCE: dict[str, str] = {"logg": "logg", "logTeff": "teff", "Teff": "teff", "FeH": "fe_h", "rv": "rv"}
JOIN_MODES: tuple[str, ...] = ("source_id", "file")
DEFAULT_KEY_COLUMN: dict[str, str] = {"source_id": "source_id", "file": "filename"}
SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


def parse_label_columns(spec: str) -> dict[str, str]:
    """Parse ``teff=TEFF,logg=LOGG,fe_h=FEH`` into ``{canonical: table column}``."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, column = item.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not column:
            raise ValueError(f"label column {item!r} must look like name=COLUMN")
        if name not in CANONICAL_LABELS:
            raise ValueError(f"unknown label {name!r}; expected one of {CANONICAL_LABELS}")
        mapping[name] = column
    if not mapping:
        raise ValueError("no label columns given")
    return mapping


def read_label_table(path: str | Path) -> pd.DataFrame:
    """A label table (any format :func:`catalogbuilder.tables.read_table` reads: FITS, CSV, Parquet, ...)."""
    return read_table(path)


def _file_key(name: str) -> str:
    """Match key of a spectrum file: its base name without a trailing ``.gz`` (labels often omit the compression)."""
    base = Path(str(name).strip()).name
    return base[:-3] if base.endswith(".gz") else base


def _label_column(table: pd.DataFrame, column: str, missing_value: float | None) -> np.ndarray:
    """A label column as float64, NaN where missing: the missing-value policy of :mod:`catalogbuilder.tables`
    (null, non-finite, ≤ −999) and, when given, the table's own ``missing_value``."""
    if column not in table.columns:
        raise KeyError(f"label column {column!r} not in the table (columns: {', '.join(map(str, table.columns))})")
    values = as_measured(table[column])
    if missing_value is not None:
        values[values == missing_value] = np.nan
    return values


def join_labels(
    spectra: pd.DataFrame,
    table: pd.DataFrame,
    label_columns: Mapping[str, str],
    join_on: str = "source_id",
    key_column: str | None = None,
    missing_value: float | None = None,
) -> pd.DataFrame:
    """Labels for each spectrum row, in the row order of ``spectra``.

    spectra: one row per spectrum with ``source_id`` and ``file_path`` (the store's per-spectrum coordinates).
    join_on ``source_id``: the table's ``key_column`` (default ``source_id``) equals the spectrum's object id
    (stripped strings); ``file``: the table's ``key_column`` (default ``filename``) equals the spectrum file's base name,
    a trailing ``.gz`` ignored on both sides. Several spectra may share a label row (visits of one star); two label
    rows with one key are ambiguous and raise ``ValueError``. Returns the canonical label columns (NaN where missing)
    plus ``matched`` (bool); unmatched spectra keep NaN labels and are left out of training by the caller. A label is
    missing by the policy of :mod:`catalogbuilder.tables` (null, non-finite, ≤ −999) or where it equals the table's
    own ``missing_value`` placeholder.
    """
    if join_on not in JOIN_MODES:
        raise ValueError(f"join_on must be one of {JOIN_MODES}, got {join_on!r}")
    key_column = key_column or DEFAULT_KEY_COLUMN[join_on]
    if key_column not in table.columns:
        raise KeyError(f"key column {key_column!r} not in the label table (columns: {', '.join(map(str, table.columns))})")
    table_keys = table[key_column].astype(str).where(table[key_column].notna(), "").str.strip().reset_index(drop=True)
    if join_on == "file":
        table_keys = table_keys.map(_file_key)
        spectrum_keys = spectra["file_path"].astype(str).map(_file_key)
    else:
        spectrum_keys = spectra["source_id"].astype(str).str.strip()
    duplicated = table_keys[table_keys.duplicated() & (table_keys != "")]
    if len(duplicated):
        raise ValueError(f"{len(duplicated)} keys appear twice in label column {key_column!r}, "
                         f"e.g. {duplicated.iloc[0]!r}")
    labels = pd.DataFrame({name: _label_column(table, column, missing_value) for name, column in label_columns.items()})
    labels.index = table_keys
    labels = labels[table_keys.to_numpy() != ""]  # rows without a key can match no spectrum
    joined = labels.reindex(spectrum_keys.to_numpy())
    joined.index = spectra.index
    joined["matched"] = spectrum_keys.isin(set(labels.index)).to_numpy()
    for name in CANONICAL_LABELS:
        if name not in joined:
            joined[name] = np.nan
    log.info("labels joined on %s: %d of %d spectra matched", join_on, int(joined["matched"].sum()), len(joined))
    return joined[[*CANONICAL_LABELS, "matched"]]


def labels_to_targets(labels: pd.DataFrame, targets: Sequence[str]) -> np.ndarray:
    """(N, T) float64 target matrix in ``targets`` order (names of :data:`TARGET_SOURCE`); logTeff = log10(teff),
    NaN where teff is missing or ≤ 0; Teff = teff (K)."""
    columns = []
    for target in targets:
        values = labels[TARGET_SOURCE[target]].to_numpy(dtype=float)
        if target == "logTeff":
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(values > 0, np.log10(values), np.nan)
        columns.append(values)
    return np.column_stack(columns)


def fit_stats(targets: np.ndarray, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``{target: (MEAN, STD)}`` over the finite values of each column (the training set's z-score constants)."""
    stats: dict[str, tuple[float, float]] = {}
    for column, name in enumerate(names):
        values = targets[:, column]
        values = values[np.isfinite(values)]
        if values.size < 2 or values.std() == 0:
            raise ValueError(f"target {name!r} has fewer than 2 distinct labelled values in the training set")
        stats[name] = (float(values.mean()), float(values.std()))
    return stats


def standardise(targets: np.ndarray, names: Sequence[str], stats: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """Z-score each target column with ``stats`` (NaN stays NaN)."""
    means = np.array([stats[name][0] for name in names])
    stds = np.array([stats[name][1] for name in names])
    return (targets - means) / stds


def write_stats_yaml(path: str | Path, stats: Mapping[str, tuple[float, float]]) -> None:
    """Write z-score constants in the reference ``stats.yaml`` layout: ``{target: {MEAN: m, STD: s}}``."""
    content = {name: {"MEAN": float(mean), "STD": float(std)} for name, (mean, std) in stats.items()}
    Path(path).write_text(yaml.safe_dump(content, sort_keys=False))


def split_by_star(
    source_ids: Sequence[str], fractions: Sequence[float] = SPLIT_FRACTIONS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation/test row indices such that every star (source id) lies in exactly one split.

    Stars are shuffled with ``seed`` and cut by ``fractions`` (rounded; with at least 3 stars, validation and test
    get at least one star each). Returns sorted index arrays into ``source_ids``.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = np.asarray(source_ids, dtype=str)
    stars = np.unique(ids)
    np.random.default_rng(seed).shuffle(stars)
    n_stars = len(stars)
    n_val = int(round(fractions[1] * n_stars))
    n_test = int(round(fractions[2] * n_stars))
    if n_stars >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n_stars - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n_stars} stars are too few for a train/validation/test split")
    groups = (stars[:n_train], stars[n_train : n_train + n_val], stars[n_train + n_val :])
    return tuple(np.flatnonzero(np.isin(ids, group)) for group in groups)  # type: ignore[return-value]
