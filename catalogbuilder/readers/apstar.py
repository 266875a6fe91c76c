"""APOGEE apStar reader: combined and visit spectra already on the 8575-pixel apStar grid.

Layout (DR17 and SDSS-V): HDU1 flux, HDU2 error, HDU3 pixel bitmask, each (rows, 8575) — rows 0 and 1 are the
two combined spectra (pixel-based and global weighting), rows 2… the rest-frame visits (NVISITS in the header).
A single-row file (1-D images) holds only the combined spectrum. Row 0 is the star's spectrum (kind ``combined``, the
one the reference and DR19 use); row 1 is kept as kind ``combined-alt`` (stored, never predicted nor released).
Identity across reductions: the product ``apStar|OBJID|FIELD[|TELESCOP]`` (docs/store.md, "Lineage").
"""
from __future__ import annotations

import numpy as np
from astropy.io import fits

from catalogbuilder.constants import (
    APOGEE_DLOGLAM,
    APOGEE_LOGLAM0,
    APOGEE_NPIX,
    GRID_APOGEE,
    KIND_COMBINED,
    KIND_COMBINED_ALT,
    KIND_VISIT,
    MJD_OFFSET,
)
from catalogbuilder.readers.base import (
    TMASS_BANDS,
    FitsReader,
    ReaderError,
    Spectrum,
    check_usable_errors,
    hdu_data,
    header_number,
    header_text,
    product_key,
    tmass_photometry,
)

SURVEY = "apogee"
FORMAT = "apStar"
COMBINED_WEIGHTING = ("pixel", "global")  # meaning of image rows 0 and 1
COMBINED_KINDS = (KIND_COMBINED, KIND_COMBINED_ALT)  # kinds of image rows 0 and 1


def _on_apstar_grid(header: fits.Header) -> bool:
    """True when a header's CRVAL1/CDELT1 are the apStar log-linear grid."""
    return bool(
        np.isclose(header.get("CRVAL1", np.nan), APOGEE_LOGLAM0) and np.isclose(header.get("CDELT1", np.nan), APOGEE_DLOGLAM)
    )


def matches(hdul: fits.HDUList) -> bool:
    """True for an apStar layout: image HDUs 1–3 of width 8575 on the apStar grid (CRVAL1/CDELT1 of HDU1 or HDU0)."""
    if len(hdul) < 4:
        return False
    if not all(isinstance(hdul[i], fits.ImageHDU) and hdul[i].header.get("NAXIS1") == APOGEE_NPIX for i in (1, 2, 3)):
        return False
    return _on_apstar_grid(hdul[1].header) or _on_apstar_grid(hdul[0].header)


def _as_rows(image: np.ndarray, what: str) -> np.ndarray:
    """An apStar image as 2-D (rows, 8575); 1-D single-spectrum images become one row."""
    image = np.atleast_2d(image)
    if image.ndim != 2 or image.shape[1] != APOGEE_NPIX:
        raise ReaderError(f"apStar {what} image has shape {image.shape}, expected (rows, {APOGEE_NPIX})")
    return image


def read_hdul(hdul: fits.HDUList) -> list[Spectrum]:
    """Every image row of an open apStar file as a :class:`Spectrum` (see module docstring)."""
    header = hdul[0].header
    # float32 first, then NaN/±inf → 0 (the reference reader's order of operations)
    flux = np.nan_to_num(_as_rows(hdu_data(hdul, 1), "flux").astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    error = np.nan_to_num(_as_rows(hdu_data(hdul, 2), "error").astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    mask = _as_rows(hdu_data(hdul, 3), "bitmask").astype(np.int64)
    if not (flux.shape == error.shape == mask.shape):
        raise ReaderError(f"apStar flux/error/mask shapes differ: {flux.shape}, {error.shape}, {mask.shape}")
    raw_flux = hdu_data(hdul, 1)
    if not np.isfinite(raw_flux).any():
        raise ReaderError("flux is NaN or infinite everywhere")
    check_usable_errors(raw_flux, hdu_data(hdul, 2))

    object_id = header_text(header, "OBJID", "APOGEE_ID", "OBJNAME")
    ra, dec = header_number(header, "RA"), header_number(header, "DEC")
    n_combined = min(2, flux.shape[0])
    n_visits_header = header_number(header, "NVISITS")
    n_visit_rows = flux.shape[0] - n_combined
    common: dict[str, float | str] = {
        "format": FORMAT,
        "field": header_text(header, "FIELD"),
        "nvisits": n_visits_header,
        "vhelio": header_number(header, "VHELIO"),
        "vscatter": header_number(header, "VSCATTER"),
        "starflag": header_number(header, "STARFLAG"),
        **tmass_photometry(header, {band: header_number(header, f"{band}_ERR") for band in TMASS_BANDS}),
    }
    if n_visit_rows and np.isfinite(n_visits_header) and n_visits_header != n_visit_rows:
        common["warning"] = f"NVISITS={n_visits_header:.0f} but the file has {n_visit_rows} visit rows"

    identity = {
        # DR17 apStar headers name no telescope (it is in the file's folder); SDSS-V ones do
        "product_key": product_key(FORMAT, object_id, header_text(header, "FIELD"),
                                   *filter(None, [header_text(header, "TELESCOP")])),
        "reduction": header_text(header, "V_APRED", "APRED", "RELEASE"),
        "reduction_date": header_text(header, "DATE"),
    }
    spectra: list[Spectrum] = []
    for row in range(flux.shape[0]):
        meta = dict(common)
        if row < n_combined:
            kind, visit = COMBINED_KINDS[row], 0
            snr, mjd = header_number(header, "SNR"), float("nan")
            meta["combine_weighting"] = COMBINED_WEIGHTING[row]
        else:
            kind, visit = KIND_VISIT, row - n_combined + 1
            snr = header_number(header, f"SNRVIS{visit}")
            mjd = header_number(header, f"JD{visit}") - MJD_OFFSET
            meta.update(
                vhelio=header_number(header, f"VHELIO{visit}"),
                vrad=header_number(header, f"VRAD{visit}"),
                bc=header_number(header, f"BC{visit}"),
                fiber=header_number(header, f"FIBER{visit}"),
                starflag=header_number(header, f"FLAG{visit}"),
                visit_file=header_text(header, f"SFILE{visit}"),
            )
        spectra.append(
            Spectrum(
                survey=SURVEY,
                kind=kind,
                grid=GRID_APOGEE,
                row=row,
                visit=visit,
                flux=flux[row].copy(),
                error=error[row].copy(),
                mask=mask[row].copy(),
                wavelength=None,
                object_id=object_id,
                ra=ra,
                dec=dec,
                snr=snr,
                mjd=mjd,
                meta=meta,
                **identity,
            )
        )
    return spectra


class ApStarReader(FitsReader):
    """Reader for APOGEE apStar files (``survey = "apogee"``)."""

    survey = SURVEY
    accepted_surveys = (SURVEY,)
    spectra_survey = SURVEY
    grid = GRID_APOGEE
    matches = staticmethod(matches)
    read_hdul = staticmethod(read_hdul)

    def mismatch_reason(self, hdul: fits.HDUList) -> str:
        return "not an apStar file (expected image HDUs 1-3 on the 8575-pixel apStar grid)"
