"""LAMOST low-resolution (LRS) spectrum reader: the image format of DR1–DR7 and the table format of DR8+.

* Image format: primary image (5, N) whose row meaning is given by header ``EXTEN0``:
  DR5–DR7 ``Flux, Inverse, Wavelength, Andmask, Ormask``; DR1 ``Flux Inverse Subcontinuum Andmask Ormask``
  (row 2 is a continuum-normalised flux; the wavelength is 10**(COEFF0 + COEFF1·i) from the header).
* Table format (DR8+): HDU1 ``COADD`` binary table, one row, vector columns ``FLUX``, ``IVAR``, ``WAVELENGTH``,
  ``ANDMASK``, ``ORMASK``, ``NORMALIZATION`` (names matched case-insensitively, cells of shape (N,) or (1, N)).

Medium-resolution (MRS, ``COADD_B``/``COADD_R``) files are a different product and are rejected.
Identity across reductions: the observation ``lamost|OBSID`` (else LMJD, PLANID, SPID, FIBERID), reduction
``DATA_V`` + ``VERSPIPE`` (docs/store.md, "Lineage").
"""
from __future__ import annotations

import re

import numpy as np
from astropy.io import fits

from catalogbuilder.constants import DEFAULT_ERROR_FRACTION, GRID_OPTICAL, KIND_COMBINED
from catalogbuilder.readers.base import (
    FitsReader,
    ReaderError,
    Spectrum,
    check_measured,
    find_table,
    hdu_data,
    header_number,
    header_text,
    product_key,
    reverse_inverse_error,
)

SURVEY = "lamost"
FORMAT_IMAGE = "lamost-lrs-image"
FORMAT_TABLE = "lamost-lrs-table"
MRS_HDU_NAMES = ("COADD_B", "COADD_R")
SNR_BANDS = "ugriz"
SNR_BAND_USED = "g"  # Spectrum.snr: the g-band S/N, the band LAMOST's own parameter pipeline (LASP) cuts on


def is_lamost(hdul: fits.HDUList) -> bool:
    """True when the primary header says the file comes from LAMOST."""
    return str(hdul[0].header.get("TELESCOP", "")).strip().upper() == "LAMOST"


def is_mrs(hdul: fits.HDUList) -> bool:
    """True for a LAMOST medium-resolution spectrum (blue/red arm coadd tables)."""
    return any(name in hdul for name in MRS_HDU_NAMES)


def _coadd_table(hdul: fits.HDUList) -> fits.BinTableHDU | None:
    """The DR8+ ``COADD`` table with FLUX, IVAR and WAVELENGTH columns, or None."""
    return find_table(hdul, "COADD", {"flux", "ivar", "wavelength"})


def _is_image(hdul: fits.HDUList) -> bool:
    """True when the primary HDU is the (5, N) LRS image."""
    header = hdul[0].header
    return header.get("NAXIS") == 2 and header.get("NAXIS2") == 5


def matches(hdul: fits.HDUList) -> bool:
    """True for a LAMOST LRS file in the image or table format (MRS files do not match)."""
    return is_lamost(hdul) and not is_mrs(hdul) and (_is_image(hdul) or _coadd_table(hdul) is not None)


def exten0_rows(header: fits.Header) -> list[str]:
    """Lower-case row names of the image from ``EXTEN0`` (comma- or blank-separated); empty if absent."""
    return [name.lower() for name in re.split(r"[,\s]+", str(header.get("EXTEN0", "")).strip()) if name]


def header_wavelength(header: fits.Header, npix: int) -> np.ndarray:
    """Log-linear wavelength (Å) from COEFF0/COEFF1 (or CRVAL1/CD1_1), computed in float64, rounded to float32."""
    start = header_number(header, "COEFF0", "CRVAL1")
    step = header_number(header, "COEFF1", "CD1_1", "CDELT1")
    if not (np.isfinite(start) and np.isfinite(step)):
        raise ReaderError("LAMOST image without a wavelength row and without COEFF0/COEFF1 in the header")
    return (10.0 ** (start + step * np.arange(npix))).astype(np.float32)


def _image_arrays(hdul: fits.HDUList) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """flux, ivar, wavelength, andmask and the wavelength origin of an image-format file."""
    image = hdu_data(hdul, 0)
    header = hdul[0].header
    rows = exten0_rows(header)
    if not rows:
        # No row description: rows 0, 1, 3 are flux, inverse variance and andmask in every LRS release; take the
        # wavelength from the header, which is valid for every release (row 2 differs between releases).
        rows = ["flux", "inverse", "", "andmask", "ormask"]
    if len(rows) != image.shape[0]:
        raise ReaderError(f"EXTEN0 names {len(rows)} rows but the image has {image.shape[0]}")
    if "flux" not in rows or "inverse" not in rows:
        raise ReaderError(f"EXTEN0 {header.get('EXTEN0')!r} does not name Flux and Inverse rows")
    flux = image[rows.index("flux")].astype(np.float32)
    inverse_variance = image[rows.index("inverse")].astype(np.float32)
    if "wavelength" in rows:
        wavelength, origin = image[rows.index("wavelength")].astype(np.float32), "image row"
    else:
        wavelength, origin = header_wavelength(header, image.shape[1]), "header COEFF0/COEFF1"
    andmask = image[rows.index("andmask")] if "andmask" in rows else np.zeros(image.shape[1])
    return flux, inverse_variance, wavelength, andmask, origin


def _table_arrays(hdul: fits.HDUList) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """flux, ivar, wavelength, andmask of a DR8+ table-format file (first row of COADD)."""
    hdu = _coadd_table(hdul)
    table = hdu_data(hdul, hdul.index(hdu))
    if len(table) < 1:
        raise ReaderError("LAMOST COADD table has no rows")
    names = {n.lower(): n for n in table.columns.names}

    def cell(name: str) -> np.ndarray:
        return np.asarray(table[names[name]][0]).ravel()

    flux = cell("flux").astype(np.float32)
    inverse_variance = cell("ivar").astype(np.float32)
    wavelength = cell("wavelength").astype(np.float32)
    andmask = cell("andmask") if "andmask" in names else np.zeros(flux.size)
    if not (flux.size == inverse_variance.size == wavelength.size == andmask.size):
        raise ReaderError(
            f"COADD vectors differ in length: flux {flux.size}, ivar {inverse_variance.size}, "
            f"wavelength {wavelength.size}, andmask {andmask.size}"
        )
    return flux, inverse_variance, wavelength, andmask, "table column"


def read_hdul(hdul: fits.HDUList) -> list[Spectrum]:
    """The spectrum of an open LAMOST LRS file (one :class:`Spectrum`, row 0)."""
    if is_mrs(hdul):
        raise ReaderError(mrs_reason())
    if _is_image(hdul):
        flux, inverse_variance, wavelength, andmask, origin = _image_arrays(hdul)
        file_format = FORMAT_IMAGE
    elif _coadd_table(hdul) is not None:
        flux, inverse_variance, wavelength, andmask, origin = _table_arrays(hdul)
        file_format = FORMAT_TABLE
    else:
        raise ReaderError("LAMOST file that is neither a (5, N) LRS image nor a DR8+ COADD table")
    check_measured(flux, inverse_variance)
    error = reverse_inverse_error(inverse_variance, np.median(flux) * DEFAULT_ERROR_FRACTION)

    header = hdul[0].header
    snr = {band: header_number(header, f"SNR{band.upper()}", f"SN_{band.upper()}") for band in SNR_BANDS}
    meta: dict[str, float | str] = {
        "format": file_format,
        "wavelength_source": origin,
        "data_release": header_text(header, "DATA_V"),
        "pipeline_version": header_text(header, "VERSPIPE"),
        "obsid": header_text(header, "OBSID"),
        "designation": header_text(header, "DESIG"),
        "planid": header_text(header, "PLANID"),
        "fiber": header_number(header, "FIBERID"),
        "class": header_text(header, "CLASS"),
        "subclass": header_text(header, "SUBCLASS"),
        "z": header_number(header, "Z"),
        **{f"snr_{band}": value for band, value in snr.items()},
    }
    object_id = header_text(header, "DESIG", "OBSID", "OBJNAME")
    obsid = header_text(header, "OBSID")
    identity = (product_key("lamost", obsid) if obsid else
                product_key("lamost", header_number(header, "LMJD", "MJD"), header_text(header, "PLANID"),
                            header_number(header, "SPID"), header_number(header, "FIBERID")))
    return [
        Spectrum(
            survey=SURVEY,
            kind=KIND_COMBINED,
            grid=GRID_OPTICAL,
            row=0,
            visit=0,
            flux=flux,
            error=error.astype(np.float32),
            mask=np.nan_to_num(np.asarray(andmask, dtype=np.float64)).astype(np.int64),
            wavelength=wavelength,
            object_id=object_id,
            ra=header_number(header, "RA"),
            dec=header_number(header, "DEC"),
            snr=snr[SNR_BAND_USED],
            mjd=header_number(header, "MJD"),
            meta=meta,
            product_key=identity,
            reduction=" ".join(filter(None, (header_text(header, "DATA_V"), header_text(header, "VERSPIPE")))),
            reduction_date=header_text(header, "DATE"),
        )
    ]


def mrs_reason() -> str:
    """Reject reason for LAMOST medium-resolution spectra."""
    return (
        "LAMOST medium-resolution (MRS) spectrum (COADD_B/COADD_R arms, R~7500 around 5000 and 6500 Å): a different "
        "product from the low-resolution spectra the optical models use"
    )


class LamostReader(FitsReader):
    """Reader for LAMOST LRS files (``survey = "lamost"``)."""

    survey = SURVEY
    accepted_surveys = (SURVEY,)
    spectra_survey = SURVEY
    grid = GRID_OPTICAL
    matches = staticmethod(matches)
    read_hdul = staticmethod(read_hdul)

    def mismatch_reason(self, hdul: fits.HDUList) -> str:
        if is_lamost(hdul) and is_mrs(hdul):
            return mrs_reason()
        return "not a LAMOST low-resolution spectrum (TELESCOP LAMOST with a (5, N) image or a COADD table)"
