"""The one tabular-input layer: read any table, one column-alias map, one missing-value policy, one nearest-position match.

Every table a user gives the pipeline — cross-match catalogs, photometric input tables and reference catalogs, label
tables for training — goes through here (docs/tables.md):

* :func:`read_table` reads Parquet (a file or a folder of parts), CSV (``.csv``, ``.csv.gz``), ``.npz`` files of
  equal-length 1-d arrays and every format astropy's ``Table`` reads (FITS, ECSV, VOTable, ...) into a DataFrame;
  anything unreadable is a :class:`TableError` naming the file.
* :data:`COLUMN_ALIASES` maps each canonical column name to the spellings accepted for it (Gaia archive, 2MASS PSC,
  VizieR, SDSS and APOKASC names), compared ignoring case, spaces, ``_`` and ``-``; :func:`find_columns` finds them,
  :func:`canonical_frame` renames them and applies the missing-value policy.
* The missing-value policy (:func:`missing_mask`, :func:`as_measured`, :func:`apply_missing_policy`) says which
  values mean "not measured", per :class:`ValueKind`, with the thresholds of ``constants.py``.
* :class:`SkyIndex` is the nearest-neighbour sky match of the package (astropy's KD-tree).
"""
from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from catalogbuilder.constants import MAGNITUDE_LIMIT, MAX_MAGNITUDE_ERROR, SENTINEL_MAX


class TableError(ValueError):
    """A table that cannot be read (missing, not a table, unknown format, columns it lacks); names the file."""


# --- reading ------------------------------------------------------------------------------------------------------

PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz")
NPZ_SUFFIX = ".npz"


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of a table file as a DataFrame (index 0..n-1), optionally only ``columns`` (exact names).

    Formats by name: ``.parquet``/``.pq`` or a folder of Parquet parts, ``.csv``/``.csv.gz``, ``.npz`` (equal-length
    1-d arrays; other arrays are skipped), anything else through astropy ``Table.read`` (FITS, ECSV, VOTable, ...,
    recognised by name or content). Vector columns are dropped, FITS byte strings decoded
    (UTF-8, trailing blanks removed), masked or null entries become NaN (floats), ``<NA>`` (integers, as pandas
    ``Int64``: 64-bit ids keep every digit) or a missing string. Raises :class:`TableError` naming the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TableError(f"table {path} does not exist")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(PARQUET_SUFFIXES):
            frame = _read_parquet(path, columns)
        elif name.endswith(CSV_SUFFIXES):
            frame = _read_arrow_csv(path)
        elif name.endswith(NPZ_SUFFIX):
            frame = _read_npz(path)
        else:
            frame = _read_astropy(path)
    except TableError:
        raise
    except Exception as error:  # noqa: BLE001 - every reader failure is reported with the file name
        raise TableError(f"cannot read table {path}: {' '.join(str(error).split()) or type(error).__name__}") from error
    frame = _plain_dtypes(frame).reset_index(drop=True)
    if columns is None:
        return frame
    absent = [name for name in columns if name not in frame.columns]
    if absent:
        raise TableError(f"table {path} has no column {', '.join(map(repr, absent))}; its columns: {list(frame.columns)[:30]}")
    return frame[list(columns)]


def _nullable_dtype(arrow_type: object) -> object:
    """pandas dtype for an Arrow type: integers and booleans as nullable pandas types (nulls stay nulls, 64-bit ids
    keep their digits), None (pyarrow's default) for the others."""
    import pyarrow as pa

    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return pd.array(np.empty(0, dtype=pd.ArrowDtype(arrow_type).numpy_dtype)).dtype  # Int64, UInt8, boolean, ...
    return None


def _read_parquet(path: Path, columns: Sequence[str] | None) -> pd.DataFrame:
    """A Parquet file or folder of parts; only ``columns`` are read when they are all there (the scan skips the rest)."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(path, format="parquet")
    wanted = list(columns) if columns is not None and set(columns) <= set(dataset.schema.names) else None
    return dataset.to_table(columns=wanted).to_pandas(types_mapper=_nullable_dtype)


def _read_arrow_csv(path: Path) -> pd.DataFrame:
    """A comma-separated file with a header line (gzip by name); empty fields are null."""
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    return table.to_pandas(types_mapper=_nullable_dtype)


def _read_npz(path: Path) -> pd.DataFrame:
    """The 1-d arrays of an ``.npz`` file as columns; they must share one length."""
    with np.load(path, allow_pickle=False) as content:
        arrays = {name: array.astype(array.dtype.newbyteorder("="))  # native byte order, as pandas expects
                  for name in content.files if (array := content[name]).ndim == 1}
    lengths = {len(values) for values in arrays.values()}
    if len(lengths) != 1:
        raise TableError(f"table {path}: needs 1-d arrays of one length, found lengths "
                         f"{ {name: len(values) for name, values in arrays.items()} }")
    return pd.DataFrame(arrays)


def _read_astropy(path: Path) -> pd.DataFrame:
    """Any table astropy recognises by name or content (FITS, ECSV, VOTable, ...)."""
    from astropy.io.registry import IORegistryError
    from astropy.table import Table
    from astropy.units import UnitsWarning

    with warnings.catch_warnings():  # units are not used here; non-standard ones ('dex', 'electron/s') are common
        warnings.simplefilter("ignore", UnitsWarning)
        try:
            table = Table.read(path)
        except IORegistryError as error:
            raise TableError(f"table {path}: format not recognised (Parquet, CSV, NPZ by name; FITS, ECSV, VOTable "
                             "and the other astropy formats by name or content)") from error
    scalar = [name for name in table.colnames if table[name].ndim <= 1]
    frame = table[scalar].to_pandas()
    for name in frame.columns:
        values = frame[name]
        first = values.dropna().iloc[0] if values.dtype == object and values.notna().any() else None
        if isinstance(first, bytes):
            frame[name] = values.str.decode("utf-8", errors="replace").str.rstrip()
    return frame


def _plain_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable integer and boolean columns without a missing entry as plain numpy columns."""
    for name in frame.columns:
        dtype = frame[name].dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iub" and not frame[name].hasnans:
            frame[name] = frame[name].to_numpy(dtype=dtype.numpy_dtype)
    return frame


# --- column names -------------------------------------------------------------------------------------------------

# canonical name -> accepted spellings besides itself, tried in this order (compared by :func:`column_key`)
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "object_id": ("2mass id", "apogee_id", "tmass_id", "designation", "id"),
    "source_id": ("source_id_gaiadr3", "gaia_dr3_source_id", "gaia_source_id"),
    "ra": ("ra_deg", "raj2000", "ra_icrs"),
    "dec": ("dec_deg", "dej2000", "de_icrs", "decj2000"),
    "phot_g_mean_mag": ("gaia_g", "gmag_gaia", "g_gaia"),
    "phot_bp_mean_mag": ("gaia_bp", "bp", "bpmag"),
    "phot_rp_mean_mag": ("gaia_rp", "rp", "rpmag"),
    "e_phot_g_mean_mag": ("phot_g_mean_mag_error",),
    "parallax": ("plx",),
    "parallax_error": ("e_parallax", "plx_error", "e_plx"),
    "pmra": (),
    "pmdec": (),
    "ref_epoch": (),
    "tmass_j": ("j_m", "jmag", "2mass j-mag", "j"),
    "tmass_h": ("h_m", "hmag", "2mass h-mag", "h"),
    "tmass_k": ("ks_m", "k_m", "kmag", "ksmag", "2mass k-mag", "k", "ks"),
    "e_tmass_j": ("j_msigcom", "e_jmag", "2mass j-mag err", "j_err"),
    "e_tmass_h": ("h_msigcom", "e_hmag", "2mass h-mag err", "h_err"),
    "e_tmass_k": ("ks_msigcom", "k_msigcom", "e_kmag", "e_ksmag", "2mass k-mag err", "k_err"),
    "sdss_g": ("g_sdss", "sdss g-mag"),
    "sdss_r": ("r_sdss", "sdss r-mag", "rmag"),
    "sdss_i": ("i_sdss", "sdss i-mag", "imag"),
    "sdss_z": ("z_sdss", "sdss z-mag", "zmag"),
    "e_sdss_g": ("sdss g-mag err",),
    "e_sdss_r": ("sdss r-mag err", "e_rmag"),
    "e_sdss_i": ("sdss i-mag err", "e_imag"),
    "e_sdss_z": ("sdss z-mag err", "e_zmag"),
    "teff_gspphot": (),
    "logg_gspphot": (),
    "mh_gspphot": (),
}


def column_key(name: str) -> str:
    """How column names are compared: lower case, without spaces, ``_`` and ``-``."""
    return "".join(ch for ch in str(name).lower() if ch not in " _-")


def find_columns(names: Iterable[str], overrides: Mapping[str, str | None] | None = None,
                 wanted: Iterable[str] | None = None) -> dict[str, str]:
    """``{canonical: column}`` for the canonical names (``wanted``, default all of :data:`COLUMN_ALIASES`) found
    among ``names``: the column ``overrides[canonical]`` names when present, else the canonical name itself, else the
    first accepted spelling present. An exact name wins over one that differs in case or punctuation; each column
    holds one canonical quantity (overrides claim theirs first)."""
    names = [str(name) for name in names]
    exact = set(names)
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(column_key(name), name)
    wanted = list(COLUMN_ALIASES if wanted is None else wanted)
    overrides = {canonical: name for canonical, name in (overrides or {}).items() if name}
    found: dict[str, str] = {}

    def claim(canonical: str, candidates: Iterable[str]) -> None:
        for candidate in candidates:
            column = candidate if candidate in exact else by_key.get(column_key(candidate))
            if column is not None and column not in found.values():
                found[canonical] = column
                return

    for canonical in wanted:
        if canonical in overrides:
            claim(canonical, [overrides[canonical]])
    for canonical in wanted:
        if canonical not in found:
            claim(canonical, [canonical, *COLUMN_ALIASES.get(canonical, ())])
    return {canonical: found[canonical] for canonical in wanted if canonical in found}


def canonical_frame(frame: pd.DataFrame, overrides: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """A copy of ``frame`` with the columns :func:`find_columns` finds renamed to their canonical names and the
    missing-value policy applied (:func:`apply_missing_policy`); other columns are kept as they are."""
    found = find_columns(frame.columns, overrides)
    renamed = frame.rename(columns={column: canonical for canonical, column in found.items()})
    return apply_missing_policy(renamed)


# --- missing values -----------------------------------------------------------------------------------------------


class ValueKind(enum.Enum):
    """What a numeric column holds, which decides the values that mean "not measured" (:func:`missing_mask`)."""

    VALUE = "value"  # any number: positions, parallaxes, epochs, labels, Gaia GSP-Phot parameters
    MAGNITUDE = "magnitude"  # mag
    ERROR = "error"  # a 1σ uncertainty (mag, mas)
    PROPER_MOTION = "proper_motion"  # mas/yr: values below SENTINEL_MAX are real for nearby stars (Groombridge 1830)


MAGNITUDE_COLUMNS: frozenset[str] = frozenset(
    name for name in COLUMN_ALIASES if name.startswith(("phot_", "tmass_", "sdss_")))
ERROR_COLUMNS: frozenset[str] = frozenset({f"e_{name}" for name in MAGNITUDE_COLUMNS} | {"parallax_error"})
PROPER_MOTION_COLUMNS: frozenset[str] = frozenset({"pmra", "pmdec"})
ID_COLUMNS: frozenset[str] = frozenset({"object_id", "source_id"})


def value_kind(column: str) -> ValueKind | None:
    """The :class:`ValueKind` of a canonical column, None for identifiers and names outside :data:`COLUMN_ALIASES`
    (those are left as they are)."""
    if column not in COLUMN_ALIASES or column in ID_COLUMNS:
        return None
    if column in MAGNITUDE_COLUMNS:
        return ValueKind.MAGNITUDE
    if column in ERROR_COLUMNS:
        return ValueKind.ERROR
    return ValueKind.PROPER_MOTION if column in PROPER_MOTION_COLUMNS else ValueKind.VALUE


def _as_float(values: object) -> np.ndarray:
    """float64 values of a Series, masked array, array or scalar: masked, null and non-numeric entries NaN."""
    if isinstance(values, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)):
        return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.ma.isMaskedArray(values):
        return np.ma.filled(np.ma.asarray(values, dtype=np.float64), np.nan)
    return np.asarray(values, dtype=np.float64)


def missing_mask(values: object, kind: ValueKind = ValueKind.VALUE) -> np.ndarray:
    """True where a value means "not measured":

    * every kind: masked or null entries, NaN, ±inf;
    * all but proper motions: values ≤ ``SENTINEL_MAX`` (−999: −9999, −9999.99 placeholders);
    * magnitudes: also |m| ≥ ``MAGNITUDE_LIMIT`` (50: 99, 99.99, 999 placeholders);
    * errors: also values ≤ 0 (an uncertainty is positive).

    Negative parallaxes above −999 mas are measurements and stay (a distant star's parallax scatters below zero).
    """
    array = _as_float(values)
    with np.errstate(invalid="ignore"):
        missing = ~np.isfinite(array)
        if kind is not ValueKind.PROPER_MOTION:
            missing |= array <= SENTINEL_MAX
        if kind is ValueKind.MAGNITUDE:
            missing |= np.abs(array) >= MAGNITUDE_LIMIT
        if kind is ValueKind.ERROR:
            missing |= array <= 0
    return missing


def as_measured(values: object, kind: ValueKind = ValueKind.VALUE) -> np.ndarray:
    """float64 values with every entry :func:`missing_mask` calls missing set to NaN."""
    array = _as_float(values)
    return np.where(missing_mask(array, kind), np.nan, array)


def unmeasured_magnitude(error: object) -> np.ndarray:
    """True where a magnitude's 1σ error exceeds ``MAX_MAGNITUDE_ERROR`` (1 mag): the magnitude is then not a
    measurement (2MASS writes 9.99x where it could not estimate the error, quality flag F) and neither is the error."""
    with np.errstate(invalid="ignore"):
        return _as_float(error) > MAX_MAGNITUDE_ERROR


def apply_missing_policy(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with every canonical numeric column as float64 with NaN where :func:`missing_mask` says missing for its
    :func:`value_kind`, and each magnitude whose ``e_<magnitude>`` is :func:`unmeasured_magnitude` set to NaN with
    its error. Identifiers and other columns are unchanged."""
    out = frame.copy()
    for column in out.columns:
        kind = value_kind(str(column))
        if kind is not None:
            out[column] = as_measured(out[column], kind)
    for magnitude in MAGNITUDE_COLUMNS:
        error = f"e_{magnitude}"
        if magnitude in out.columns and error in out.columns:
            unmeasured = unmeasured_magnitude(out[error])
            out[magnitude] = out[magnitude].mask(unmeasured)
            out[error] = out[error].mask(unmeasured)
    return out


# --- nearest position ---------------------------------------------------------------------------------------------


class SkyIndex:
    """Positions (deg) of a catalog with astropy's KD-tree built once: the one nearest-neighbour sky match of the
    package (cross-match, photometric joins), reused for any number of queries."""

    def __init__(self, ra: np.ndarray, dec: np.ndarray) -> None:
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        self.size = len(ra)
        self.coords = SkyCoord(np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg) if self.size else None

    def nearest(self, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
        """Index of the nearest catalog row for each position (-1 when none within ``radius_arcsec`` or the position
        is not finite) and its separation in arcsec (NaN when none)."""
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
        index = np.full(len(ra), -1, dtype=np.int64)
        separation = np.full(len(ra), np.nan)
        valid = np.isfinite(ra) & np.isfinite(dec)
        if not valid.any() or self.coords is None:
            return index, separation
        nearest, sep2d, _ = SkyCoord(ra[valid] * u.deg, dec[valid] * u.deg).match_to_catalog_sky(self.coords)
        sep = sep2d.to_value(u.arcsec)
        within = sep <= radius_arcsec
        index[np.flatnonzero(valid)[within]] = nearest[within]
        separation[np.flatnonzero(valid)[within]] = sep[within]
        return index, separation
