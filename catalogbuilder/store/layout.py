"""What the spectrum store holds and how it lies on disk: groups, dimensions, per-spectrum columns, chunking, codecs.

One definition for the writer (store/writer.py), the read API (store/handle.py) and ``store check``. docs/store.md
describes every group and column; ``LAYOUT_VERSION`` changes whenever a store written by an older version can no
longer be read as it is (``catalogbuilder store upgrade`` then copies it into the new layout).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from catalogbuilder.constants import DERIVED_GRID_NAME, GRID_SPECS, GridSpec

LAYOUT_VERSION = 2
LAYOUT_ATTR = "catalogbuilder_layout"  # root-group attribute holding the layout version
BRANCH = "main"

SPECTRUM_DIM = "spectrum"
PIXEL_DIM = "pixel"
NATIVE_DIM = "native_value"
FILE_DIM = "file"
REJECT_DIM = "reject"
FILES_GROUP = "files"
REJECTS_GROUP = "rejects"
# Spectra of these grids keep their native pixels (wavelength, flux, error, mask as read) in a flat group: the
# Monte-Carlo draws are made there (SPEC §4) and other grids can be filled from them (``store regrid``).
NATIVE_GROUPS: dict[str, str] = {name: f"{name}_native" for name, spec in GRID_SPECS.items() if spec.resampled}
# Derived grids (``store regrid``) are groups named after the grid holding only flux/error/mask/wavelength, their
# GridSpec in this group attribute; their spectra are the base grid's at the same positions.
GRID_ATTR = "catalogbuilder_grid"
RESERVED_GROUPS: frozenset[str] = frozenset({*GRID_SPECS, *NATIVE_GROUPS.values(), FILES_GROUP, REJECTS_GROUP})
DERIVED_NAME = re.compile(DERIVED_GRID_NAME)

# Chunking: 256 spectra x all pixels per data chunk (apogee flux 8.8 MB, optical 4.0 MB uncompressed); per-spectrum
# columns and the ledger tables 4096 per chunk, so millions of spectra do not become millions of tiny objects;
# native values 2**20 per chunk (4 MB of float32, about 256 optical spectra).
SPECTRUM_CHUNK = 256
COORD_CHUNK = 16 * SPECTRUM_CHUNK
TABLE_CHUNK = 4096
NATIVE_CHUNK = 1 << 20
# Flux and error are noise-dominated floats that barely compress (ratio ~1.04 with lz4, ~1.18 with zstd level 3 on
# resampled LAMOST spectra) while masks compress >100x either way; lz4 runs ~25x faster than zstd, and the single
# client writer is the ingest's bottleneck, so lz4 with byte shuffle it is.
PIXEL_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")

# Per-spectrum columns (coordinates along ``spectrum``) and their dtypes. ``str`` columns are Zarr v3 strings.
SPECTRUM_COLUMNS: dict[str, str] = {
    "spectrum_id": "str",  # "{survey}-{file_sha256[:16]}-{row}", unique
    "source_id": "str",  # survey object id (the star)
    "survey": "str",
    "kind": "str",  # constants.KINDS
    "file_path": "str",
    "file_sha256": "str",
    "reader_version": "str",
    "ingest_time": "str",
    "row": "int64",
    "visit": "int64",
    "ra": "float64",
    "dec": "float64",
    "snr": "float64",
    "mjd": "float64",
    "tmass_j": "float64",
    "tmass_h": "float64",
    "tmass_k": "float64",
    "e_tmass_j": "float64",
    "e_tmass_h": "float64",
    "e_tmass_k": "float64",
    "star_key": "uint64",  # stable 64-bit hash of (survey, source_id): the star, for one allStar row per star
    "good_pixel_fraction": "float32",  # grid pixels with positive flux and a usable error (store/quality.py)
    "flux_constant": "bool",  # the model input is constant (e.g. all-zero flux)
    "active": "bool",  # False once the file is superseded or retired (docs/store.md, "Lineage")
}
NATIVE_COLUMNS: dict[str, str] = {"native_offset": "int64", "native_length": "int64"}  # grids with native arrays
PHOTOMETRY_KEYS: tuple[str, ...] = ("tmass_j", "tmass_h", "tmass_k", "e_tmass_j", "e_tmass_h", "e_tmass_k")
MUTABLE_SPECTRUM_COLUMNS: tuple[str, ...] = ("active",)  # the only per-spectrum column changed after its ingest

# The files ledger: one row per ingested file (and grid). Status codes below; ``first_position`` + ``n_spectra`` give
# the file's contiguous spectra in its grid; ``sha_key``/``path_key``/``product_hash`` are 64-bit hashes that let an
# ingest find known bytes, paths and products by reading numbers only.
FILE_COLUMNS: dict[str, str] = {
    "file_path": "str",
    "file_sha256": "str",
    "grid": "str",
    "survey": "str",
    "n_spectra": "int64",
    "first_position": "int64",
    "reader_version": "str",
    "ingest_time": "str",
    "product_key": "str",
    "reduction": "str",
    "reduction_date": "str",
    "sha_key": "uint64",
    "path_key": "uint64",
    "product_hash": "uint64",
    "status": "int8",
    "status_time": "str",
    "status_reason": "str",
}
FILE_ACTIVE, FILE_SUPERSEDED, FILE_RETIRED = 0, 1, 2
FILE_STATUS_NAMES: dict[int, str] = {FILE_ACTIVE: "active", FILE_SUPERSEDED: "superseded", FILE_RETIRED: "retired"}
MUTABLE_FILE_COLUMNS: tuple[str, ...] = ("status", "status_time", "status_reason")

# Rejected inputs: one row per input that could not be ingested. ``sticky`` is False when the reason came from the
# caller's choice (a file of another survey than asked): such a reject is retried whenever it is given again.
REJECT_COLUMNS: dict[str, str] = {
    "file_path": "str",
    "file_sha256": "str",  # "" when the file could not even be read
    "reason": "str",
    "time": "str",
    "reader_version": "str",
    "survey": "str",  # survey the reader detected, or "" when none could be
    "requested_survey": "str",
    "path_key": "uint64",
    "sticky": "bool",
    "status": "int8",
}
REJECT_CURRENT, REJECT_RESOLVED, REJECT_RETIRED = 0, 1, 2
REJECT_STATUS_NAMES: dict[int, str] = {REJECT_CURRENT: "current", REJECT_RESOLVED: "resolved", REJECT_RETIRED: "retired"}
MUTABLE_REJECT_COLUMNS: tuple[str, ...] = ("status",)

ATTRS: dict[str, dict[str, str]] = {
    "flux": {"units": "flux units of the source file (SDSS: 1e-17 erg s-1 cm-2 Angstrom-1)"},
    "error": {"units": "same as flux", "long_name": "1-sigma flux uncertainty"},
    "mask": {"long_name": "survey pixel bitmask (OR of the bracketing native pixels); top bit: no native coverage"},
    "wavelength": {"units": "Angstrom", "long_name": "vacuum wavelength"},
    "ra": {"units": "deg"},
    "dec": {"units": "deg"},
    "snr": {"long_name": "survey signal-to-noise ratio (NaN if unknown)"},
    "mjd": {"units": "d", "long_name": "modified Julian date of the observation (NaN if unknown)"},
    "ingest_time": {"long_name": "UTC time of the ingest (ISO 8601)"},
    **{key: {"units": "mag", "long_name": f"2MASS {key} from the file header (NaN if missing)"} for key in PHOTOMETRY_KEYS},
}


def stable_key(text: str) -> np.uint64:
    """A 64-bit key of a string that is the same on every machine and Python (BLAKE2b, not ``hash``)."""
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


def star_key(survey: str, source_id: str) -> np.uint64:
    """The key of a star within a survey: one allStar row per key and model."""
    return stable_key(f"{survey}\x1f{source_id}")


def sha_key(sha256: str) -> np.uint64:
    """The first 8 bytes of a SHA-256 hex digest as a number (0 for an empty checksum)."""
    return np.uint64(int(sha256[:16], 16)) if sha256 else np.uint64(0)


def column_array(values: Sequence[Any] | np.ndarray, dtype: str) -> np.ndarray:
    """Values of one column in the store's dtype (``str`` columns as object arrays of ``str``)."""
    if dtype == "str":
        return np.asarray([str(value) for value in values], dtype=object)
    return np.asarray(values, dtype=dtype)


def plain_strings(values: np.ndarray) -> np.ndarray:
    """Zarr strings come back as numpy StringDType; hand out plain object arrays of ``str``."""
    return values.astype(object) if values.dtype.kind == "T" else values


def read_arrays(zstore: Any, group: str, names: Sequence[str], selection: slice | np.ndarray = slice(None)
                ) -> dict[str, np.ndarray]:
    """Columns of a group as numpy arrays (strings as object arrays of str), ``selection`` a slice or sorted positions."""
    root = zarr.open_group(zstore, path=group, mode="r", zarr_format=3)
    out = {}
    for name in names:
        array = root[name]
        values = array[selection] if isinstance(selection, slice) else array.oindex[np.asarray(selection, np.int64)]
        out[name] = plain_strings(np.asarray(values))
    return out


def grid_columns(spec: GridSpec) -> dict[str, str]:
    """Every per-spectrum column of a grid group (native offsets where the grid keeps native arrays); none for a
    derived grid, whose spectra are those of its base grid at the same positions."""
    if spec.base is not None:
        return {}
    return {**SPECTRUM_COLUMNS, **(NATIVE_COLUMNS if spec.name in NATIVE_GROUPS else {})}


@dataclasses.dataclass
class NativeBlock:
    """Native pixels of n spectra as flat arrays (values of spectrum i: ``lengths[:i].sum()`` onwards): wavelength
    (Å, float32), flux and 1σ error (float32, as the reader returns them), survey mask (the grid's mask dtype)."""

    wavelength: np.ndarray
    flux: np.ndarray
    error: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def n_values(self) -> int:
        return int(self.wavelength.size)

    @classmethod
    def concat(cls, blocks: Sequence[NativeBlock]) -> NativeBlock:
        """One block holding the spectra of ``blocks`` in order."""
        return cls(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in dataclasses.fields(cls)))

    def to_dataset(self) -> xr.Dataset:
        """The values as a Dataset of the native group (dim ``native_value``)."""
        names = ("wavelength", "flux", "error", "mask")
        return xr.Dataset({name: (NATIVE_DIM, getattr(self, name)) for name in names})


@dataclasses.dataclass
class GridBlock:
    """Spectra on one model grid, ready to append: ``flux``/``error`` float32 and ``mask`` (the grid's mask dtype) of
    shape (n, npix), one array of length n per column of :func:`grid_columns` (the writer fills ``native_offset`` and
    ``native_length`` when it takes the block) and, for grids with native arrays, the native pixels."""

    grid: str
    flux: np.ndarray
    error: np.ndarray
    mask: np.ndarray
    columns: dict[str, np.ndarray]
    native: NativeBlock | None = None

    def __len__(self) -> int:
        return self.flux.shape[0]

    @classmethod
    def concat(cls, blocks: Sequence[GridBlock]) -> GridBlock:
        """One block holding the rows of ``blocks`` in order (all on the same grid)."""
        natives = [b.native for b in blocks if b.native is not None]
        return cls(
            grid=blocks[0].grid,
            flux=np.concatenate([b.flux for b in blocks]),
            error=np.concatenate([b.error for b in blocks]),
            mask=np.concatenate([b.mask for b in blocks]),
            columns={name: np.concatenate([b.columns[name] for b in blocks]) for name in blocks[0].columns},
            native=NativeBlock.concat(natives) if natives else None,
        )

    def split(self, n: int) -> tuple[GridBlock, GridBlock]:
        """The first ``n`` rows and a copy of the rest, so a kept tail does not pin the whole block."""
        native_head = native_tail = None
        if self.native is not None:
            cut = int(self.native.lengths[:n].sum())
            values = ("wavelength", "flux", "error", "mask")
            native_head = NativeBlock(*(getattr(self.native, f)[:cut] for f in values), self.native.lengths[:n])
            native_tail = NativeBlock(*(getattr(self.native, f)[cut:].copy() for f in values),
                                      self.native.lengths[n:].copy())
        head = GridBlock(self.grid, self.flux[:n], self.error[:n], self.mask[:n],
                         {k: v[:n] for k, v in self.columns.items()}, native_head)
        tail = GridBlock(self.grid, self.flux[n:].copy(), self.error[n:].copy(), self.mask[n:].copy(),
                         {k: v[n:].copy() for k, v in self.columns.items()}, native_tail)
        return head, tail

    def to_dataset(self, spec: GridSpec) -> xr.Dataset:
        """The rows as a Dataset of the grid group (without ``wavelength``; the native values go to their own group)."""
        dims = (SPECTRUM_DIM, PIXEL_DIM)
        columns = grid_columns(spec)
        missing = sorted(set(columns) - set(self.columns))
        if missing:
            raise ValueError(f"{self.grid} block lacks the columns {missing}")
        coords = {name: (SPECTRUM_DIM, column_array(self.columns[name], dtype)) for name, dtype in columns.items()}
        dataset = xr.Dataset({"flux": (dims, self.flux), "error": (dims, self.error), "mask": (dims, self.mask)},
                             coords=coords)
        for name, attrs in ATTRS.items():
            if name in dataset.variables:
                dataset[name].attrs.update(attrs)
        return dataset


def grid_spec(grid: str) -> GridSpec:
    """The :class:`~catalogbuilder.constants.GridSpec` of a built-in (ingest) grid."""
    if grid not in GRID_SPECS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {tuple(GRID_SPECS)}")
    return GRID_SPECS[grid]


def derived_grid(name: str, base: str, start: float, pixels: int, stop: float | None = None,
                 step: float | None = None, spacing: str = "linear") -> GridSpec:
    """A model-defined grid filled by ``store regrid`` from the native pixels of ``base``'s spectra: ``linear``
    (``start``..``stop`` Å, ``pixels`` points, as ``torch.linspace`` in float32) or ``log-linear`` (log10 λ =
    ``start`` + ``step``·i). ``ValueError`` naming the problem: a name that is not a plain lower-case word (or is
    taken by the store's own groups), a base without native pixels, wavelengths that do not increase."""
    if not DERIVED_NAME.fullmatch(name) or name in RESERVED_GROUPS or name.endswith("_native"):
        raise ValueError(f"grid name {name!r}: use lower-case letters, digits, '-', '_' or '.', not one of "
                         f"{sorted(RESERVED_GROUPS)} or ending in '_native'")
    if base not in NATIVE_GROUPS:
        raise ValueError(f"grid {name!r}: base {base!r} keeps no native pixels; a derived grid needs one of "
                         f"{sorted(NATIVE_GROUPS)}")
    if spacing == "linear" and stop is not None and not stop > start:
        raise ValueError(f"grid {name!r}: stop ({stop}) must be above start ({start})")
    if spacing == "log-linear" and step is not None and not step > 0:
        raise ValueError(f"grid {name!r}: step ({step}) must be positive")
    return GridSpec(name, spacing, float(start), int(pixels), GRID_SPECS[base].mask_dtype,
                    stop=None if stop is None else float(stop), step=None if step is None else float(step),
                    resampled=True, base=base)


def spec_attrs(spec: GridSpec) -> dict[str, Any]:
    """A derived grid's spec as the group attribute :data:`GRID_ATTR` (JSON values)."""
    return dataclasses.asdict(spec)


def spec_from_attrs(attrs: dict[str, Any]) -> GridSpec:
    """The :class:`GridSpec` recorded by :func:`spec_attrs`."""
    return GridSpec(**attrs)


def table_dataset(rows: Sequence[dict[str, Any]], columns: dict[str, str], dim: str) -> xr.Dataset:
    """Ledger rows (``files`` or ``rejects``) as a Dataset with the columns' dtypes."""
    return xr.Dataset({name: (dim, column_array([row[name] for row in rows], dtype)) for name, dtype in columns.items()})


def chunk_encoding(dataset: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Explicit chunks (and the pixel codec) for every variable of a group being created."""
    encoding: dict[str, dict[str, Any]] = {}
    for name, variable in dataset.variables.items():
        if variable.dims == (SPECTRUM_DIM, PIXEL_DIM):
            encoding[name] = {"chunks": (SPECTRUM_CHUNK, variable.shape[1]), "compressors": [PIXEL_CODEC]}
        elif variable.dims == (PIXEL_DIM,):
            encoding[name] = {"chunks": variable.shape}
        elif variable.dims == (SPECTRUM_DIM,):
            encoding[name] = {"chunks": (COORD_CHUNK,)}
        elif variable.dims == (NATIVE_DIM,):
            encoding[name] = {"chunks": (NATIVE_CHUNK,), "compressors": [PIXEL_CODEC]}
        else:
            encoding[name] = {"chunks": (TABLE_CHUNK,)}
    return encoding
