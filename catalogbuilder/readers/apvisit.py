"""APOGEE apVisit reader: one visit spectrum, shifted to the rest frame and resampled onto the apStar grid.

Layout: HDU1 flux, HDU2 error, HDU3 pixel mask, HDU4 wavelength (Å, vacuum, observed frame), each (3, 4096): one
row per detector chip (wavelengths descending within a chip in DR17 files; any order is accepted).

Rest frame: the wavelength image is in the frame of the telescope, so the shift uses the star's velocity relative
to the observer, ``VRAD`` (header; ``VREL`` in SDSS-V files and in the apVisit table), which equals
``VHELIO − BC``: λ_rest = λ_obs / (1 + v/c), the non-relativistic Doppler factor of the APOGEE pipeline.
``VHELIO`` alone would be wrong by the barycentric correction (up to ±30 km/s, i.e. 7 apStar pixels of 4.1 km/s).
Identity across reductions: the visit ``apVisit|TELESCOP|PLATE|MJD|FIBERID`` (docs/store.md, "Lineage").
"""
from __future__ import annotations

import numpy as np
from astropy import constants as physical
from astropy.io import fits

from catalogbuilder.constants import GRID_APOGEE, GRID_SPECS, KIND_VISIT, MJD_OFFSET, apogee_wavelength
from catalogbuilder.readers.base import (
    TMASS_BANDS,
    FitsReader,
    ReaderError,
    Spectrum,
    check_measured,
    check_usable_errors,
    hdu_data,
    header_number,
    header_text,
    interpolate_onto,
    product_key,
    tmass_photometry,
)

SURVEY = "apogee"
FORMAT = "apVisit"
N_CHIPS = 3
CHIP_PIXELS = 4096
SPEED_OF_LIGHT_KMS = physical.c.to_value("km/s")
APOGEE_TELESCOPES = ("APO25M", "LCO25M", "APO1M")


def matches(hdul: fits.HDUList) -> bool:
    """True for an apVisit layout: APOGEE telescope, image HDUs 1–4 of shape (3, 4096)."""
    if len(hdul) < 5 or str(hdul[0].header.get("TELESCOP", "")).strip().upper() not in APOGEE_TELESCOPES:
        return False
    return all(
        isinstance(hdul[i], fits.ImageHDU)
        and hdul[i].header.get("NAXIS1") == CHIP_PIXELS
        and hdul[i].header.get("NAXIS2") == N_CHIPS
        for i in (1, 2, 3, 4)
    )


def _table_row(hdul: fits.HDUList) -> fits.FITS_rec | None:
    """The one-row visit table (last HDU, DR17) when present."""
    last = hdul[-1]
    if isinstance(last, fits.BinTableHDU) and last.data is not None and len(last.data) == 1:
        return last.data[0]
    return None


def _table_number(row: fits.FITS_rec | None, name: str) -> float:
    """Numeric column of the visit table row; NaN when missing or not finite."""
    if row is None or name not in row.array.columns.names:
        return float("nan")
    value = float(row[name])
    return value if np.isfinite(value) else float("nan")


def rest_frame_velocity(header: fits.Header, row: fits.FITS_rec | None) -> tuple[float, str]:
    """Velocity (km/s) of the star relative to the observer and where it came from (see module docstring)."""
    for key in ("VRAD", "VREL"):
        value = header_number(header, key)
        if np.isfinite(value):
            return value, f"header {key}"
    value = _table_number(row, "VREL")
    if np.isfinite(value):
        return value, "table VREL"
    vhelio = header_number(header, "VHELIO")
    bc = header_number(header, "BC")
    if not np.isfinite(vhelio + bc):
        vhelio, bc = _table_number(row, "VHELIO"), _table_number(row, "BC")
    if np.isfinite(vhelio + bc):
        return vhelio - bc, "VHELIO - BC"
    raise ReaderError("apVisit has no radial velocity (VRAD, VREL or VHELIO and BC): cannot shift to the rest frame")


def resample_chips(
    wavelength: np.ndarray, flux: np.ndarray, error: np.ndarray, mask: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of each chip (rows of the inputs) onto the ``target`` wavelengths it covers.

    Target pixels covered by no chip (chip gaps, grid ends) get flux 0, error 0 and the apStar grid's no-coverage
    mask bit (APOGEE's convention for gaps is flux 0). NaN/±inf flux and error become 0, as in apStar files read by the apStar reader.
    """
    out_flux = np.zeros(target.size, np.float32)
    out_error = np.zeros(target.size, np.float32)
    no_coverage = GRID_SPECS[GRID_APOGEE].no_coverage
    out_mask = np.full(target.size, no_coverage, np.int64)
    for chip in range(wavelength.shape[0]):
        chip_flux = flux[chip]
        finite = ~np.isnan(chip_flux)
        if not finite.any():
            continue
        low, high = wavelength[chip][finite].min(), wavelength[chip][finite].max()
        inside = (target >= low) & (target <= high)
        out_flux[inside], out_error[inside], out_mask[inside] = interpolate_onto(
            wavelength[chip], chip_flux, error[chip], mask[chip], target[inside], no_coverage
        )
    clean = {"nan": 0.0, "posinf": 0.0, "neginf": 0.0}
    return np.nan_to_num(out_flux, **clean), np.nan_to_num(out_error, **clean), out_mask


def read_hdul(hdul: fits.HDUList) -> list[Spectrum]:
    """The visit spectrum of an open apVisit file, in the rest frame on the apStar grid (wavelength None)."""
    arrays = [np.asarray(hdu_data(hdul, i)) for i in (1, 2, 3, 4)]
    shapes = {a.shape for a in arrays}
    if shapes != {(N_CHIPS, CHIP_PIXELS)}:
        raise ReaderError(f"apVisit flux/error/mask/wavelength images have shapes {shapes}, expected (3, 4096)")
    flux, error, mask, observed_wavelength = arrays
    check_measured(flux)
    check_usable_errors(flux, error)
    header = hdul[0].header
    row = _table_row(hdul)
    velocity, velocity_source = rest_frame_velocity(header, row)
    rest_wavelength = observed_wavelength.astype(np.float64) / (1.0 + velocity / SPEED_OF_LIGHT_KMS)
    grid_flux, grid_error, grid_mask = resample_chips(
        rest_wavelength, flux.astype(np.float32), error.astype(np.float32), mask.astype(np.int64), apogee_wavelength()
    )

    jd_mid = header_number(header, "JD-MID")
    mjd = jd_mid - MJD_OFFSET if np.isfinite(jd_mid) else header_number(header, "MJD5", "MJD")
    meta: dict[str, float | str] = {
        "format": FORMAT,
        "rest_frame_velocity": velocity,
        "rest_frame_velocity_source": velocity_source,
        "vhelio": header_number(header, "VHELIO"),
        "bc": header_number(header, "BC"),
        "plate": header_text(header, "PLATE"),
        "fiber": header_number(header, "FIBERID"),
        "mjd5": header_number(header, "MJD5"),
        "telescope": header_text(header, "TELESCOP"),
        "starflag": header_number(header, "STARFLAG"),
    }
    meta.update(tmass_photometry(header, {band: _table_number(row, f"{band}_ERR") for band in TMASS_BANDS}))
    object_id = header_text(header, "OBJID", "APOGEE_ID")
    if not object_id and row is not None and "APOGEE_ID" in row.array.columns.names:
        object_id = str(row["APOGEE_ID"]).strip()
    return [
        Spectrum(
            survey=SURVEY,
            kind=KIND_VISIT,
            grid=GRID_APOGEE,
            row=0,
            visit=1,
            flux=grid_flux,
            error=grid_error,
            mask=grid_mask,
            wavelength=None,
            object_id=object_id,
            ra=header_number(header, "RA"),
            dec=header_number(header, "DEC"),
            snr=header_number(header, "SNR"),
            mjd=mjd,
            meta=meta,
            product_key=product_key(FORMAT, header_text(header, "TELESCOP"), header_text(header, "PLATE"),
                                    header_number(header, "MJD5", "MJD"), header_number(header, "FIBERID")),
            reduction=header_text(header, "V_APRED", "APRED"),
            reduction_date=header_text(header, "DATE"),
        )
    ]


class ApVisitReader(FitsReader):
    """Reader for APOGEE apVisit files (``survey = "apogee-visit"``, also accepted as ``apogee``; the spectra's
    ``Spectrum.survey`` is ``apogee``)."""

    survey = "apogee-visit"
    accepted_surveys = ("apogee-visit", SURVEY)
    spectra_survey = SURVEY
    grid = GRID_APOGEE
    matches = staticmethod(matches)
    read_hdul = staticmethod(read_hdul)

    def mismatch_reason(self, hdul: fits.HDUList) -> str:
        return "not an apVisit file (expected an APOGEE telescope and (3, 4096) images in HDUs 1-4)"
