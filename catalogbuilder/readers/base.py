"""The one reader interface: every survey reader turns a FITS file into a list of :class:`Spectrum`."""
from __future__ import annotations

import abc
import dataclasses
import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
from astropy.io import fits

from catalogbuilder.constants import ERROR_CAP_FACTOR, USABLE_ERROR_MAX_RATIO
from catalogbuilder.tables import ValueKind, as_measured, missing_mask, unmeasured_magnitude

READER_VERSION = "1"


class ReaderError(Exception):
    """A file that cannot be read as the requested format; the message is the reason recorded in the rejects.

    ``survey``: the format the file was recognised as ("" when none); ``caller``: the reason is the caller's choice
    (another survey was asked for), not the file, so the reject is retried when the file is given again."""

    def __init__(self, reason: str, survey: str = "", caller: bool = False) -> None:
        super().__init__(reason)
        self.survey = survey
        self.caller = caller


@dataclasses.dataclass
class Spectrum:
    """One spectrum as read from a file, before it is put on a model grid.

    flux, error: float32, flux units of the file (1e-17 erg/s/cm²/Å for SDSS). error is 1σ (never ivar).
    mask: int64 pixel bitmask of the survey (APOGEE PIXMASK, BOSS and_mask, LAMOST andmask).
    wavelength: float32 native wavelength in Å (vacuum, rest frame for APOGEE visits); ``None`` when the pixels
    already lie on the model grid ``grid`` (apStar rows).
    """

    survey: str  # "apogee" | "boss" | "lamost"
    kind: str  # "combined" | "visit"
    grid: str  # model grid it belongs on: "apogee" | "optical"
    row: int  # image row (apStar) or 0 for single-spectrum files; part of the idempotency key with the file checksum
    visit: int  # visit number (1-based) for visit spectra, 0 for combined spectra
    flux: np.ndarray
    error: np.ndarray
    mask: np.ndarray
    wavelength: np.ndarray | None
    object_id: str  # survey object id (APOGEE_ID, BOSS/LAMOST designation or plate-mjd-fiber)
    ra: float  # deg (ICRS)
    dec: float  # deg
    snr: float  # survey S/N of this spectrum (NaN if unknown)
    mjd: float  # MJD of the observation (NaN for combined spectra without one)
    meta: dict[str, float | str] = dataclasses.field(default_factory=dict)  # header photometry etc. (see docs/store.md)
    # Identity across reductions (docs/store.md, "Lineage"): the observation or product this file is a reduction of
    # ("" when the header does not say), the reduction's version and its creation date (ISO, header DATE; "" unknown).
    product_key: str = ""
    reduction: str = ""
    reduction_date: str = ""


class Reader(Protocol):
    """A survey reader: ``read(path) -> list[Spectrum]``; raises :class:`ReaderError` with a reason on bad input."""

    survey: str

    def read(self, path: Path) -> list[Spectrum]: ...


class FitsReader(abc.ABC):
    """Base of the survey readers: a FITS layout test and a reader of an open, fully loaded HDU list.

    ``survey`` is the ``read_spectra`` survey value of the format; ``accepted_surveys`` every value that may ask for it;
    ``spectra_survey`` and ``grid`` say where its spectra belong (also for a file that is rejected).
    """

    survey: str = ""
    accepted_surveys: tuple[str, ...] = ()
    spectra_survey: str = ""  # ``Spectrum.survey`` of what it reads (the release tables' survey)
    grid: str = ""  # the model grid its spectra go on

    @abc.abstractmethod
    def matches(self, hdul: fits.HDUList) -> bool:
        """True when the header/HDU layout is this reader's format."""

    @abc.abstractmethod
    def read_hdul(self, hdul: fits.HDUList) -> list[Spectrum]:
        """Every spectrum of an open file of this format."""

    def mismatch_reason(self, hdul: fits.HDUList) -> str:
        """Reject reason for a file that is not of this format."""
        return f"not a {self.survey} file"

    def read(self, path: Path) -> list[Spectrum]:
        """Every spectrum of the file at ``path``; :class:`ReaderError` if it is unreadable or of another format."""
        hdul = load_hdul(path)
        if not self.matches(hdul):
            raise ReaderError(self.mismatch_reason(hdul))
        return self.read_hdul(hdul)


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (the idempotency key of ingest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# --- helpers shared by the survey readers ---------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def load_hdul(path: str | Path) -> fits.HDUList:
    """Read a FITS file (plain or gzip-compressed, detected from its bytes) fully into memory.

    The file is opened read-only and never modified; no memory map is kept, so a later change of the file cannot
    change the arrays. Raises :class:`ReaderError` for a missing, unreadable, truncated or non-FITS file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ReaderError(f"cannot read file: {exc.strerror or exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ReaderError(f"corrupt or truncated gzip file: {exc}") from exc
    if not raw:
        raise ReaderError("empty file")
    try:
        hdul = fits.open(io.BytesIO(raw), mode="readonly", memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ReaderError(f"not a readable FITS file: {exc}") from exc
    last = hdul.fileinfo(len(hdul) - 1)  # HDUs are stored in sequence: the last one ends the file
    end = last["datLoc"] + last["datSpan"]
    if end > len(raw):
        raise ReaderError(f"truncated FITS file: its headers need {end} bytes, it has {len(raw)}")
    if raw[end:].strip(b"\0 "):
        raise ReaderError(f"corrupt FITS file: {len(raw) - end} bytes after the last complete HDU (truncated header?)")
    return hdul


def hdu_data(hdul: fits.HDUList, key: int | str) -> np.ndarray | fits.FITS_rec:
    """Data of one HDU; :class:`ReaderError` when the HDU is missing, empty or its bytes do not decode."""
    try:
        data = hdul[key].data
    except (KeyError, IndexError) as exc:
        raise ReaderError(f"missing HDU {key!r}") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise ReaderError(f"HDU {key!r} cannot be decoded: {exc}") from exc
    if data is None:
        raise ReaderError(f"HDU {key!r} holds no data")
    return data


def find_table(hdul: fits.HDUList, name: str, required_columns: set[str]) -> fits.BinTableHDU | None:
    """The binary-table HDU called ``name`` (any case) that has all ``required_columns`` (lower-case names,
    matched case-insensitively), or None."""
    for hdu in hdul[1:]:
        if hdu.name.upper() == name.upper() and isinstance(hdu, fits.BinTableHDU):
            if required_columns <= {column.lower() for column in hdu.columns.names}:
                return hdu
    return None


def header_number(header: fits.Header, *keys: str, kind: ValueKind | None = None) -> float:
    """First of ``keys`` present in ``header`` with a finite numeric value, as float; NaN if none.

    With a ``kind`` (photometry) the missing-value policy of :mod:`catalogbuilder.tables` decides instead: e.g. the
    SDSS/LAMOST placeholders of a missing magnitude (99, -9999.99) or a non-positive error count as missing.
    """
    for key in keys:
        value = header.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not np.isfinite(number) or (kind is not None and missing_mask(number, kind)):
            continue
        return number
    return float("nan")


TMASS_BANDS: tuple[str, ...] = ("J", "H", "K")  # 2MASS header keywords of SDSS APOGEE files


def tmass_photometry(header: fits.Header, errors: dict[str, float]) -> dict[str, float]:
    """``tmass_j/h/k`` and ``e_tmass_j/h/k`` (mag): the header's ``J``, ``H``, ``K`` with ``errors[band]``, NaN where
    the missing-value policy of :mod:`catalogbuilder.tables` says missing (placeholders, a non-positive error, and
    a magnitude with an error above 1 mag together with its error)."""
    meta: dict[str, float] = {}
    for band in TMASS_BANDS:
        magnitude = header_number(header, band, kind=ValueKind.MAGNITUDE)
        error = float(as_measured(errors.get(band, float("nan")), ValueKind.ERROR))
        if unmeasured_magnitude(error):
            magnitude = error = float("nan")
        meta[f"tmass_{band.lower()}"], meta[f"e_tmass_{band.lower()}"] = magnitude, error
    return meta


def product_key(kind: str, *parts: object) -> str:
    """``kind|part|part…`` identity of a survey product, or "" when any part is missing (blank, NaN, non-positive)."""
    texts = []
    for part in parts:
        if isinstance(part, float) and not (np.isfinite(part) and part > 0):
            return ""
        text = f"{part:.0f}" if isinstance(part, float) else str(part).strip()
        if not text:
            return ""
        texts.append(text)
    return "|".join([kind, *texts])


def header_text(header: fits.Header, *keys: str) -> str:
    """First of ``keys`` present in ``header`` with a non-blank value, stripped; empty string if none."""
    for key in keys:
        value = header.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def reverse_inverse_error(inverse_variance: np.ndarray, default_error: float) -> np.ndarray:
    """1σ error from inverse variance, exactly as the BOSS Net reference (``reverse_inverse_error``).

    NaN ivar counts as 0; error = (1/ivar)**0.5 in the dtype of ``inverse_variance`` (inf where ivar = 0, NaN where
    ivar < 0). If every error is inf, ``default_error`` (0.1 × median flux by convention) is used everywhere. Then
    errors are capped at 5 × the median of the non-inf errors and NaN errors are set to that cap.
    """
    inverse_variance = np.nan_to_num(np.asarray(inverse_variance))
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.divide(1, inverse_variance) ** 0.5
        if np.isinf(error).all():
            error = np.full(error.shape, default_error).astype(inverse_variance.dtype)
        cap = ERROR_CAP_FACTOR * np.nanmedian(error[error != np.inf])
    error = np.clip(error, a_min=None, a_max=cap)
    return np.where(np.isnan(error), cap, error)


def check_measured(flux: np.ndarray, inverse_variance: np.ndarray | None = None) -> None:
    """Reject a spectrum with nothing measured: all-NaN flux, or (when given) no positive finite ivar."""
    if not np.isfinite(flux).any():
        raise ReaderError("flux is NaN or infinite everywhere")
    if inverse_variance is not None and not (np.isfinite(inverse_variance) & (inverse_variance > 0)).any():
        raise ReaderError("inverse variance is zero everywhere (nothing measured)")


def usable_errors(flux: np.ndarray, error: np.ndarray) -> np.ndarray:
    """True where a pixel's 1σ error is usable: finite, > 0 and below ``USABLE_ERROR_MAX_RATIO`` × the median |flux| of
    its row (rows along the last axis; APOGEE flags bad pixels with errors of 1e10 and more)."""
    flux = np.asarray(flux, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        scale = np.nanmedian(np.where(np.isfinite(flux), np.abs(flux), np.nan), axis=-1, keepdims=True)
        return np.isfinite(error) & (error > 0) & (error < USABLE_ERROR_MAX_RATIO * np.nan_to_num(scale))


def check_usable_errors(flux: np.ndarray, error: np.ndarray) -> None:
    """Reject a file none of whose pixels has a usable error (see :func:`usable_errors`): all 0, all ∞ or absurdly
    large errors mean nothing was measured, as zero inverse variance everywhere does for BOSS and LAMOST."""
    if not usable_errors(flux, error).any():
        raise ReaderError("no pixel has a usable error (errors are 0, infinite or >= "
                          f"{USABLE_ERROR_MAX_RATIO:g} x the median flux everywhere): nothing measured")


def bracketing_mask(native_wavelength: np.ndarray, native_mask: np.ndarray, target: np.ndarray,
                    no_coverage: int) -> np.ndarray:
    """int64 mask on ``target``: OR of the native pixels just below and just above each target wavelength
    (the one pixel at the ends), with the grid's ``no_coverage`` bit outside [first, last] native wavelength."""
    native_mask = np.asarray(native_mask, dtype=np.int64)
    upper = np.searchsorted(native_wavelength, target, side="left").clip(0, native_wavelength.size - 1)
    lower = (np.searchsorted(native_wavelength, target, side="right") - 1).clip(0, native_wavelength.size - 1)
    mask = native_mask[lower] | native_mask[upper]
    outside = (target < native_wavelength[0]) | (target > native_wavelength[-1])
    return np.where(outside, mask | no_coverage, mask)


def interpolate_onto(
    wavelength: np.ndarray, flux: np.ndarray, error: np.ndarray, mask: np.ndarray, target: np.ndarray, no_coverage: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of one spectrum onto ``target`` wavelengths (Å) with the reference semantics.

    Pixels with NaN flux are dropped with their wavelength; wavelengths are sorted if they are not ascending;
    outside the native range the first/last value is held. Returns float32 flux and error, int64 mask.
    Raises ``ValueError`` when no pixel has a finite flux.
    """
    keep = ~np.isnan(flux)
    if not keep.any():
        raise ValueError("spectrum has no non-NaN flux pixel to interpolate")
    wavelength, flux, error, mask = wavelength[keep], flux[keep], error[keep], mask[keep]
    if np.any(np.diff(wavelength) < 0):
        order = np.argsort(wavelength, kind="stable")
        wavelength, flux, error, mask = wavelength[order], flux[order], error[order], mask[order]
    return (
        np.interp(target, wavelength, flux).astype(np.float32),
        np.interp(target, wavelength, error).astype(np.float32),
        bracketing_mask(wavelength, mask, target, no_coverage),
    )
