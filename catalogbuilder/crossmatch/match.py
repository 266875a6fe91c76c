"""Cross-match spectrum positions with Gaia (source_id, G/BP/RP, parallax) and attach 2MASS J/H/K.

Two engines give the same answer — the nearest catalog source within ``radius_arcsec`` of each spectrum:

* ``astropy`` for catalogs that fit in memory (any table :func:`catalogbuilder.tables.read_table` reads: FITS, ECSV,
  VOTable, Parquet, CSV, NPZ): :class:`catalogbuilder.tables.SkyIndex`, astropy's KD-tree on unit vectors.
* ``hats`` for Gaia-scale catalogs stored as HATS (HEALPix-partitioned Parquet): ``lsdb`` cross-matches partition by
  partition as a Dask graph, on the Dask client that is active (or the local scheduler).

Positions are compared as given, or — with ``epoch`` — after moving the catalog sources by their proper motions from
the catalog epoch (``ref_epoch``, Gaia DR3: 2016.0) to the epoch of the spectrum positions.
2MASS magnitudes come from the spectrum headers (``tmass_*`` store coordinates) and, where those are missing, from the
matched catalog row. Catalog columns are found through the one alias map and read with the one missing-value policy of
:mod:`catalogbuilder.tables` (docs/tables.md). Photometric completeness is recorded per spectrum in ``n_bands`` and
``missing_bands``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from catalogbuilder.constants import DEFAULT_RADIUS_ARCSEC
from catalogbuilder.tables import (
    SkyIndex,
    ValueKind,
    apply_missing_policy,
    as_measured,
    find_columns,
    read_table,
)

GAIA_DR3_EPOCH: float = 2016.0  # Julian year of gaia_source positions, used where a catalog has no ref_epoch
MOTION_COLUMNS: tuple[str, ...] = ("pmra", "pmdec", "ref_epoch")  # mas/yr (pmra = mu_alpha* cos dec), mas/yr, Julian yr
GAIA_COLUMNS: tuple[str, ...] = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax", "parallax_error")
TMASS_COLUMNS: tuple[str, ...] = ("tmass_j", "tmass_h", "tmass_k", "e_tmass_j", "e_tmass_h", "e_tmass_k")
# Bands whose absence sets MISSING_PHOTOMETRY: the photometric inputs of APOGEE Net II (SPEC §3).
REQUIRED_BANDS: tuple[str, ...] = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "tmass_j", "tmass_h", "tmass_k", "parallax")
MATCH_COLUMNS: tuple[str, ...] = (
    ("spectrum_id", "gaia_matched", "gaia_source_id", "gaia_sep_arcsec", "xmatch_catalog") + GAIA_COLUMNS + TMASS_COLUMNS
    + ("n_bands", "missing_bands")
)


@dataclasses.dataclass(frozen=True)
class CatalogColumns:
    """The user's catalog column name for an output column, where the alias map of :mod:`catalogbuilder.tables`
    (``gaiadr3.gaia_source`` names, 2MASS ``j_m``/``j_msigcom``…, VizieR spellings) does not find it; None: the
    alias map alone. A given name is tried first, then the alias map; a column found nowhere gives NaN / no id."""

    ra: str | None = None  # deg
    dec: str | None = None  # deg
    source_id: str | None = None
    phot_g_mean_mag: str | None = None
    phot_bp_mean_mag: str | None = None
    phot_rp_mean_mag: str | None = None
    parallax: str | None = None  # mas
    parallax_error: str | None = None  # mas
    tmass_j: str | None = None
    tmass_h: str | None = None
    tmass_k: str | None = None
    e_tmass_j: str | None = None
    e_tmass_h: str | None = None
    e_tmass_k: str | None = None
    pmra: str | None = None  # mas/yr, mu_alpha* = mu_alpha cos(dec)
    pmdec: str | None = None  # mas/yr
    ref_epoch: str | None = None  # Julian year of the catalog position

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

    def find(self, names: Sequence[str], fields: Sequence[str] | None = None) -> dict[str, str]:
        """``{output column: catalog column}`` for ``fields`` (default: position, id and values) found in ``names``
        (:func:`catalogbuilder.tables.find_columns` with these names as overrides). Normalising an already normalised
        catalog therefore changes nothing."""
        wanted = fields if fields is not None else ["ra", "dec", "source_id", *self.value_fields()]
        return find_columns(names, dataclasses.asdict(self), wanted)


def normalise_catalog(table: pd.DataFrame, columns: CatalogColumns = CatalogColumns()) -> pd.DataFrame:
    """A catalog as a DataFrame with the output column names: ``ra``, ``dec`` (deg), ``source_id`` (nullable Int64)
    and the :data:`GAIA_COLUMNS` / :data:`TMASS_COLUMNS` / :data:`MOTION_COLUMNS` values, NaN where absent or
    missing by the policy of :mod:`catalogbuilder.tables` (sentinels, 99.99 magnitudes, 2MASS 9.99x errors)."""
    found = columns.find(list(table.columns))
    for field in ("ra", "dec"):
        if field not in found:
            raise ValueError(f"catalog has no {field} column {getattr(columns, field) or field!r}; "
                             f"columns: {list(table.columns)[:20]}")
    frame = table[list(found.values())].set_axis(list(found), axis=1)
    for field in columns.value_fields():
        if field not in frame:
            frame[field] = np.nan
    frame = apply_missing_policy(frame)
    frame["source_id"] = frame["source_id"].astype("Int64") if "source_id" in found else pd.array(
        [pd.NA] * len(frame), dtype="Int64")
    return frame[["ra", "dec", "source_id", *columns.value_fields()]].reset_index(drop=True)


def read_catalog(path: str | Path, columns: CatalogColumns = CatalogColumns()) -> pd.DataFrame:
    """Read a small catalog file (:func:`catalogbuilder.tables.read_table`: FITS, ECSV, VOTable, Parquet, CSV, NPZ)
    and :func:`normalise_catalog` it. Raises ``ValueError`` (``TableError``) naming the file when unreadable."""
    return _with_positions(normalise_catalog(read_table(path), columns))


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

    def values(name: str, default: float, kind: ValueKind = ValueKind.VALUE) -> np.ndarray:
        return as_measured(catalog[name], kind) if name in catalog.columns else np.full(len(catalog), default)

    motion_ra = values(pmra, np.nan, ValueKind.PROPER_MOTION)
    motion_dec = values(pmdec, np.nan, ValueKind.PROPER_MOTION)
    start = values(ref_epoch, catalog_epoch)
    start[~np.isfinite(start)] = catalog_epoch
    moving = np.isfinite(motion_ra) & np.isfinite(motion_dec) & (start != epoch)
    moved = catalog.copy()
    if not moving.any():
        return moved
    coords = SkyCoord(
        ra=as_measured(catalog[ra])[moving] * u.deg, dec=as_measured(catalog[dec])[moving] * u.deg,
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


@dataclasses.dataclass
class PreparedCatalog:
    """A small catalog read and normalised once (:func:`normalise_catalog`), with its sky index: what
    :func:`match_catalog` needs for many batches of positions without reading or indexing the catalog again."""

    name: str
    table: pd.DataFrame
    index: SkyIndex

    @classmethod
    def load(cls, catalog: str | Path | pd.DataFrame, columns: CatalogColumns = CatalogColumns(),
             epoch: float | None = None) -> PreparedCatalog:
        """Read (a file) or normalise (a DataFrame) and, with ``epoch``, move sources by their proper motions."""
        if isinstance(catalog, pd.DataFrame):
            table, name = normalise_catalog(catalog, columns), "table"
        else:
            table, name = read_catalog(catalog, columns), Path(catalog).name
        table = _with_positions(table if epoch is None else propagate_positions(table, epoch))
        return cls(name, table, SkyIndex(table["ra"].to_numpy(), table["dec"].to_numpy()))


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
    selected = sorted(set(columns.find(names).values()))
    right = lsdb.open_catalog(hats_path, columns=selected, margin_cache=margin_cache)
    if epoch is not None:  # partitions and their margins move their sources to the spectra's epoch
        right = right.map_partitions(propagate_positions, epoch, **columns.find(names, ("ra", "dec", *MOTION_COLUMNS)))
    valid = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    matched = pd.DataFrame({"position_spec": pd.Series(dtype=np.int64), "_dist_arcsec": pd.Series(dtype=float)})
    if len(valid):
        left = lsdb.from_dataframe(pd.DataFrame({"position": valid, "ra": ra[valid], "dec": dec[valid]}), ra_column="ra",
                                   dec_column="dec", margin_threshold=None)  # the catalog's margin covers the borders
        try:
            matched = left.crossmatch(
                right, n_neighbors=1, radius_arcsec=radius_arcsec, suffixes=("_spec", "_cat"), suffix_method="all_columns"
            ).compute()
        except RuntimeError as error:  # lsdb refuses positions in sky pixels where the catalog has no partition
            if str(error) != "Catalogs do not overlap":
                raise
    raw = pd.DataFrame({name: matched[f"{name}_cat"].to_numpy() if f"{name}_cat" in matched else np.array([], float)
                        for name in selected})
    table = normalise_catalog(raw, columns)
    table["sep_arcsec"] = matched["_dist_arcsec"].to_numpy(float)
    table["position"] = matched["position_spec"].to_numpy(np.int64)
    nearest = table.sort_values("sep_arcsec", kind="stable").drop_duplicates("position").set_index("position")
    return nearest.reindex(pd.RangeIndex(len(ra))).reset_index(drop=True)


def match_catalog(
    ra: np.ndarray, dec: np.ndarray, catalog: str | Path | pd.DataFrame | PreparedCatalog,
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC, columns: CatalogColumns = CatalogColumns(),
    margin_cache: str | Path | None = None, epoch: float | None = None,
) -> pd.DataFrame:
    """Nearest-source match of positions (deg) against one catalog: a :class:`PreparedCatalog`, a normalised
    DataFrame, a small catalog file, or a HATS directory (lsdb). With ``epoch`` (Julian year of the positions) catalog
    positions are first moved there by their proper motions (a PreparedCatalog was moved when loaded). One row per
    position, in order, with ``source_id``, ``sep_arcsec`` and the value columns."""
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    if radius_arcsec <= 0 or not np.isfinite(radius_arcsec):
        raise ValueError(f"cross-match radius must be a positive number of arcsec, got {radius_arcsec}")
    if not isinstance(catalog, (pd.DataFrame, PreparedCatalog)) and is_hats_catalog(catalog):
        return match_hats(ra, dec, catalog, radius_arcsec, columns, margin_cache, epoch)
    prepared = catalog if isinstance(catalog, PreparedCatalog) else PreparedCatalog.load(catalog, columns, epoch)
    index, separation = prepared.index.nearest(ra, dec, radius_arcsec)
    matched = prepared.table.reindex(np.where(index >= 0, index, -1)).reset_index(drop=True)  # -1: an all-NaN row
    matched["sep_arcsec"] = separation
    return matched


def prepare_catalogs(catalogs: Sequence[str | Path | pd.DataFrame], columns: CatalogColumns = CatalogColumns(),
                     epoch: float | None = None) -> list[str | Path | PreparedCatalog]:
    """Catalogs ready for many :func:`crossmatch` calls: small ones read and indexed once, HATS folders as given."""
    return [catalog if not isinstance(catalog, pd.DataFrame) and is_hats_catalog(catalog)
            else PreparedCatalog.load(catalog, columns, epoch) for catalog in catalogs]


def catalog_name(catalog: str | Path | pd.DataFrame | PreparedCatalog) -> str:
    """The name a cross-match row records for the catalog its counterpart came from."""
    if isinstance(catalog, PreparedCatalog):
        return catalog.name
    return "table" if isinstance(catalog, pd.DataFrame) else Path(catalog).name


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
    spectra: pd.DataFrame, catalogs: Sequence[str | Path | pd.DataFrame | PreparedCatalog] = (), radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
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
        output.loc[take, "xmatch_catalog"] = catalog_name(catalog)
        for field in GAIA_COLUMNS + TMASS_COLUMNS:
            output.loc[take, field] = found[field].to_numpy(float)
    header = apply_missing_policy(spectra[[name for name in TMASS_COLUMNS if name in spectra.columns]])
    for band in ("j", "h", "k"):  # a band's magnitude and error come from the same source
        magnitude, error = f"tmass_{band}", f"e_tmass_{band}"
        if magnitude in header.columns:
            header_error = header[error].to_numpy(float) if error in header.columns else np.full(len(header), np.nan)
            use_header = np.isfinite(header[magnitude].to_numpy(float))
            output[magnitude] = np.where(use_header, header[magnitude].to_numpy(float), output[magnitude].to_numpy(float))
            output[error] = np.where(use_header, header_error, output[error].to_numpy(float))
    output["n_bands"], output["missing_bands"] = band_completeness(output, required_bands)
    return output[list(MATCH_COLUMNS)]
