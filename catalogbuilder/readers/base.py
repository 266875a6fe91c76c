"""The one reader interface: every survey reader turns a FITS file into a list of :class:`Spectrum`."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

READER_VERSION = "1"


class ReaderError(Exception):
    """A file that cannot be read as the requested format; the message is the reason recorded in the rejects."""


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


class Reader(Protocol):
    """A survey reader: ``read(path) -> list[Spectrum]``; raises :class:`ReaderError` with a reason on bad input."""

    survey: str

    def read(self, path: Path) -> list[Spectrum]: ...


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (the idempotency key of ingest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
