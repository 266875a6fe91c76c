"""Cross-match spectrum positions with Gaia (source_id, G/BP/RP, parallax) and attach 2MASS J/H/K.

Two engines give the same answer — the nearest catalog source within ``radius_arcsec`` of each spectrum:

* ``astropy`` for catalogs that fit in memory (FITS, ECSV, VOTable, Parquet, CSV, NPZ read with astropy ``Table``):
  :meth:`astropy.coordinates.SkyCoord.match_to_catalog_sky` (a KD-tree on unit vectors).
* ``hats`` for Gaia-scale catalogs stored as HATS (HEALPix-partitioned Parquet): ``lsdb`` cross-matches partition by
  partition as a Dask graph, on the Dask client that is active (or the local scheduler).

Positions are compared as given, or — with ``epoch`` — after moving the catalog sources by their proper motions from
the catalog epoch (``ref_epoch``, Gaia DR3: 2016.0) to the epoch of the spectrum positions.
2MASS magnitudes come from the spectrum headers (``tmass_*`` store coordinates) and, where those are missing, from the
matched catalog row. Photometric completeness is recorded per spectrum in ``n_bands`` and ``missing_bands``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from astropy.table import Table

DEFAULT_RADIUS_ARCSEC: float = 1.0
GAIA_DR3_EPOCH: float = 2016.0  # Julian year of gaia_source positions, used where a catalog has no ref_epoch
MOTION_COLUMNS: tuple[str, ...] = ("pmra", "pmdec", "ref_epoch")  # mas/yr (pmra = mu_alpha* cos dec), mas/yr, Julian yr
SENTINEL_MAX: float = -999.0  # catalog values at or below this are missing-value sentinels (-9999, -9999.99)
GAIA_COLUMNS: tuple[str, ...] = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax", "parallax_error")
TMASS_COLUMNS: tuple[str, ...] = ("tmass_j", "tmass_h", "tmass_k", "e_tmass_j", "e_tmass_h", "e_tmass_k")
# Bands whose absence sets MISSING_PHOTOMETRY: the photometric inputs of APOGEE Net II (SPEC §3).
REQUIRED_BANDS: tuple[str, ...] = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "tmass_j", "tmass_h", "tmass_k", "parallax")
MATCH_COLUMNS: tuple[str, ...] = (
    ("spectrum_id", "gaia_matched", "gaia_source_id", "gaia_sep_arcsec", "xmatch_catalog") + GAIA_COLUMNS + TMASS_COLUMNS
    + ("n_bands", "missing_bands")
)


# Other spellings found in public cross-match tables (e.g. the Gaia benchmark stars: source_id_gaiadr3).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {"source_id": ("source_id_gaiadr3", "gaia_dr3_source_id", "gaia_source_id")}


@dataclasses.dataclass(frozen=True)
class CatalogColumns:
    """Catalog column names (matched case-insensitively) for each output column; defaults are ``gaiadr3.gaia_source``
    names plus the 2MASS names of the Gaia benchmark-star table. A name absent from the catalog gives NaN / no id."""

    ra: str = "ra"  # deg
    dec: str = "dec"  # deg
    source_id: str = "source_id"
    phot_g_mean_mag: str = "phot_g_mean_mag"
    phot_bp_mean_mag: str = "phot_bp_mean_mag"
    phot_rp_mean_mag: str = "phot_rp_mean_mag"
    parallax: str = "parallax"  # mas
    parallax_error: str = "parallax_error"  # mas
    tmass_j: str = "j_m"
    tmass_h: str = "h_m"
    tmass_k: str = "ks_m"
    e_tmass_j: str = "j_msigcom"
    e_tmass_h: str = "h_msigcom"
    e_tmass_k: str = "ks_msigcom"
    pmra: str = "pmra"  # mas/yr, mu_alpha* = mu_alpha cos(dec)
    pmdec: str = "pmdec"  # mas/yr
    ref_epoch: str = "ref_epoch"  # Julian year of the catalog position

    @classmethod
    def from_mapping(cls, mapping: dict[str, str]) -> CatalogColumns:
        """Defaults overridden by ``{output_column: catalog_column}`` (e.g. ``{"phot_g_mean_mag": "g"}``)."""
        unknown = set(mapping) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown cross-match output columns {sorted(unknown)}")
        return dataclasses.replace(cls(), **mapping)

    def value_fields(self) -> list[str]:
        """Output names of the values taken from the catalog (photometry, astrometry, proper motion, epoch)."""
        return list(GAIA_COLUMNS + TMASS_COLUMNS + MOTION_COLUMNS)


def _resolve_field(names: Sequence[str], columns: CatalogColumns, field: str) -> str | None:
    """The catalog column holding output ``field`` (configured name, a known alias, or the output name itself,
    ignoring case), or None. Normalising an already normalised catalog therefore changes nothing."""
    lowered = {name.lower(): name for name in names}
    for candidate in (getattr(columns, field), *COLUMN_ALIASES.get(field, ()), field):
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _as_float(values: np.ndarray | pd.Series) -> np.ndarray:
    """Float64 values with masked entries and sentinels (≤ -999) replaced by NaN."""
    array = np.ma.filled(np.ma.asarray(np.asarray(values, dtype=float) if isinstance(values, pd.Series) else values).astype(float), np.nan)
    array[array <= SENTINEL_MAX] = np.nan
    return array


def _as_nullable_id(values: object) -> pd.api.extensions.ExtensionArray:
    """Source ids as a nullable Int64 array (masked or null entries become <NA>)."""
    if isinstance(values, pd.Series):
        return values.astype("Int64").array
    masked = np.ma.asarray(values)
    return pd.arrays.IntegerArray(np.ma.filled(masked, 0).astype(np.int64), np.ma.getmaskarray(masked).copy())


def normalise_catalog(table: Table | pd.DataFrame, columns: CatalogColumns = CatalogColumns()) -> pd.DataFrame:
    """A catalog as a DataFrame with the output column names: ``ra``, ``dec`` (deg), ``source_id`` (nullable Int64)
    and the :data:`GAIA_COLUMNS` / :data:`TMASS_COLUMNS` values (NaN where absent, masked or a sentinel)."""
    names = list(table.columns if isinstance(table, pd.DataFrame) else table.colnames)
    frame: dict[str, object] = {}
    for field in ("ra", "dec"):
        found = _resolve_field(names, columns, field)
        if found is None:
            raise ValueError(f"catalog has no {field} column {getattr(columns, field)!r}; columns: {names[:20]}")
        frame[field] = _as_float(table[found])
    found_id = _resolve_field(names, columns, "source_id")
    if found_id is None:
        frame["source_id"] = pd.array([pd.NA] * len(frame["ra"]), dtype="Int64")
    else:
        frame["source_id"] = _as_nullable_id(table[found_id])
    for field in columns.value_fields():
        found = _resolve_field(names, columns, field)
        frame[field] = _as_float(table[found]) if found is not None else np.full(len(frame["ra"]), np.nan)
    return pd.DataFrame(frame)


def read_catalog(path: str | Path, columns: CatalogColumns = CatalogColumns()) -> pd.DataFrame:
    """Read a small catalog file (any astropy ``Table`` format: FITS, ECSV, VOTable, Parquet, CSV; or an ``.npz`` of
    equal-length 1-d arrays) and :func:`normalise_catalog` it. Raises ``ValueError`` naming the file when unreadable."""
    from astropy.table import Table

    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                table = Table({name: arrays[name] for name in arrays.files})
        elif path.suffix == ".csv":
            table = Table.read(path, format="ascii.csv")
        else:
            table = Table.read(path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read catalog {path}: {error}") from error
    return _with_positions(normalise_catalog(table, columns))


def _with_positions(catalog: pd.DataFrame) -> pd.DataFrame:
    """The rows of a normalised catalog with a finite position (others cannot be matched)."""
    return catalog.loc[np.isfinite(catalog["ra"]) & np.isfinite(catalog["dec"])].reset_index(drop=True)


def propagate_positions(
    catalog: pd.DataFrame, epoch: float, ra: str = "ra", dec: str = "dec", pmra: str = "pmra", pmdec: str = "pmdec",
    ref_epoch: str = "ref_epoch", catalog_epoch: float = GAIA_DR3_EPOCH,
) -> pd.DataFrame:
    """A copy of ``catalog`` with ``ra``/``dec`` (deg) moved by each row's proper motion from its ``ref_epoch``
    (``catalog_epoch`` where absent) to ``epoch`` (Julian years), with astropy's ``apply_space_motion``. Rows without a
    finite proper motion keep their position; missing columns mean no motion."""
    import warnings

    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.time import Time
    from erfa import ErfaWarning

    def values(name: str, default: float) -> np.ndarray:
        return _as_float(catalog[name]) if name in catalog.columns else np.full(len(catalog), default)

    motion_ra, motion_dec = values(pmra, np.nan), values(pmdec, np.nan)
    start = values(ref_epoch, catalog_epoch)
    start[~np.isfinite(start)] = catalog_epoch
    moving = np.isfinite(motion_ra) & np.isfinite(motion_dec) & (start != epoch)
    moved = catalog.copy()
    if not moving.any():
        return moved
    coords = SkyCoord(
        ra=_as_float(catalog[ra])[moving] * u.deg, dec=_as_float(catalog[dec])[moving] * u.deg,
        pm_ra_cosdec=motion_ra[moving] * u.mas / u.yr, pm_dec=motion_dec[moving] * u.mas / u.yr,
        obstime=Time(start[moving], format="jyear"),
    )
    with warnings.catch_warnings():  # no distances: ERFA notes that it assumes a large one, which is what we want
        warnings.simplefilter("ignore", ErfaWarning)
        at_epoch = coords.apply_space_motion(new_obstime=Time(epoch, format="jyear"))
    moved.loc[moving, ra] = at_epoch.ra.deg
    moved.loc[moving, dec] = at_epoch.dec.deg
    return moved


def is_hats_catalog(path: str | Path) -> bool:
    """True when ``path`` is a HATS catalog or collection directory (it holds a ``*properties`` file)."""
    path = Path(path)
    names = ("properties", "hats.properties", "collection.properties")
    return path.is_dir() and any((path / name).is_file() for name in names)


def nearest_astropy(ra: np.ndarray, dec: np.ndarray, catalog: pd.DataFrame, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest ``catalog`` row for each position (-1 when none within ``radius_arcsec``) and its
    separation in arcsec (NaN when none)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    index = np.full(len(ra), -1, dtype=np.int64)
    separation = np.full(len(ra), np.nan)
    valid = np.isfinite(ra) & np.isfinite(dec)
    if not valid.any() or catalog.empty:
        return index, separation
    targets = SkyCoord(ra[valid] * u.deg, dec[valid] * u.deg)
    sources = SkyCoord(catalog["ra"].to_numpy() * u.deg, catalog["dec"].to_numpy() * u.deg)
    nearest, sep2d, _ = targets.match_to_catalog_sky(sources)
    sep = sep2d.to_value(u.arcsec)
    within = sep <= radius_arcsec
    index[np.flatnonzero(valid)[within]] = nearest[within]
    separation[np.flatnonzero(valid)[within]] = sep[within]
    return index, separation


def match_hats(
    ra: np.ndarray, dec: np.ndarray, hats_path: str | Path, radius_arcsec: float,
    columns: CatalogColumns = CatalogColumns(), margin_cache: str | Path | None = None, epoch: float | None = None,
) -> pd.DataFrame:
    """Nearest source of a HATS catalog (or collection) for each position with lsdb, computed on the active Dask
    client. Returns one row per position, in order, with the normalised catalog columns and ``sep_arcsec``
    (unmatched: NaN values, null ``source_id``). Give the catalog a margin cache of at least ``radius_arcsec`` (plus
    the largest proper-motion shift when ``epoch`` is set) so sources just across a partition border are found."""
    try:
        import lsdb
    except ImportError as error:
        raise ValueError(f"{hats_path} is a HATS catalog, which needs lsdb: pip install 'catalogbuilder[hats]'") from error

    names = list(lsdb.open_catalog(hats_path, margin_cache=margin_cache).columns)
    fields = ["ra", "dec", "source_id", *columns.value_fields()]
    selected = sorted({found for field in fields if (found := _resolve_field(names, columns, field)) is not None})
    right = lsdb.open_catalog(hats_path, columns=selected, margin_cache=margin_cache)
    if epoch is not None:  # partitions and their margins move their sources to the spectra's epoch
        motion = {name: found for name in ("ra", "dec", *MOTION_COLUMNS) if (found := _resolve_field(names, columns, name))}
        right = right.map_partitions(propagate_positions, epoch, **motion)
    valid = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    matched = pd.DataFrame({"position_spec": pd.Series(dtype=np.int64), "_dist_arcsec": pd.Series(dtype=float)})
    if len(valid):
        left = lsdb.from_dataframe(pd.DataFrame({"position": valid, "ra": ra[valid], "dec": dec[valid]}), ra_column="ra", dec_column="dec")
        matched = left.crossmatch(
            right, n_neighbors=1, radius_arcsec=radius_arcsec, suffixes=("_spec", "_cat"), suffix_method="all_columns"
        ).compute()
    raw = pd.DataFrame({name: matched[f"{name}_cat"].to_numpy() if f"{name}_cat" in matched else np.array([], float)
                        for name in selected})
    table = normalise_catalog(raw, columns)
    table["sep_arcsec"] = matched["_dist_arcsec"].to_numpy(float)
    table["position"] = matched["position_spec"].to_numpy(np.int64)
    nearest = table.sort_values("sep_arcsec", kind="stable").drop_duplicates("position").set_index("position")
    return nearest.reindex(pd.RangeIndex(len(ra))).reset_index(drop=True)


def match_catalog(
    ra: np.ndarray, dec: np.ndarray, catalog: str | Path | pd.DataFrame, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    columns: CatalogColumns = CatalogColumns(), margin_cache: str | Path | None = None, epoch: float | None = None,
) -> pd.DataFrame:
    """Nearest-source match of positions (deg) against one catalog: a normalised DataFrame, a small catalog file, or a
    HATS directory (lsdb). With ``epoch`` (Julian year of the positions) catalog positions are first moved there by
    their proper motions. One row per position, in order, with ``source_id``, ``sep_arcsec`` and the value columns."""
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    if radius_arcsec <= 0 or not np.isfinite(radius_arcsec):
        raise ValueError(f"cross-match radius must be a positive number of arcsec, got {radius_arcsec}")
    if not isinstance(catalog, pd.DataFrame) and is_hats_catalog(catalog):
        return match_hats(ra, dec, catalog, radius_arcsec, columns, margin_cache, epoch)
    table = normalise_catalog(catalog, columns) if isinstance(catalog, pd.DataFrame) else read_catalog(catalog, columns)
    table = _with_positions(table if epoch is None else propagate_positions(table, epoch))
    index, separation = nearest_astropy(ra, dec, table, radius_arcsec)
    matched = table.reindex(np.where(index >= 0, index, -1)).reset_index(drop=True)  # -1 is absent: an all-NaN row
    matched["sep_arcsec"] = separation
    return matched


def band_completeness(frame: pd.DataFrame, required: Sequence[str] = REQUIRED_BANDS) -> tuple[np.ndarray, np.ndarray]:
    """``n_bands`` (finite required bands per row) and ``missing_bands`` (comma-separated names, "" when complete)."""
    n_bands = np.zeros(len(frame), dtype=np.int64)
    missing = pd.Series("", index=frame.index, dtype=object)
    for band in required:
        present = np.isfinite(frame[band].to_numpy(float))
        n_bands += present
        missing = missing + np.where(present, "", band + ",")
    return n_bands, missing.str.rstrip(",").to_numpy(dtype=object)


def crossmatch(
    spectra: pd.DataFrame, catalogs: Sequence[str | Path | pd.DataFrame] = (), radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    columns: CatalogColumns = CatalogColumns(), required_bands: Sequence[str] = REQUIRED_BANDS,
    margin_cache: str | Path | None = None, epoch: float | None = None,
) -> pd.DataFrame:
    """Cross-match table of the spectra (columns ``spectrum_id``, ``ra``, ``dec`` in deg, optional header ``tmass_*``):
    one row per spectrum with the :data:`MATCH_COLUMNS`. Catalogs are tried in the given order; a spectrum takes its
    counterpart from the first catalog that has one within the radius (``xmatch_catalog`` names it). 2MASS values
    from the header win over catalog values. With no catalog every spectrum is unmatched (MISSING_PHOTOMETRY).
    ``epoch``: Julian year of the spectrum positions (e.g. 2000.0 for 2MASS-based ones); None compares as given."""
    ra = spectra["ra"].to_numpy(float)
    dec = spectra["dec"].to_numpy(float)
    output = pd.DataFrame({"spectrum_id": spectra["spectrum_id"].astype(str).to_numpy()})
    output["gaia_matched"] = False
    output["gaia_source_id"] = pd.array([pd.NA] * len(output), dtype="Int64")
    output["gaia_sep_arcsec"] = np.nan
    output["xmatch_catalog"] = ""
    for field in GAIA_COLUMNS + TMASS_COLUMNS:
        output[field] = np.nan
    for catalog in catalogs:
        pending = ~output["gaia_matched"].to_numpy()
        if not pending.any():
            break
        rows = np.flatnonzero(pending)  # later catalogs only see the spectra still without a counterpart
        found = match_catalog(ra[rows], dec[rows], catalog, radius_arcsec, columns, margin_cache, epoch)
        hit = np.isfinite(found["sep_arcsec"].to_numpy(float))
        take, found = rows[hit], found.loc[hit]
        output.loc[take, "gaia_matched"] = True
        output.loc[take, "gaia_source_id"] = found["source_id"].astype("Int64").to_numpy()
        output.loc[take, "gaia_sep_arcsec"] = found["sep_arcsec"].to_numpy(float)
        output.loc[take, "xmatch_catalog"] = "table" if isinstance(catalog, pd.DataFrame) else Path(catalog).name
        for field in GAIA_COLUMNS + TMASS_COLUMNS:
            output.loc[take, field] = found[field].to_numpy(float)
    for band in ("j", "h", "k"):  # a band's magnitude and error come from the same source
        magnitude, error = f"tmass_{band}", f"e_tmass_{band}"
        if magnitude in spectra.columns:
            header = _as_float(spectra[magnitude].to_numpy())
            header_error = _as_float(spectra[error].to_numpy()) if error in spectra.columns else np.full(len(header), np.nan)
            use_header = np.isfinite(header)
            output[magnitude] = np.where(use_header, header, output[magnitude].to_numpy(float))
            output[error] = np.where(use_header, header_error, output[error].to_numpy(float))
    output["n_bands"], output["missing_bands"] = band_completeness(output, required_bands)
    return output[list(MATCH_COLUMNS)]
