"""Distributed inference: one Dask task per range of store spectra, the model loaded once per worker by a plugin.

Graph choice: ``client.map`` over spectrum index ranges aligned with the store's Zarr chunks along ``spectrum``
(rather than ``xarray``/``dask.array`` ``map_blocks``). Each task receives only small values — the store path, the
snapshot id, its index range, the positions still to do, the model directory and, for spectrum + photometry models,
the photometry table's path — opens the store (and reads its own rows of the table) itself, predicts,
writes its own Parquet part and returns a few counts. So no array or model travels through the scheduler, already-done
spectra are skipped inside a chunk, every task carries ``resources={"GPU": 1}`` explicitly when GPU workers are used
(``dask.annotate`` can be dropped by graph optimisation, dask#7036), retries are per task, and a task that fails
for good is turned into ``no_result`` rows for exactly its spectra.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import itertools
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
from distributed import Client, WorkerPlugin, as_completed, get_worker

from catalogbuilder import __version__
from catalogbuilder.cluster import GPU_RESOURCE
from catalogbuilder.constants import DEFAULT_DRAWS, FLUX_FLOOR
from catalogbuilder.inference import photometry as phot
from catalogbuilder.inference.results import (
    OUTSIDE_DOMAIN,
    STATUS_NO_RESULT,
    STATUS_OK,
    ResultsStore,
    utc_now_iso,
    value_columns,
)

log = logging.getLogger(__name__)

TASKS_PER_SLOT = 2  # default tasks per worker thread (or GPU) when the pending spectra are few
MIN_SPECTRA_PER_TASK = 8  # below this a task's overhead (store read, results part) outweighs its inference
DEFAULT_BATCH_SIZE = 256  # spectra per model.predict call (= a store chunk); the model splits it into forward passes
# Rows (spectrum x draw) per forward pass on CPU workers: CPU convolutions gain nothing from big batches (measured on
# apogee_small, 1 thread: 83 rows/s at 1 row, 78 at 21, 52 at 100, 34 at 500: the activations leave the caches);
# on GPUs the model's own default (512 rows) applies.
CPU_MAX_BATCH = 32
DEFAULT_RETRIES = 2  # extra attempts of a task whose worker died or that raised
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
REASON_DEGENERATE = "degenerate input: constant model input (e.g. an all-zero spectrum); predicted anyway"


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when this process sees a GPU, else ``cpu``; ``cpu``/``cuda`` are returned as given."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelPlugin(WorkerPlugin):
    """Loads one model (directory + weights checksum) once per worker and keeps it for every task.

    The plugin name contains the directory, checksum and device, so several models can be held side by side;
    ``idempotent`` makes registering the same model again a no-op, so a long-lived cluster keeps it cached.
    """

    idempotent = True

    def __init__(self, model_dir: str, weights_sha256: str, device: str = "auto", max_batch: int | None = None) -> None:
        self.model_dir = model_dir
        self.weights_sha256 = weights_sha256
        self.device = device
        self.max_batch = max_batch
        self.name = plugin_name(model_dir, weights_sha256, device, max_batch)
        self.model: Any = None

    def setup(self, worker: Any) -> None:
        """Load the model onto this worker's device; torch uses as many threads as the worker has."""
        import torch

        from catalogbuilder.models.registry import load_model

        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        device = resolve_device(self.device)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device 'cuda' requested but worker {worker.address} sees no CUDA device")
        if device == "cpu":
            reuse_freed_memory()
        max_batch = self.max_batch or (CPU_MAX_BATCH if device == "cpu" else None)
        model = load_model(self.model_dir, device=device, **({"max_batch": max_batch} if max_batch else {}))
        if model.weights_sha256 != self.weights_sha256:
            raise RuntimeError(
                f"weights in {self.model_dir} changed: worker {worker.address} sees sha256 "
                f"{model.weights_sha256[:16]}…, the run was planned with {self.weights_sha256[:16]}…"
            )
        self.model = model

    def teardown(self, worker: Any) -> None:
        """Drop the model (and its GPU memory)."""
        self.model = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory of this worker process for reuse; returns whether it could be set.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also switches off glibc's adaptive mmap
    threshold: every activation buffer of a CPU forward pass is then a fresh ``mmap`` whose pages fault in again.
    Measured in a worker (apogee_small, 10 spectra x 20 draws): 287,000 minor page faults and 1.9 s of CPU without
    this, 3,400 and 1.2 s with it. Buffers below 32 MiB come from the heap and up to 256 MiB of free heap is kept.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))


def plugin_name(model_dir: str, weights_sha256: str, device: str, max_batch: int | None = None) -> str:
    """Worker-plugin name of a model: the cache key (directory, weights checksum, device, forward batch rows)."""
    return f"catalogbuilder-model:{weights_sha256[:16]}:{device}:{max_batch or 'default'}:{model_dir}"


@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """One inference task: which spectra of which store snapshot, and how to predict them.

    ``positions`` are the indices (within the grid's ``spectrum`` dimension) still to do, all in [start, stop).
    ``photometry_keys``: what a spectrum + photometry model reads (empty for spectrum-only models), taken from the
    Parquet table at ``photometry_path`` (None: the store's header 2MASS only).
    """

    store_path: str
    snapshot_id: str | None
    grid: str
    start: int
    stop: int
    positions: tuple[int, ...]
    model_dir: str
    model_name: str
    weights_sha256: str
    outputs: tuple[str, ...]
    plugin: str
    draws: int
    seed: int
    batch_size: int
    photometry_keys: tuple[str, ...] = ()
    photometry_path: str | None = None


@dataclasses.dataclass(frozen=True)
class ChunkSummary:
    """What a task did: counts, the worker that ran it, the part it wrote and the seconds it took."""

    start: int
    stop: int
    n_spectra: int
    n_ok: int
    n_no_result: int
    n_degenerate: int
    worker: str
    part: str | None
    seconds: float
    n_missing_photometry: int = 0


@dataclasses.dataclass
class InferenceReport:
    """Outcome of :func:`run_inference`."""

    model_name: str
    weights_sha256: str
    grid: str
    snapshot_id: str | None
    n_spectra: int  # spectra of the grid in the store snapshot
    n_skipped: int  # already done (ok) for this model and weights
    photometry: str | None = None  # photometry table of a spectrum + photometry model, or how it was replaced
    n_photometry_changed: int = 0  # done before, recomputed because their photometry changed
    n_missing_photometry: int = 0  # rows of this run whose model imputed photometry
    n_ok: int = 0
    n_no_result: int = 0
    n_degenerate: int = 0
    chunks: list[ChunkSummary] = dataclasses.field(default_factory=list)
    failed_chunks: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)  # (start, stop, reason)
    seconds: float = 0.0

    @property
    def n_computed(self) -> int:
        """Rows written by this run (ok + no_result)."""
        return self.n_ok + self.n_no_result

    @property
    def spectra_per_second(self) -> float:
        """Throughput of this run over its wall-clock time (spectra/s)."""
        return self.n_computed / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        """One-paragraph human-readable summary."""
        text = (
            f"{self.model_name} (weights {self.weights_sha256[:16]}) on {self.grid}: {self.n_spectra} spectra, "
            f"{self.n_skipped} already done, {self.n_ok} ok ({self.n_degenerate} degenerate input), "
            f"{self.n_no_result} no_result, {len(self.failed_chunks)} failed task(s); "
            f"{self.seconds:.1f} s, {self.spectra_per_second:.1f} spectra/s"
        )
        if self.photometry is not None:
            text += (f"; photometry: {self.photometry} ({self.n_photometry_changed} recomputed for changed "
                     f"photometry, {self.n_missing_photometry} missing photometry)")
        return text


def as_str_array(values: np.ndarray) -> np.ndarray:
    """Zarr string coordinates (numpy StringDType) as a plain fixed-width ``str`` array."""
    return np.asarray(values).astype(object).astype(str)


def degenerate_rows(flux: np.ndarray) -> np.ndarray:
    """True for spectra whose model input is constant: after the 1e-6 flux floor every pixel is equal
    (all zero, all negative or all NaN flux). The model still predicts them; the row says why it is suspect."""
    floored = np.fmax(np.nan_to_num(flux, nan=FLUX_FLOOR, posinf=FLUX_FLOOR, neginf=FLUX_FLOOR), FLUX_FLOOR)
    return np.ptp(floored, axis=1) == 0


def forward_group(model: Any, draws: int) -> int:
    """Spectra per forward pass of ``model`` (its ``max_batch`` rows hold this many spectra × draws); 1 if unknown."""
    max_batch = getattr(model, "max_batch", None)
    return max(1, int(max_batch) // max(draws, 1)) if max_batch else 1


def _predict_isolating_failures(
    model: Any, flux: np.ndarray, error: np.ndarray, seeds: np.ndarray, draws: int, batch_size: int,
    photometry: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``model.predict`` in batches; a batch that raises is redone one spectrum at a time so that only the
    spectra that really fail lose their result. Returns the value columns (plus ``missing_photometry`` when
    ``photometry`` is given: per-spectrum arrays keyed by the model's photometry keys) and a per-spectrum error text.

    Every call is padded (with copies of its last spectrum, whose results are dropped) to whole forward passes, so
    each forward pass has the same shape whatever the chunking: float32 results of a row can depend on the batch
    shape (conformance README: up to 4e-5), and this keeps results bit-identical across chunkings and retries.
    """
    columns = value_columns(model.outputs) + ([phot.MISSING_PHOTOMETRY] if photometry is not None else [])
    values = {name: np.full(len(flux), np.nan) for name in columns}
    errors = [""] * len(flux)
    group = forward_group(model, draws)

    def predict_into(rows: np.ndarray) -> None:
        padded = np.concatenate([rows, np.repeat(rows[-1:], -len(rows) % group)])
        extra = {} if photometry is None else {"photometry": {key: v[padded] for key, v in photometry.items()}}
        predicted = model.predict(flux[padded], error[padded], draws=draws, seeds=seeds[padded], **extra)
        for name in columns:
            values[name][rows] = np.asarray(predicted[name], dtype=np.float64)[: len(rows)]

    for begin in range(0, len(flux), batch_size):
        batch = np.arange(begin, min(begin + batch_size, len(flux)))
        try:
            predict_into(batch)
        except Exception:  # noqa: BLE001 - isolate the failing spectra below, keep the rest of the batch
            for index in batch:
                try:
                    predict_into(np.array([index]))
                except Exception as exc:  # noqa: BLE001 - recorded as the spectrum's no_result reason
                    errors[index] = f"prediction failed: {type(exc).__name__}: {exc}"
    return values, errors


def predict_chunk(task: ChunkTask, model: Any) -> pd.DataFrame:
    """Predict the pending spectra of one task with ``model``; one results row per spectrum (not yet written)."""
    from catalogbuilder.models.montecarlo import spectrum_seed

    dataset = open_grid(task.store_path, task.snapshot_id, task.grid).isel(spectrum=slice(task.start, task.stop))
    rows = np.asarray(task.positions, dtype=np.int64) - task.start
    with dask.config.set(scheduler="synchronous"):  # read the whole aligned range here, in this task's thread
        spectrum_ids = as_str_array(dataset["spectrum_id"].values[rows])
        flux = np.asarray(dataset["flux"].values[rows], dtype=np.float32)
        error = np.asarray(dataset["error"].values[rows], dtype=np.float32)
    seeds = np.array([spectrum_seed(spectrum_id, task.seed) for spectrum_id in spectrum_ids], dtype=np.int64)
    inputs = None
    if task.photometry_keys:  # this task's rows of the table only, the header 2MASS where it has no value
        header = phot.header_photometry(dataset, rows)
        inputs = phot.gather_inputs(task.photometry_path, spectrum_ids, header, task.photometry_keys)
    values, errors = _predict_isolating_failures(
        model, flux, error, seeds, task.draws, task.batch_size,
        None if inputs is None else {key: inputs[key].to_numpy() for key in task.photometry_keys},
    )

    degenerate = degenerate_rows(flux)
    non_finite = [
        [name for name in task.outputs if not np.isfinite(values[name][row])] for row in range(len(spectrum_ids))
    ]
    status, reason = [], []
    for row in range(len(spectrum_ids)):
        if errors[row]:
            status.append(STATUS_NO_RESULT)
            reason.append(errors[row])
        elif non_finite[row]:
            status.append(STATUS_NO_RESULT)
            reason.append(f"non-finite prediction: {', '.join(non_finite[row])}")
        else:
            status.append(STATUS_OK)
            reason.append(REASON_DEGENERATE if degenerate[row] else "")
    frame = provenance_frame(spectrum_ids, task, status, reason)
    for name, column in values.items():
        frame[name] = column
    if model.info.domain:  # read by the flags stage: RESULT_UNRELIABLE outside the training domain
        frame[OUTSIDE_DOMAIN] = model.outside_domain(values).astype(np.float64)
    if inputs is not None:
        for key, column in zip(task.photometry_keys, phot.input_columns(task.photometry_keys)):
            frame[column] = inputs[key].to_numpy()
    return frame


def provenance_frame(
    spectrum_ids: Sequence[str], task: ChunkTask, status: Sequence[str] | str, reason: Sequence[str] | str
) -> pd.DataFrame:
    """The provenance columns of results rows for ``spectrum_ids`` computed under ``task``."""
    return pd.DataFrame(
        {
            "spectrum_id": list(spectrum_ids),
            "model_name": task.model_name,
            "weights_sha256": task.weights_sha256,
            "software_version": __version__,
            "created": utc_now_iso(),
            "n_draws": task.draws,
            "seed": task.seed,
            "status": status,
            "reason": reason,
        }
    )


def infer_chunk(task: ChunkTask) -> ChunkSummary:
    """Dask task: predict one range of spectra with the worker's cached model and write their results part."""
    began = time.perf_counter()
    worker = get_worker()
    plugin = worker.plugins.get(task.plugin)
    if plugin is None or plugin.model is None:
        raise RuntimeError(f"model plugin {task.plugin!r} is not loaded on worker {worker.address}")
    frame = predict_chunk(task, plugin.model)
    part = ResultsStore.for_store(task.store_path).write_part(frame)
    statuses = frame["status"]
    return ChunkSummary(
        start=task.start,
        stop=task.stop,
        n_spectra=len(frame),
        n_ok=int((statuses == STATUS_OK).sum()),
        n_no_result=int((statuses == STATUS_NO_RESULT).sum()),
        n_degenerate=int((frame["reason"] == REASON_DEGENERATE).sum()),
        worker=worker.address,
        part=str(part) if part else None,
        seconds=time.perf_counter() - began,
        n_missing_photometry=int((frame.get(phot.MISSING_PHOTOMETRY, pd.Series(dtype=float)) == 1).sum()),
    )


def open_grid(store_path: str, snapshot_id: str | None, grid: str) -> Any:
    """The lazy dataset of one grid of the spectrum store at ``store_path``, as of ``snapshot_id``."""
    from catalogbuilder.store.spectra import SpectrumStore

    if not Path(store_path).is_dir():  # SpectrumStore.open would create an empty store here
        raise FileNotFoundError(f"this worker does not see the store {store_path} (not on a shared filesystem?)")
    dataset = SpectrumStore.open(store_path).dataset(grid, snapshot=snapshot_id)
    if dataset is None:
        raise RuntimeError(f"store {store_path} has no {grid!r} spectra at snapshot {snapshot_id}")
    return dataset


def chunk_ranges(n_spectra: int, chunk_sizes: Sequence[int] | None, spectra_per_task: int | None) -> list[tuple[int, int]]:
    """Index ranges of ``spectra_per_task`` spectra each when given, else the store's own chunks (tasks are then cut
    from these ranges, never across them)."""
    if spectra_per_task is not None:
        if spectra_per_task < 1:
            raise ValueError("spectra_per_task must be at least 1")
        edges = list(range(0, n_spectra, spectra_per_task)) + [n_spectra]
    else:
        edges = list(np.cumsum([0, *(chunk_sizes or [n_spectra])]))
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def compute_slots(client: Client) -> int:
    """How many inference tasks the cluster runs at once: its GPU workers if it has any, else its worker threads."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpus = gpu_workers(client)
    return max(1, len(gpus) if gpus else sum(int(info.get("nthreads", 1)) for info in workers.values()))


def balanced_task_size(n_pending: int, slots: int) -> int:
    """Spectra per task when none is asked for: enough tasks to keep every slot busy (``TASKS_PER_SLOT`` each,
    for balance and retries), never below ``MIN_SPECTRA_PER_TASK`` (task overhead)."""
    return max(MIN_SPECTRA_PER_TASK, -(-n_pending // (TASKS_PER_SLOT * slots)))


def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers advertising a ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(address for address, info in workers.items() if info.get("resources", {}).get(GPU_RESOURCE, 0) > 0)


def run_inference(
    client: Client,
    store_path: str | Path,
    model: str | Path,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    spectra_per_task: int | None = None,
    device: str = "auto",
    max_batch: int | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    photometry: str | Path | None = None,
) -> InferenceReport:
    """Predict every spectrum of the model's grid in the store at ``store_path`` that has no ``ok`` result for
    this model and weights yet; results go to ``<store>/results``.

    ``batch_size``: spectra per ``model.predict`` call (a call that raises is redone spectrum by spectrum);
    ``max_batch``: rows (spectrum × draw) per forward pass, default :data:`CPU_MAX_BATCH` on CPU, the model's on GPU.
    Tasks run where ``client`` sends them: with ``GPU`` workers present each task requires ``{"GPU": 1}``.
    A task that still fails after ``retries`` extra attempts yields ``no_result`` rows for its spectra,
    so every pending spectrum gets exactly one row; the run always goes on.

    Spectrum + photometry models (APOGEE Net II): ``photometry`` is a Parquet table with ``spectrum_id`` and the
    model's photometry keys (the ``catalogbuilder crossmatch`` output); each task reads the rows of its own spectra.
    Values the table lacks come from the store's header 2MASS J/H/K, the rest is imputed by the model and the row gets
    ``missing_photometry = 1``. With a table, spectra done before from other photometry (``input_*`` columns of their
    newest ok row) are recomputed; without one, only spectra without an ok row are computed (header 2MASS, no Gaia).
    Spectrum-only models ignore ``photometry``.
    """
    from catalogbuilder.models.registry import load_model, resolve_model_dir
    from catalogbuilder.store.spectra import SpectrumStore

    if draws < 0 or batch_size < 1 or (max_batch is not None and max_batch < 1):
        raise ValueError("draws must be >= 0, batch_size and max_batch >= 1")
    began = time.perf_counter()
    store_path = str(Path(store_path).resolve())
    model_dir = str(resolve_model_dir(model).resolve())
    spectral_model = load_model(model_dir, device="cpu")
    if spectral_model.grid is None:
        raise ValueError(f"model {spectral_model.name!r} reads no spectra; run it with `catalogbuilder photometric`")
    if not Path(store_path).is_dir():
        raise FileNotFoundError(f"no spectrum store at {store_path}")
    photometry_keys = tuple(getattr(spectral_model, "photometry_keys", ())) if spectral_model.needs_photometry else ()
    if spectral_model.needs_photometry and not photometry_keys:
        raise ValueError(f"model {spectral_model.name!r} needs photometry but names no photometry_keys to read")
    if photometry is not None and not photometry_keys:
        log.warning("model %s reads no photometry: ignoring %s", spectral_model.name, photometry)
    photometry_path = str(phot.check_photometry_table(photometry, photometry_keys)) if (
        photometry is not None and photometry_keys) else None
    store = SpectrumStore.open(store_path)
    snapshot_id = store.snapshot_id
    dataset = store.dataset(spectral_model.grid, snapshot=snapshot_id)
    results = ResultsStore.for_store(store_path)
    report = InferenceReport(
        spectral_model.name, spectral_model.weights_sha256, spectral_model.grid, snapshot_id, n_spectra=0, n_skipped=0,
        photometry=(photometry_path or phot.HEADER_FALLBACK) if photometry_keys else None,
    )
    if dataset is None:
        report.seconds = time.perf_counter() - began
        return report
    spectrum_ids = as_str_array(dataset["spectrum_id"].values)
    report.n_spectra = len(spectrum_ids)
    done = results.completed_ids(spectral_model.name, spectral_model.weights_sha256)
    if photometry_path is not None and done:  # results of other photometry are stale
        inputs = phot.gather_inputs(photometry_path, spectrum_ids, phot.header_photometry(dataset), photometry_keys)
        changed = phot.changed_inputs(results.part_dir(spectral_model.name, spectral_model.weights_sha256), inputs)
        report.n_photometry_changed = len(changed)
        done -= changed
    elif photometry_keys and photometry_path is None:
        log.warning("%s: no photometry table; using the store's header 2MASS J/H/K, Gaia bands imputed (every row "
                    "missing_photometry); run `catalogbuilder crossmatch` and pass --photometry", spectral_model.name)
    pending = ~np.isin(spectrum_ids, list(done)) if done else np.ones(len(spectrum_ids), dtype=bool)
    report.n_skipped = int((~pending).sum())

    plugin = ModelPlugin(model_dir, spectral_model.weights_sha256, device, max_batch)
    template = ChunkTask(
        store_path=store_path,
        snapshot_id=snapshot_id,
        grid=spectral_model.grid,
        start=0,
        stop=0,
        positions=(),
        model_dir=model_dir,
        model_name=spectral_model.name,
        weights_sha256=spectral_model.weights_sha256,
        outputs=tuple(spectral_model.outputs),
        plugin=plugin.name,
        draws=draws,
        seed=seed,
        batch_size=batch_size,
        photometry_keys=photometry_keys,
        photometry_path=photometry_path,
    )
    tasks = []
    store_chunks = dataset["flux"].variable.chunksizes.get("spectrum")  # the data's own chunks, not the coordinates
    per_task = spectra_per_task or balanced_task_size(int(pending.sum()), compute_slots(client))
    for start, stop in chunk_ranges(len(spectrum_ids), store_chunks, spectra_per_task):
        positions = np.flatnonzero(pending[start:stop]) + start
        for first in range(0, len(positions), per_task):  # a task never crosses a store chunk
            piece = tuple(int(p) for p in positions[first:first + per_task])
            tasks.append(dataclasses.replace(template, start=piece[0], stop=piece[-1] + 1, positions=piece))
    if not tasks:
        report.seconds = time.perf_counter() - began
        return report

    try:
        client.register_plugin(plugin)  # loads the model on every worker now; a failure stops the run here
    except Exception:
        client.unregister_worker_plugin(plugin.name)  # forget it, so that a later run loads it afresh
        raise
    resources = {GPU_RESOURCE: 1} if gpu_workers(client) else None
    log.info("submitting %d tasks (%s)", len(tasks), f"resources {resources}" if resources else "any worker")
    futures = client.map(
        infer_chunk,
        tasks,
        key=[f"infer-{spectral_model.name}-{spectral_model.weights_sha256[:8]}-{t.start}-{t.stop}" for t in tasks],
        resources=resources,
        retries=retries,
        pure=False,
    )
    task_of = {future.key: task for future, task in zip(futures, tasks)}
    bar = _progress_bar(sum(len(t.positions) for t in tasks), progress)
    for future in as_completed(futures):
        task = task_of[future.key]
        if future.status == "finished":
            summary = future.result()
        else:
            task_ids = spectrum_ids[list(task.positions)]
            summary = _record_failed_task(results, task, task_ids, future.exception(), report)
        report.chunks.append(summary)
        report.n_ok += summary.n_ok
        report.n_no_result += summary.n_no_result
        report.n_degenerate += summary.n_degenerate
        report.n_missing_photometry += summary.n_missing_photometry
        bar.update(summary.n_spectra)
        future.release()
    bar.close()
    report.chunks.sort(key=lambda chunk: chunk.start)
    report.seconds = time.perf_counter() - began
    return report


def _record_failed_task(
    results: ResultsStore, task: ChunkTask, spectrum_ids: np.ndarray, exc: BaseException, report: InferenceReport
) -> ChunkSummary:
    """Write ``no_result`` rows for the spectra of a task that failed for good, and count it as failed."""
    reason = f"task failed after retries: {type(exc).__name__}: {exc}"
    log.warning("task %d-%d failed: %s", task.start, task.stop, reason)
    report.failed_chunks.append((task.start, task.stop, reason))
    frame = provenance_frame(spectrum_ids, task, STATUS_NO_RESULT, reason)
    for name in value_columns(task.outputs) + phot.result_columns(task.photometry_keys):  # same columns in every part
        frame[name] = np.nan
    part = results.write_part(frame)
    return ChunkSummary(task.start, task.stop, len(frame), 0, len(frame), 0, "", str(part) if part else None, 0.0)


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over spectra (disabled when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="spectra", desc="infer", disable=not enabled)
