"""Survey readers: ``read_spectra(path, survey="auto") -> list[Spectrum]`` for apStar, apVisit, BOSS and LAMOST files.

The format is detected from the header and HDU layout (never from the file name); a file that cannot be read as
the asked survey raises :class:`ReaderError` whose message is the reject reason.
"""
from __future__ import annotations

from pathlib import Path

from astropy.io import fits

from catalogbuilder.constants import SURVEY_CHOICES
from catalogbuilder.readers import boss, lamost
from catalogbuilder.readers.apstar import ApStarReader
from catalogbuilder.readers.apvisit import ApVisitReader
from catalogbuilder.readers.base import (
    FitsReader,
    READER_VERSION,
    Reader,
    ReaderError,
    Spectrum,
    file_sha256,
    load_hdul,
    reverse_inverse_error,
)
from catalogbuilder.readers.boss import BossReader
from catalogbuilder.readers.lamost import LamostReader

__all__ = [
    "READERS",
    "ApStarReader",
    "ApVisitReader",
    "BossReader",
    "FitsReader",
    "LamostReader",
    "READER_VERSION",
    "Reader",
    "ReaderError",
    "SURVEY_CHOICES",
    "Spectrum",
    "detect_survey",
    "file_sha256",
    "read_spectra",
    "reverse_inverse_error",
]

AUTO = SURVEY_CHOICES[0]
# Tried in this order by the detection; each tests the header/HDU layout only.
READERS: tuple[FitsReader, ...] = (ApStarReader(), ApVisitReader(), BossReader(), LamostReader())
if SURVEY_CHOICES != (AUTO, *(reader.survey for reader in READERS)):
    raise ImportError(f"constants.SURVEY_CHOICES {SURVEY_CHOICES} does not name the readers' formats")


def _detect(hdul: fits.HDUList) -> FitsReader:
    """The reader of an open file's format; :class:`ReaderError` saying what the file looks like when none fits."""
    for reader in READERS:
        if reader.matches(hdul):
            return reader
    if lamost.is_lamost(hdul) and lamost.is_mrs(hdul):
        raise ReaderError(lamost.mrs_reason(), survey=lamost.SURVEY)
    if boss.is_sdss(hdul):
        raise ReaderError(boss.unsupported_reason(hdul), survey=boss.SURVEY)
    layout = ", ".join(f"{hdu.name or '?'}:{type(hdu).__name__}" for hdu in hdul)
    raise ReaderError(f"unrecognised spectrum format (TELESCOP={hdul[0].header.get('TELESCOP')!r}, HDUs {layout})")


def detect_survey(path: str | Path) -> str:
    """Survey value (``apogee``, ``apogee-visit``, ``boss``, ``lamost``) of the file at ``path``, from its layout."""
    return _detect(load_hdul(path)).survey


def read_spectra(path: str | Path, survey: str = AUTO) -> list[Spectrum]:
    """Every spectrum in the file at ``path`` (native pixels, see :class:`Spectrum`).

    ``survey`` is ``auto`` (detect from header/HDU layout) or one of :data:`SURVEY_CHOICES`; a file of another
    format raises :class:`ReaderError`, as do unreadable, truncated or corrupt files and files with nothing measured.
    The file is read once, read-only, and never modified.
    """
    if survey not in SURVEY_CHOICES:
        raise ValueError(f"unknown survey {survey!r}; expected one of {SURVEY_CHOICES}")
    hdul = load_hdul(path)
    reader = _detect(hdul)
    if survey != AUTO and survey not in reader.accepted_surveys:
        raise ReaderError(f"file is of survey {reader.survey}, not {survey}", survey=reader.spectra_survey, caller=True)
    try:
        spectra = reader.read_hdul(hdul)
    except ReaderError as error:
        raise ReaderError(str(error), survey=reader.spectra_survey) from error
    for spectrum in spectra:
        if not spectrum.object_id:
            spectrum.object_id = Path(path).name
            spectrum.meta["object_id_source"] = "file name (no object id in the header)"
    return spectra
