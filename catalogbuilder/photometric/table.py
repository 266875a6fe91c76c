"""Input tables of the photometric stage: Parquet, FITS or CSV with positions, magnitudes and parallaxes.

Columns are matched case-insensitively against the canonical names below and their aliases (Gaia archive,
2MASS PSC, SDSS, APOKASC catalogue spellings), so a Gaia × 2MASS export or the APOKASC catalogue itself can be
given as is. Survey sentinels (≤ −999 such as −9999, ≥ 99 for magnitudes, empty strings) become NaN: a missing
value never drops a row. Parallaxes can be joined from a second table by position (:func:`join_by_position`).
"""
from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord
from astropy.table import Table

# canonical name -> accepted spellings (compared lower-case, spaces/underscores/hyphens ignored)
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "object_id": ("object_id", "source_id", "2mass id", "apogee_id", "tmass_id", "designation", "id"),
    "ra": ("ra", "ra_deg", "raj2000", "ra_icrs"),
    "dec": ("dec", "dec_deg", "dej2000", "de_icrs", "decj2000"),
    "phot_g_mean_mag": ("phot_g_mean_mag", "gaia_g", "gmag_gaia", "g_gaia"),
    "phot_bp_mean_mag": ("phot_bp_mean_mag", "gaia_bp", "bp", "bpmag"),
    "phot_rp_mean_mag": ("phot_rp_mean_mag", "gaia_rp", "rp", "rpmag"),
    "e_phot_g_mean_mag": ("e_phot_g_mean_mag", "phot_g_mean_mag_error"),
    "parallax": ("parallax", "plx"),
    "parallax_error": ("parallax_error", "e_parallax", "plx_error", "e_plx"),
    "tmass_j": ("tmass_j", "j_m", "jmag", "2mass j-mag", "j"),
    "tmass_h": ("tmass_h", "h_m", "hmag", "2mass h-mag", "h"),
    "tmass_k": ("tmass_k", "k_m", "ks_m", "kmag", "ksmag", "2mass k-mag", "k", "ks"),
    "e_tmass_j": ("e_tmass_j", "j_msigcom", "e_jmag", "2mass j-mag err", "j_err"),
    "e_tmass_h": ("e_tmass_h", "h_msigcom", "e_hmag", "2mass h-mag err", "h_err"),
    "e_tmass_k": ("e_tmass_k", "k_msigcom", "e_kmag", "e_ksmag", "2mass k-mag err", "k_err"),
    "sdss_g": ("sdss_g", "g_sdss", "sdss g-mag"),
    "sdss_r": ("sdss_r", "r_sdss", "sdss r-mag", "rmag"),
    "sdss_i": ("sdss_i", "i_sdss", "sdss i-mag", "imag"),
    "sdss_z": ("sdss_z", "z_sdss", "sdss z-mag", "zmag"),
    "e_sdss_g": ("e_sdss_g", "sdss g-mag err"),
    "e_sdss_r": ("e_sdss_r", "sdss r-mag err", "e_rmag"),
    "e_sdss_i": ("e_sdss_i", "sdss i-mag err", "e_imag"),
    "e_sdss_z": ("e_sdss_z", "sdss z-mag err", "e_zmag"),
    "teff_gspphot": ("teff_gspphot",),
    "logg_gspphot": ("logg_gspphot",),
    "mh_gspphot": ("mh_gspphot",),
}
MAGNITUDE_COLUMNS = frozenset(
    name for name in COLUMN_ALIASES if name.startswith(("phot_", "tmass_", "sdss_"))
)
NUMERIC_COLUMNS = tuple(name for name in COLUMN_ALIASES if name != "object_id")
SENTINEL_BELOW = -999.0  # -9999, -999999 … mean "no measurement"
MAGNITUDE_SENTINEL_ABOVE = 99.0  # 99.99 etc.
MAX_MAGNITUDE_ERROR = 1.0  # mag; larger errors (2MASS 9.995 for upper limits) mark the magnitude as not measured


class PhotometricTableError(ValueError):
    """A table that cannot be used by the photometric stage (unreadable, or no usable column at all)."""


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " _-")


def _read_any(path: Path) -> pd.DataFrame:
    """Read Parquet, CSV or any astropy-readable table (FITS, ECSV, VOTable) into pandas."""
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith(".parquet") or suffixes.endswith(".pq"):
            return pd.read_parquet(path)
        if suffixes.endswith((".csv", ".csv.gz", ".txt")):
            return pd.read_csv(path)
        table = Table.read(path)
    except Exception as error:  # noqa: BLE001 - any reader failure is reported with the file name
        raise PhotometricTableError(f"cannot read {path}: {error}") from error
    names = [name for name in table.colnames if len(table[name].shape) <= 1]  # drop vector columns
    frame = table[names].to_pandas()
    for name in frame.columns:  # FITS byte strings
        if frame[name].dtype == object and len(frame) and isinstance(frame[name].iloc[0], bytes):
            frame[name] = frame[name].str.decode("ascii", errors="replace").str.strip()
    return frame


def canonicalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Rename known columns to canonical names, turn sentinels into NaN, keep unknown columns as they are.

    A magnitude whose error exceeds :data:`MAX_MAGNITUDE_ERROR` (the 2MASS 9.995 convention of upper limits) is not a
    measurement: both become NaN.

    The first column (in :data:`COLUMN_ALIASES` order of spellings) that matches wins; others are left untouched.
    """
    by_key: dict[str, str] = {}
    for name in frame.columns:
        by_key.setdefault(_key(str(name)), str(name))
    renames: dict[str, str] = {}
    for canonical, spellings in COLUMN_ALIASES.items():
        if canonical in frame.columns:
            continue
        for spelling in spellings:
            source = by_key.get(_key(spelling))
            if source is not None and source not in renames and source not in COLUMN_ALIASES:
                renames[source] = canonical
                break
    out = frame.rename(columns=renames).copy()
    for name in NUMERIC_COLUMNS:
        if name not in out.columns:
            continue
        values = pd.to_numeric(out[name], errors="coerce").astype(np.float64)
        bad = values <= SENTINEL_BELOW
        if name in MAGNITUDE_COLUMNS:
            bad |= values >= MAGNITUDE_SENTINEL_ABOVE
        out[name] = values.mask(bad)
    for name in MAGNITUDE_COLUMNS:
        error_name = f"e_{name}"
        if name in out.columns and error_name in out.columns:
            upper_limit = out[error_name] > MAX_MAGNITUDE_ERROR
            out[name] = out[name].mask(upper_limit)
            out[error_name] = out[error_name].mask(upper_limit)
    if "object_id" in out.columns:
        out["object_id"] = out["object_id"].astype(str).str.strip()
    else:
        out["object_id"] = [f"row{i}" for i in range(len(out))]
    return out


def read_photometric_table(path: str | Path) -> pd.DataFrame:
    """Read and canonicalize an input table; raises :class:`PhotometricTableError` when nothing is usable."""
    path = Path(path)
    if not path.exists():
        raise PhotometricTableError(f"input table {path} does not exist")
    frame = canonicalize(_read_any(path))
    usable = [name for name in MAGNITUDE_COLUMNS | {"parallax"} if name in frame.columns]
    if not usable:
        raise PhotometricTableError(
            f"{path}: no magnitude or parallax column recognised (columns: {list(frame.columns)[:20]}); "
            "see docs/other_models.md for the accepted names"
        )
    return frame.reset_index(drop=True)


def join_by_position(frame: pd.DataFrame, catalog: pd.DataFrame, columns: list[str],
                     radius_arcsec: float = 1.0) -> pd.DataFrame:
    """Fill ``columns`` of ``frame`` from the nearest ``catalog`` row within ``radius_arcsec`` (astropy match).

    Values already present in ``frame`` are kept; rows without a counterpart keep NaN. Adds ``join_sep_arcsec``.
    Both tables need canonical ``ra``/``dec`` in degrees.
    """
    for name, table in (("input", frame), ("catalog", catalog)):
        if not {"ra", "dec"} <= set(table.columns):
            raise PhotometricTableError(f"{name} table has no ra/dec columns for a positional join")
    out = frame.copy()
    finite = np.isfinite(catalog["ra"].to_numpy(float)) & np.isfinite(catalog["dec"].to_numpy(float))
    catalog = catalog[finite].reset_index(drop=True)
    separation = np.full(len(out), np.nan)
    has_position = np.isfinite(out["ra"].to_numpy(float)) & np.isfinite(out["dec"].to_numpy(float))
    if has_position.any() and len(catalog):
        sky = SkyCoord(out.loc[has_position, "ra"].to_numpy(float) * u.deg, out.loc[has_position, "dec"].to_numpy(float) * u.deg)
        reference = SkyCoord(catalog["ra"].to_numpy(float) * u.deg, catalog["dec"].to_numpy(float) * u.deg)
        index, sep, _ = sky.match_to_catalog_sky(reference)
        separation[has_position] = sep.arcsec
        matched = np.zeros(len(out), bool)
        matched[has_position] = sep.arcsec <= radius_arcsec
        source_rows = np.full(len(out), -1)
        source_rows[has_position] = index
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
    with np.load(path) as content:
        frame = pd.DataFrame({
            "ra": content["RA"].astype(float), "dec": content["DEC"].astype(float),
            "parallax": content["parallax"].astype(float), "parallax_error": content["parallax_error"].astype(float),
            "phot_g_mean_mag": content["g"].astype(float),
        })
    placeholder = (frame["ra"] == 0) & (frame["dec"] == 0)  # first row is an all-sentinel placeholder
    return canonicalize(frame[~placeholder].reset_index(drop=True))


def read_reference_catalog(path: str | Path) -> pd.DataFrame:
    """A Gaia-like catalogue to join parallaxes from: the astroNN ``.npz`` or any table :func:`_read_any` reads."""
    path = Path(path)
    if path.suffix == ".npz":
        return read_astronn_gaia(path)
    return canonicalize(_read_any(path))
