"""Survey readers: ``read_spectra(path, survey="auto") -> list[Spectrum]`` for apStar, apVisit, BOSS and LAMOST files.

The format is detected from the header and HDU layout (never from the file name); a file that cannot be read as
the asked survey raises :class:`ReaderError` whose message is the reject reason.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from astropy.io import fits

from catalogbuilder.readers import apstar, apvisit, boss, lamost
from catalogbuilder.readers.base import (
    PIXMASK_NO_COVERAGE,
    READER_VERSION,
    Reader,
    ReaderError,
    Spectrum,
    file_sha256,
    load_hdul,
    reverse_inverse_error,
)

__all__ = [
    "PIXMASK_NO_COVERAGE",
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

AUTO = "auto"
# detected format name -> (survey values of read_spectra that accept it, reader of an open HDU list)
_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[fits.HDUList], list[Spectrum]]]] = {
    "apogee": (("apogee",), apstar.read_hdul),
    "apogee-visit": (("apogee-visit", "apogee"), apvisit.read_hdul),
    "boss": (("boss",), boss.read_hdul),
    "lamost": (("lamost",), lamost.read_hdul),
}
_DETECTORS: tuple[tuple[str, Callable[[fits.HDUList], bool]], ...] = (
    ("apogee", apstar.matches),
    ("apogee-visit", apvisit.matches),
    ("boss", boss.matches),
    ("lamost", lamost.matches),
)
SURVEY_CHOICES: tuple[str, ...] = (AUTO, *sorted({s for accepted, _ in _FORMATS.values() for s in accepted}))


def _detect(hdul: fits.HDUList) -> str:
    """Format name of an open file; :class:`ReaderError` naming what it looks like when it is no supported format."""
    for name, matches in _DETECTORS:
        if matches(hdul):
            return name
    if lamost.is_lamost(hdul) and lamost.is_mrs(hdul):
        raise ReaderError(lamost.mrs_reason())
    if boss.is_sdss(hdul):
        raise ReaderError(boss.unsupported_reason(hdul))
    layout = ", ".join(f"{hdu.name or '?'}:{type(hdu).__name__}" for hdu in hdul)
    raise ReaderError(f"unrecognised spectrum format (TELESCOP={hdul[0].header.get('TELESCOP')!r}, HDUs {layout})")


def detect_survey(path: str | Path) -> str:
    """Survey value (``apogee``, ``apogee-visit``, ``boss``, ``lamost``) of the file at ``path``, from its layout."""
    return _detect(load_hdul(path))


def read_spectra(path: str | Path, survey: str = AUTO) -> list[Spectrum]:
    """Every spectrum in the file at ``path`` (native pixels, see :class:`Spectrum`).

    ``survey`` is ``auto`` (detect from header/HDU layout) or one of :data:`SURVEY_CHOICES`; a file of another
    format raises :class:`ReaderError`, as do unreadable, truncated or corrupt files and files with nothing measured.
    The file is read once, read-only, and never modified.
    """
    if survey not in SURVEY_CHOICES:
        raise ValueError(f"unknown survey {survey!r}; expected one of {SURVEY_CHOICES}")
    hdul = load_hdul(path)
    detected = _detect(hdul)
    accepted, read_hdul = _FORMATS[detected]
    if survey != AUTO and survey not in accepted:
        raise ReaderError(f"file is a {detected} file, not {survey}")
    spectra = read_hdul(hdul)
    for spectrum in spectra:
        if not spectrum.object_id:
            spectrum.object_id = Path(path).name
            spectrum.meta["object_id_source"] = "file name (no object id in the header)"
    return spectra
