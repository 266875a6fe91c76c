"""Photometric inputs of spectrum + photometry models (APOGEE Net II) for the inference tasks.

A model that needs photometry names the per-spectrum keys it reads (``model.photometry_keys``; for APOGEE Net II
parallax, G, BP, RP, J, H, K — the column names of the ``catalogbuilder crossmatch`` table). Each task reads the rows
of its own spectrum ids from the photometry table (Parquet file or folder, columns ``spectrum_id`` + any of the keys);
a value the table does not give (no row, no column, NaN or a placeholder such as 99.99 or −9999, by the
missing-value policy of :mod:`catalogbuilder.tables`) falls back to the 2MASS J/H/K of the spectrum's own file
header kept in the store; what is still missing is left NaN and the model imputes it and marks the spectrum.

Results rows of such a model carry the inputs they were computed from (``input_<key>``) and the model's
``missing_photometry`` (1.0 / 0.0), so a rerun with a changed table recomputes exactly the spectra whose inputs changed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads

from catalogbuilder.store.ranged import HIDDEN_PREFIXES
from catalogbuilder.store.results import STATUS_OK
from catalogbuilder.tables import apply_missing_policy

ID_COLUMN = "spectrum_id"
INPUT_PREFIX = "input_"  # results column holding the value of a photometry key the model was given
MISSING_PHOTOMETRY = "missing_photometry"  # results column: 1.0 when the model imputed any of its inputs
HEADER_KEYS: tuple[str, ...] = ("tmass_j", "tmass_h", "tmass_k")  # store coordinates (file headers), in mag
HEADER_FALLBACK = "store header 2MASS J/H/K only (no table)"  # what a run without a table uses, for reports


def input_columns(keys: Sequence[str]) -> list[str]:
    """Results columns recording the inputs: ``input_<key>`` for each photometry key."""
    return [f"{INPUT_PREFIX}{key}" for key in keys]


def result_columns(keys: Sequence[str]) -> list[str]:
    """Extra results columns of a model with these photometry keys (none for spectrum-only models)."""
    return [MISSING_PHOTOMETRY, *input_columns(keys)] if keys else []


def _dataset(path: str | Path) -> pads.Dataset:
    """The Parquet dataset at ``path`` (one file or a folder of parts)."""
    return pads.dataset(path, format="parquet", ignore_prefixes=HIDDEN_PREFIXES)


def check_photometry_table(path: str | Path, keys: Sequence[str]) -> Path:
    """The absolute path of a usable photometry table; raises ``FileNotFoundError`` when it is absent and
    ``ValueError`` when it is not Parquet, lacks ``spectrum_id`` or every one of ``keys``, or lists an id twice."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"no photometry table at {path}")
    try:
        dataset = _dataset(path)
        names = dataset.schema.names
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"photometry table {path} is not readable as Parquet: {error}") from error
    present = [key for key in keys if key in names]
    if ID_COLUMN not in names or not present:
        raise ValueError(f"photometry table {path} needs a {ID_COLUMN!r} column and at least one of {list(keys)} "
                         f"(the `catalogbuilder crossmatch` output has them); its columns: {names[:20]}")
    ids = dataset.to_table(columns=[ID_COLUMN]).column(ID_COLUMN).to_pandas()
    if ids.duplicated().any():
        raise ValueError(f"photometry table {path} lists {int(ids.duplicated().sum())} spectrum_id(s) more than once, "
                         f"e.g. {ids[ids.duplicated()].iloc[0]!r}")
    return path


def read_table_rows(path: str | Path, spectrum_ids: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """The rows of ``spectrum_ids`` (only those; the filter is pushed into the Parquet scan) as float64 columns
    ``keys``, indexed like ``spectrum_ids``: NaN where the table has no such row, column or value, or a value the
    missing-value policy of :mod:`catalogbuilder.tables` calls missing (99.99, −9999)."""
    dataset = _dataset(path)
    present = [key for key in keys if key in dataset.schema.names]
    wanted = pd.Index(np.asarray(spectrum_ids, dtype=str))
    table = dataset.to_table(columns=[ID_COLUMN, *present], filter=pc.field(ID_COLUMN).isin(wanted.tolist()))
    rows = table.to_pandas().astype({key: np.float64 for key in present}).set_index(ID_COLUMN)
    if rows.index.duplicated().any():
        raise ValueError(f"photometry table {path} lists spectrum {rows.index[rows.index.duplicated()][0]!r} twice")
    return apply_missing_policy(rows.reindex(index=wanted, columns=list(keys)).astype(np.float64))


def header_photometry(columns: pd.DataFrame) -> pd.DataFrame:
    """2MASS J/H/K (mag) from the file headers, out of the store columns of some spectra (``HEADER_KEYS``)."""
    return pd.DataFrame({key: columns[key].to_numpy(np.float64) for key in HEADER_KEYS if key in columns})


def gather_inputs(path: str | Path | None, spectrum_ids: Sequence[str], header: pd.DataFrame,
                  keys: Sequence[str]) -> pd.DataFrame:
    """Per-spectrum photometry (float64 columns ``keys``, one row per id, in order): the table's value where it has a
    finite one, else the store header's (2MASS J/H/K only), else NaN. ``path=None``: header values only."""
    if path is None:
        inputs = pd.DataFrame(np.nan, index=pd.Index(np.asarray(spectrum_ids, dtype=str)), columns=list(keys))
    else:
        inputs = read_table_rows(path, spectrum_ids, keys)
    for key in keys:
        if key in header:
            fallback = header[key].to_numpy(np.float64)
            inputs[key] = np.where(np.isfinite(inputs[key].to_numpy()), inputs[key].to_numpy(), fallback)
    return inputs


def changed_inputs(results: pd.DataFrame, inputs: pd.DataFrame) -> set[str]:
    """Spectrum ids of ``inputs`` whose result row (``ResultsStore.rows``: one per spectrum, the newest ``ok`` one)
    was computed from other inputs (NaN equals NaN); rows written without the input columns count as changed. Ids
    without an ok row are not listed."""
    recorded = [column for column in input_columns(inputs.columns) if column in results.columns]
    newest = results.loc[results["status"] == STATUS_OK].set_index(ID_COLUMN)
    newest = newest.loc[newest.index.intersection(inputs.index)]
    if len(recorded) < len(inputs.columns):
        return set(newest.index)
    before = newest[recorded].to_numpy(np.float64)
    now = inputs.loc[newest.index].to_numpy(np.float64)
    same = (before == now) | (np.isnan(before) & np.isnan(now))
    return set(newest.index[~same.all(axis=1)])
