"""``store check``: the invariants of a snapshot of the spectrum store (docs/store.md), each reported in one line."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import zarr

from catalogbuilder.constants import GRIDS, GridSpec
from catalogbuilder.store.layout import (
    FILE_ACTIVE,
    FILES_GROUP,
    NATIVE_DIM,
    NATIVE_GROUPS,
    PIXEL_DIM,
    REJECTS_GROUP,
    SPECTRUM_DIM,
    grid_columns,
    grid_spec,
)
from catalogbuilder.store.writer import group_length, has_group

if TYPE_CHECKING:
    from catalogbuilder.store.handle import SpectrumStore


def check_store(store: SpectrumStore) -> list[str]:
    """Every problem found in the store's snapshot (see :meth:`SpectrumStore.check`); empty when consistent."""
    zstore = store._zstore()
    ledger = store.files()
    problems: list[str] = []
    for grid in GRIDS:
        mine = ledger.loc[ledger["grid"] == grid]
        if not has_group(zstore, grid):
            if len(mine):
                problems.append(f"{grid}: the files ledger lists files but the group is missing")
            continue
        problems += _check_grid(store, zarr.open_group(zstore, path=grid, mode="r", zarr_format=3), grid, mine)
    for grid, spec in store.derived_grids().items():
        problems += _check_derived(store, zarr.open_group(zstore, path=grid, mode="r", zarr_format=3), spec)
    if has_group(zstore, REJECTS_GROUP):
        rejects = zarr.open_group(zstore, path=REJECTS_GROUP, mode="r", zarr_format=3)
        if len({array.shape for _, array in rejects.arrays()}) > 1:
            problems.append("rejects: columns differ in length")
    if has_group(zstore, FILES_GROUP):
        files = zarr.open_group(zstore, path=FILES_GROUP, mode="r", zarr_format=3)
        if len({array.shape for _, array in files.arrays()}) > 1:
            problems.append("files: columns differ in length")
    return problems


def _check_grid(store: SpectrumStore, group: zarr.Group, grid: str, ledger: pd.DataFrame) -> list[str]:
    arrays = dict(group.arrays())
    n, problems = _check_arrays(arrays, grid_spec(grid))
    if n is None:
        return problems
    columns = store.columns(grid, ("spectrum_id", "survey", "file_sha256", "row", "active"))
    ids = columns["spectrum_id"].astype(str)
    if ids.duplicated().any():
        problems.append(f"{grid}: {int(ids.duplicated().sum())} duplicate spectrum_id values")
    expected = columns["survey"].astype(str) + "-" + columns["file_sha256"].astype(str).str[:16] + "-" + \
        columns["row"].astype(str)
    if not (ids == expected).all():
        problems.append(f"{grid}: spectrum_id does not match survey-sha256[:16]-row")
    problems += _check_ledger(grid, n, columns, ledger)
    if grid in NATIVE_GROUPS:
        problems += _check_native(store, grid, n)
    return problems


def _check_arrays(arrays: dict[str, zarr.Array], spec: GridSpec) -> tuple[int | None, list[str]]:
    """The spectra count of a grid group (None when it cannot be told) and the problems of its arrays: all there,
    of one length along ``spectrum``, on the grid's pixel axis and wavelengths, masks in the grid's dtype."""
    grid = spec.name
    missing = [name for name in (*grid_columns(spec), "flux", "error", "mask", "wavelength") if name not in arrays]
    if missing:
        return None, [f"{grid}: missing arrays {missing}"]
    lengths = {name: array.shape[0] for name, array in arrays.items() if array.metadata.dimension_names[0] == SPECTRUM_DIM}
    if len(set(lengths.values())) != 1:
        return None, [f"{grid}: per-spectrum arrays differ in length: {lengths}"]
    n = next(iter(lengths.values()))
    problems = []
    if any(arrays[name].shape != (n, spec.pixels) for name in ("flux", "error", "mask")) or (
            arrays["wavelength"].shape != (spec.pixels,)):
        problems.append(f"{grid}: pixel axis ({PIXEL_DIM}) is not the {spec.pixels}-pixel grid")
    elif not np.array_equal(arrays["wavelength"][:], np.asarray(spec.wavelength(), np.float64)):
        problems.append(f"{grid}: stored wavelengths differ from the grid's")
    if arrays["mask"].dtype != np.dtype(spec.mask_dtype):
        problems.append(f"{grid}: mask dtype {arrays['mask'].dtype}, expected {spec.mask_dtype}")
    return n, problems


def _check_derived(store: SpectrumStore, group: zarr.Group, spec: GridSpec) -> list[str]:
    """A derived grid: whole arrays, no more spectra than its base grid (it may lag until the next regrid)."""
    n, problems = _check_arrays(dict(group.arrays()), spec)
    if n is not None and n > store.length(spec.base):
        problems.append(f"{spec.name}: {n} spectra, more than the {store.length(spec.base)} of its base grid "
                        f"{spec.base}")
    return problems


def _check_ledger(grid: str, n: int, columns: pd.DataFrame, ledger: pd.DataFrame) -> list[str]:
    """The ledger's rows of a grid cover its spectra exactly, in place, with the right ``active`` flags."""
    if int(ledger["n_spectra"].sum()) != n:
        return [f"{grid}: files ledger ({int(ledger['n_spectra'].sum())} spectra) does not match the {n} stored"]
    sha = np.full(n, "", dtype=object)
    active = np.zeros(n, dtype=bool)
    covered = np.zeros(n, dtype=np.int64)
    for first, count, file_sha, status in ledger[["first_position", "n_spectra", "file_sha256", "status"]].itertuples(
            index=False):
        sha[first:first + count] = file_sha
        active[first:first + count] = status == FILE_ACTIVE
        covered[first:first + count] += 1
    problems = []
    if (covered != 1).any():
        problems.append(f"{grid}: {int((covered != 1).sum())} spectra are not covered by exactly one ledger row")
    if (columns["file_sha256"].astype(str).to_numpy() != sha).any():
        problems.append(f"{grid}: spectra do not lie where the files ledger says (file_sha256 differs)")
    if (columns["active"].astype(bool).to_numpy() != active).any():
        problems.append(f"{grid}: active flags disagree with the files' status in the ledger")
    return problems


def _check_native(store: SpectrumStore, grid: str, n: int) -> list[str]:
    """Native offsets are consecutive and inside the native arrays."""
    where = store.columns(grid, ("native_offset", "native_length"))
    offsets, lengths = where["native_offset"].to_numpy(np.int64), where["native_length"].to_numpy(np.int64)
    total = group_length(store._zstore(), NATIVE_GROUPS[grid], NATIVE_DIM)
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else offsets
    problems = []
    if (offsets != expected).any() or (lengths < 1).any():
        problems.append(f"{grid}: native offsets are not consecutive or a spectrum has no native pixels")
    if n and int(offsets[-1] + lengths[-1]) != total:
        problems.append(f"{grid}: native arrays hold {total} values, the spectra {int(offsets[-1] + lengths[-1])}")
    native = dict(zarr.open_group(store._zstore(), path=NATIVE_GROUPS[grid], mode="r", zarr_format=3).arrays()) if (
        total) else {}
    if len({array.shape for array in native.values()}) > 1:
        problems.append(f"{NATIVE_GROUPS[grid]}: arrays differ in length")
    values = [name for name in ("wavelength", "flux", "error", "mask") if total and name not in native]
    if values:
        problems.append(f"{NATIVE_GROUPS[grid]}: missing arrays {values}")
    return problems
