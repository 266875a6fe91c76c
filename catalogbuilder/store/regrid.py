"""``store regrid``: put the spectra of a resampled ingest grid onto a model's own grid, from the store alone.

A model may be trained on another wavelength range or pixel count than the ingest's optical grid (its
``catalogbuilder.yaml`` declares the grid, ``models/registry.py``). The store keeps every optical spectrum's native
pixels, so such a *derived* grid is filled without the FITS files: each spectrum's native wavelength, flux, error and
mask are interpolated onto the derived wavelengths exactly as the ingest interpolates onto its own grid
(``readers.base.interpolate_onto``; a derived grid with the ingest grid's wavelengths reproduces its arrays bit for bit).

The derived grid is a group holding flux/error/mask only; its spectrum at position i is the base grid's spectrum i
(columns, activity, native pixels and results are read from there). Incremental: only positions beyond the derived
grid's length are computed, so a nightly run regrids the new spectra only. Atomic per commit: every
:data:`COMMIT_SPECTRA` spectra and at the end one commit lays the new rows on top of whatever was committed meanwhile
(an ingest touches other arrays, icechunk's conflict detector lets both stand); a killed regrid loses at most the
uncommitted part and the next run goes on from the committed length.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import icechunk
import numpy as np
from tqdm.auto import tqdm

from catalogbuilder import __version__
from catalogbuilder.constants import GridSpec
from catalogbuilder.readers.base import interpolate_onto
from catalogbuilder.files import error_line
from catalogbuilder.store.errors import StoreError, StoreWriteError
from catalogbuilder.store.ingest import default_batch_size, map_in_order
from catalogbuilder.store.layout import SPECTRUM_CHUNK, GridBlock

if TYPE_CHECKING:
    from distributed import Client

    from catalogbuilder.store.handle import SpectrumStore, StoreRef
    from catalogbuilder.store.writer import StoreWriter

REGRID_TASK_SPECTRA = 4 * SPECTRUM_CHUNK  # spectra per task: ~23 MB of native pixels read, 2x12 MB written (4000 px)
COMMIT_SPECTRA = 256 * SPECTRUM_CHUNK  # 65536 spectra per commit, ~3 GB of new chunks


@dataclasses.dataclass
class RegridReport:
    """What one regrid did: spectra added to ``grid`` now holding ``total`` of the base grid's ``of`` spectra."""

    store: str
    grid: str
    base: str
    added: int
    total: int
    of: int
    commits: int
    seconds: float

    def summary(self) -> str:
        """One line for the command's output."""
        if not self.added:
            return f"grid {self.grid}: up to date ({self.total} spectra of {self.base}) in {self.store}"
        return (f"grid {self.grid}: {self.added} spectra regridded from {self.base} ({self.total} of {self.of}) in "
                f"{self.commits} commit(s), {self.seconds:.1f} s")


def regrid_positions(ref: StoreRef, spec: GridSpec, first: int, stop: int) -> GridBlock:
    """The base grid's spectra [first, stop) interpolated from their native pixels onto ``spec`` (a Dask task)."""
    store = ref.open()
    positions = np.arange(first, stop, dtype=np.int64)
    native, offsets = store.native(spec.base, positions)
    target = spec.wavelength()
    rows = []
    for i in range(len(positions)):
        values = slice(int(offsets[i]), int(offsets[i + 1]))
        rows.append(interpolate_onto(native["wavelength"][values], native["flux"][values], native["error"][values],
                                     native["mask"][values].astype(np.int64), target, spec.no_coverage))
    flux, error, mask = (np.stack(arrays) if rows else np.zeros((0, spec.pixels)) for arrays in zip(*rows))
    return GridBlock(spec.name, flux.astype(np.float32), error.astype(np.float32), mask.astype(spec.mask_dtype), {})


def regrid(store: SpectrumStore, spec: GridSpec, client: Client | None = None, progress: bool = True) -> RegridReport:
    """Fill the derived grid ``spec`` up to its base grid's length (see the module docstring). Raises
    :class:`StoreError` when the store already holds a grid of that name with other wavelengths, and
    :class:`StoreWriteError` when the store cannot be written (what earlier commits added stays)."""
    started = time.perf_counter()
    if spec.base is None:
        raise StoreError(f"grid {spec.name!r} is an ingest grid; only derived grids are regridded")
    recorded = store.derived_grids().get(spec.name)
    if recorded is not None and recorded != spec:
        raise StoreError(f"the store {store.path} already holds a grid {spec.name!r} with other wavelengths "
                         f"({recorded}); give the model's grid another name")
    pinned = store.at(store.snapshot_id)
    first, stop = pinned.length(spec.name), pinned.length(spec.base)
    report = RegridReport(str(store.path), spec.name, spec.base, 0, first, stop, 0, 0.0)
    if first < stop:
        ranges = [(start, min(start + REGRID_TASK_SPECTRA, stop)) for start in range(first, stop, REGRID_TASK_SPECTRA)]
        try:
            _write(pinned, spec, ranges, client, progress, report)
        except (OSError, icechunk.IcechunkError) as error:
            raise StoreWriteError(f"cannot write to spectrum store {store.path}: {error_line(error)}; "
                                  f"{report.total} spectra of {spec.name} are committed, a rerun goes on") from error
    report.seconds = time.perf_counter() - started
    return report


def _write(pinned: SpectrumStore, spec: GridSpec, ranges: list[tuple[int, int]], client: Client | None,
           progress: bool, report: RegridReport) -> None:
    ref = pinned.ref()

    def task(bounds: tuple[int, int]) -> GridBlock:
        return regrid_positions(ref, spec, *bounds)

    def failed(bounds: tuple[int, int], error: BaseException) -> GridBlock:
        raise StoreError(f"regridding spectra {bounds[0]}..{bounds[1] - 1} of {spec.base} failed: {error}") from error

    writer, pending = pinned.writer(), 0
    bar = tqdm(total=report.of - report.total, unit="spectrum", desc=f"regrid {spec.name}", disable=not progress)
    for block in map_in_order(task, ranges, client, default_batch_size(client), on_failure=failed):
        writer.append_spectra(block, spec)
        pending += len(block)
        bar.update(len(block))
        if pending >= COMMIT_SPECTRA:
            _commit(writer, spec, report, pending)
            writer, pending = pinned.writer(), 0
    if pending:
        _commit(writer, spec, report, pending)
    bar.close()


def _commit(writer: StoreWriter, spec: GridSpec, report: RegridReport, added: int) -> None:
    writer.commit(f"regrid {spec.name}: +{added} spectra from {spec.base}",
                  {"catalogbuilder_version": __version__, "operation": "regrid", "grid": spec.name, "added": added},
                  rebase=True)
    report.added += added
    report.total += added
    report.commits += 1
