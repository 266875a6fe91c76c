"""Input tables of the photometric stage: a table of sources with magnitudes and parallaxes, and the reference catalog
its parallaxes and Gaia photometry can be filled from by position.

Reading, column names and missing values are those of the one tabular-input layer, :mod:`catalogbuilder.tables`
(docs/tables.md): a Gaia × 2MASS export or the APOKASC catalogue can be given as is, and a missing value never drops a
row. What is photometric-specific: every row gets an ``object_id`` (its own id column, else the Gaia ``source_id``,
else ``row<N>``), a table must hold at least one magnitude or a parallax, and :func:`join_by_position` fills missing
inputs from the nearest reference source (:class:`catalogbuilder.tables.SkyIndex`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from catalogbuilder.tables import MAGNITUDE_COLUMNS, SkyIndex, TableError, canonical_frame, read_table

ASTRONN_COLUMNS: dict[str, str] = {"phot_g_mean_mag": "g"}  # astroNN APOGEE DR14 × Gaia DR2 .npz: G is ``g``


def _with_object_id(frame: pd.DataFrame) -> pd.DataFrame:
    """``object_id`` as stripped strings: the table's object id, else its Gaia ``source_id``, else ``row<N>``."""
    if "object_id" in frame.columns:
        frame["object_id"] = frame["object_id"].astype(str).str.strip()
    elif "source_id" in frame.columns:
        frame["object_id"] = frame["source_id"].astype(str).str.strip()
    else:
        frame["object_id"] = [f"row{i}" for i in range(len(frame))]
    return frame


def read_photometric_table(path: str | Path) -> pd.DataFrame:
    """Read and canonicalize an input table; raises :class:`~catalogbuilder.tables.TableError` when it cannot be read
    or holds no magnitude and no parallax."""
    frame = _with_object_id(canonical_frame(read_table(path)))
    usable = [name for name in MAGNITUDE_COLUMNS | {"parallax"} if name in frame.columns]
    if not usable:
        raise TableError(
            f"{path}: no magnitude or parallax column recognised (columns: {list(frame.columns)[:20]}); "
            "see docs/tables.md for the accepted names"
        )
    return frame


def join_by_position(frame: pd.DataFrame, catalog: pd.DataFrame, columns: list[str],
                     radius_arcsec: float = 1.0) -> pd.DataFrame:
    """Fill ``columns`` of ``frame`` from the nearest ``catalog`` row within ``radius_arcsec``
    (:class:`~catalogbuilder.tables.SkyIndex`). Values already present in ``frame`` are kept; rows without a
    counterpart keep NaN. Adds ``join_sep_arcsec`` (NaN without a counterpart). Both tables need canonical
    ``ra``/``dec`` in degrees."""
    for name, table in (("input", frame), ("catalog", catalog)):
        if not {"ra", "dec"} <= set(table.columns):
            raise TableError(f"{name} table has no ra/dec columns for a positional join")
    out = frame.copy()
    finite = np.isfinite(catalog["ra"].to_numpy(float)) & np.isfinite(catalog["dec"].to_numpy(float))
    catalog = catalog[finite].reset_index(drop=True)
    separation = np.full(len(out), np.nan)
    if len(catalog):
        source_rows, separation = SkyIndex(catalog["ra"].to_numpy(float), catalog["dec"].to_numpy(float)).nearest(
            out["ra"].to_numpy(float), out["dec"].to_numpy(float), radius_arcsec)
        matched = source_rows >= 0
        for column in columns:
            if column not in catalog.columns:
                continue
            current = out[column].to_numpy(float) if column in out.columns else np.full(len(out), np.nan)
            joined = np.full(len(out), np.nan)
            joined[matched] = catalog[column].to_numpy(float)[source_rows[matched]]
            out[column] = np.where(np.isfinite(current), current, joined)
    out["join_sep_arcsec"] = separation
    return out


def read_astronn_gaia(path: str | Path) -> pd.DataFrame:
    """The astroNN APOGEE DR14 × Gaia DR2 file (npz: RA, DEC, parallax, parallax_error, g) in canonical names."""
    frame = canonical_frame(read_table(path), ASTRONN_COLUMNS)
    placeholder = (frame["ra"] == 0) & (frame["dec"] == 0)  # first row is an all-sentinel placeholder
    return frame[~placeholder].reset_index(drop=True)


def read_reference_catalog(path: str | Path) -> pd.DataFrame:
    """A Gaia-like catalogue to join parallaxes from: the astroNN ``.npz`` or any table
    :func:`~catalogbuilder.tables.read_table` reads, in canonical names."""
    path = Path(path)
    if path.suffix == ".npz":
        return read_astronn_gaia(path)
    return canonical_frame(read_table(path))
