"""Gaia/2MASS cross-match of spectrum positions (astropy for small catalogs, lsdb/HATS at Gaia scale)."""
from catalogbuilder.crossmatch.match import DEFAULT_RADIUS_ARCSEC, CatalogColumns, crossmatch, match_catalog, read_catalog

__all__ = ["DEFAULT_RADIUS_ARCSEC", "CatalogColumns", "crossmatch", "match_catalog", "read_catalog"]
