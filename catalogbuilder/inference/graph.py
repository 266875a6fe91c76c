"""Distributed inference: one Dask task per range of store spectra, the model loaded once per worker by a plugin.

Graph choice: ``client.map`` over spectrum index ranges aligned with the store's Zarr chunks along ``spectrum``
(rather than ``xarray``/``dask.array`` ``map_blocks``). Each task receives only small values — the store reference
(path + snapshot id), its positions still to do, the model directory and, for spectrum + photometry models,
the photometry table's path — opens the store (and reads its own rows of the table) itself, predicts,
writes its own Parquet part and returns a few counts; the client compacts the parts at the end. So no array or model travels through the scheduler, already-done
spectra are skipped inside a chunk, every task carries ``resources={"GPU": 1}`` explicitly when GPU workers are used
(``dask.annotate`` can be dropped by graph optimisation, dask#7036), retries are per task, and a task that fails
for good is turned into ``no_result`` rows for exactly its spectra.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import logging
import platform
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, WorkerPlugin, as_completed, get_worker

from catalogbuilder import __version__
from catalogbuilder.cluster import GPU_RESOURCE
from catalogbuilder.config import ConfigError
from catalogbuilder.files import error_line
from catalogbuilder.constants import (
    CONVOLUTION_MODES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DRAWS,
    DEFAULT_RETRIES,
    NATIVE_PIXEL_GRIDS,
    PREDICTED_KINDS,
    ROWS_TUNING_MIN_SPECTRA,
    GridSpec,
)
from catalogbuilder.inference import photometry as phot
from catalogbuilder.inference.device import (
    GpuPlacementError,
    choose_forward_rows,
    default_forward_rows,
    forward_rows_candidates,
    precision_options,
    resolve_device,
    shared_gpus,
    worker_gpu_identity,
)
from catalogbuilder.models.montecarlo import NativeSpectra
from catalogbuilder.store import SpectrumStore, StoreRef
from catalogbuilder.store.layout import SPECTRUM_CHUNK
from catalogbuilder.store.ranged import POSITION
from catalogbuilder.store.results import (
    OUTSIDE_DOMAIN,
    STATUS_NO_RESULT,
    STATUS_OK,
    utc_now_iso,
    value_columns,
)

log = logging.getLogger(__name__)

TASKS_PER_SLOT = 2  # default tasks per worker thread (or GPU) when the pending spectra are few
MIN_SPECTRA_PER_TASK = 8  # below this a task's overhead (store read, results part) outweighs its inference
# A task holds this share of a GPU worker's ``GPU`` resource: GPU workers run two tasks at once (given two threads,
# as the local GPU cluster starts them), so one task reads its spectra and writes its results while the other computes.
GPU_TASK_SHARE = 0.5
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
REASON_DEGENERATE = "degenerate input: constant model input (e.g. an all-zero spectrum); predicted anyway"


class ResultsWriteError(RuntimeError):
    """The client cannot write results into the store (e.g. a full disk); the message is one line. Results written
    before stay valid and the next run predicts the spectra still without a row."""


@contextlib.contextmanager
def _writing_results(store: SpectrumStore) -> Iterator[None]:
    """Turn an OS error of a results write on the client into :class:`ResultsWriteError`."""
    try:
        yield
    except OSError as error:
        raise ResultsWriteError(f"cannot write results in {store.results.root}: {error_line(error)}; results "
                                "written before are kept and the next run predicts the spectra still without one"
                                ) from error


class ModelPlugin(WorkerPlugin):
    """Loads one model (directory + weights checksum) once per worker and keeps it for every task.

    The plugin name contains the directory, checksum, device, precision, forward rows and convolution mode, so
    several models can be held side by side; ``idempotent`` makes registering the same model again a no-op, so a
    long-lived cluster keeps it cached. ``gpu_workers_only``: workers without a ``GPU`` resource load nothing (no
    task is sent to them).
    ``max_batch`` None: rows per forward pass from :mod:`catalogbuilder.inference.device` for ``draws``, measured on
    the worker when ``measure_rows``.
    """

    idempotent = True

    def __init__(self, model_dir: str, weights_sha256: str, device: str = "auto", max_batch: int | None = None,
                 precision: str = "float32", draws: int = DEFAULT_DRAWS, measure_rows: bool = False,
                 gpu_workers_only: bool = False, convolution: str = "auto") -> None:
        self.model_dir = model_dir
        self.weights_sha256 = weights_sha256
        self.device = device
        self.max_batch = max_batch
        self.precision = precision
        self.draws = draws
        self.measure_rows = measure_rows
        self.gpu_workers_only = gpu_workers_only
        self.convolution = convolution
        self.name = plugin_name(model_dir, weights_sha256, device, max_batch, precision, draws, convolution)
        self.model: Any = None

    async def setup(self, worker: Any) -> None:
        """Load the model in a thread, so the worker's event loop keeps answering meanwhile and the workers of an
        in-process cluster (``infer``'s local CPU cluster), which share one loop, load side by side."""
        await asyncio.get_running_loop().run_in_executor(None, self.load, worker)

    def load(self, worker: Any) -> None:
        """Load the model onto this worker's device; torch uses as many threads as the worker has (one on a GPU
        worker, whose threads run tasks side by side). CPU workers of one process (``infer``'s local cluster runs
        them as threads) share one copy: the first loads it while the others wait, then all predict with it (a
        model's forward pass keeps no per-call state on the model; its rows per forward pass are chosen before it is
        shared)."""
        import torch

        holds_gpu = worker.state.total_resources.get(GPU_RESOURCE, 0) > 0
        if self.gpu_workers_only and not holds_gpu:
            return
        device = resolve_device(self.device, holds_gpu)
        torch.set_num_threads(1 if device == "cuda" else max(1, int(worker.state.nthreads)))
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device 'cuda' requested but worker {worker.address} sees no CUDA device")
        if device != "cpu":
            self.model = self.load_model(worker, device)
            return
        reuse_freed_memory()
        key = (self.name, self.weights_sha256, torch.get_num_threads())
        with _PROCESS_MODELS_LOCK:
            lock = _PROCESS_MODEL_LOADING.setdefault(key, threading.Lock())
        with lock:
            model = _PROCESS_MODELS.get(key)
            if model is None:
                model = _PROCESS_MODELS[key] = self.load_model(worker, device)
        self.model = model

    def load_model(self, worker: Any, device: str) -> Any:
        """The model on ``device`` with its rows per forward pass set; ``RuntimeError`` when its weights are not
        the ones the run was planned with."""
        from catalogbuilder.models.registry import load_model

        options = precision_options(self.precision)
        if self.convolution != "auto":  # a BossNet option; other families have no choice to force
            options["convolution"] = self.convolution
        model = load_model(self.model_dir, device=device, **options)
        if model.weights_sha256 != self.weights_sha256:
            raise RuntimeError(
                f"weights in {self.model_dir} changed: worker {worker.address} sees sha256 "
                f"{model.weights_sha256[:16]}…, the run was planned with {self.weights_sha256[:16]}…"
            )
        if self.max_batch is not None:
            model.max_batch = self.max_batch
        elif self.measure_rows:
            choose_forward_rows(model, self.draws, forward_rows_candidates(device, self.draws))
        else:
            model.max_batch = default_forward_rows(device, self.draws)
        return model

    def teardown(self, worker: Any) -> None:
        """Drop the model (and its GPU memory)."""
        self.model = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# CPU models of this process by (plugin name, weights, torch threads), held while a plugin holds them.
_PROCESS_MODELS: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
_PROCESS_MODEL_LOADING: dict[tuple, threading.Lock] = {}
_PROCESS_MODELS_LOCK = threading.Lock()


def plugin_forward_rows(plugin: str, dask_worker: Any = None) -> int | None:
    """Rows per forward pass of the model held by a worker's plugin ``plugin`` (None: no model there); for
    ``client.run``, which passes the worker as ``dask_worker``."""
    return getattr(getattr(dask_worker.plugins.get(plugin), "model", None), "max_batch", None)


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


def plugin_name(model_dir: str, weights_sha256: str, device: str, max_batch: int | None = None,
                precision: str = "float32", draws: int = DEFAULT_DRAWS, convolution: str = "auto") -> str:
    """Worker-plugin name of a model: the cache key (directory, weights checksum, device, precision, forward batch
    rows or the draws they are chosen for, convolution mode)."""
    rows = max_batch or f"auto{draws}"
    return f"catalogbuilder-model:{weights_sha256[:16]}:{device}:{precision}:{rows}:{convolution}:{model_dir}"


@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """One inference task: which spectra of which store snapshot, and how to predict them.

    ``positions`` are the positions (within the grid) still to do, sorted, all inside one store chunk.
    ``photometry_keys``: what a spectrum + photometry model reads (empty for spectrum-only models), taken from the
    Parquet table at ``photometry_path`` (None: the store's header 2MASS only).
    """

    store: StoreRef
    grid: str
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
    precision: str = "float32"


@dataclasses.dataclass(frozen=True)
class ChunkSummary:
    """What a task did: counts, the worker that ran it, the part it wrote and the seconds it took."""

    start: int  # first position
    stop: int  # last position + 1
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
    forward_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # worker → rows per forward pass
    n_awaiting_regrid: int = 0  # spectra of the base grid not yet on the model's own grid (store regrid)
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
        if self.n_awaiting_regrid:
            text += f"; {self.n_awaiting_regrid} spectra await `catalogbuilder store regrid` onto {self.grid}"
        if self.forward_rows:
            text += f"; {'/'.join(str(rows) for rows in sorted(set(self.forward_rows.values())))} rows per forward pass"
        return text


def forward_group(model: Any, draws: int) -> int:
    """Spectra per forward pass of ``model`` (its ``max_batch`` rows hold this many spectra × (noiseless + draws));
    1 if unknown."""
    from catalogbuilder.models.montecarlo import spectra_per_forward

    max_batch = getattr(model, "max_batch", None)
    return spectra_per_forward(max_batch, draws) if max_batch else 1


def _predict_isolating_failures(
    model: Any, flux: np.ndarray, error: np.ndarray, seeds: np.ndarray, draws: int, batch_size: int,
    photometry: Mapping[str, np.ndarray] | None = None, native: NativeSpectra | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``model.predict`` in batches; a batch that raises is redone one spectrum at a time so that only the
    spectra that really fail lose their result. Returns the value columns (plus ``missing_photometry`` when
    ``photometry`` is given: per-spectrum arrays keyed by the model's photometry keys) and a per-spectrum error text.
    ``native``: the spectra's native pixels (resampled grids), where the Monte-Carlo draws are made.

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
        extra: dict[str, Any] = {} if photometry is None else {
            "photometry": {key: v[padded] for key, v in photometry.items()}}
        if native is not None:
            extra["native"] = native.take(padded)
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

    store = task.store.open()
    positions = np.asarray(task.positions, dtype=np.int64)
    names = ("spectrum_id", "flux_constant", *(phot.HEADER_KEYS if task.photometry_keys else ()))
    columns = store.columns(task.grid, names, positions=positions)
    spectrum_ids = columns["spectrum_id"].astype(str).to_numpy()
    pixels = store.pixels(task.grid, positions)  # one read of the task's aligned range
    flux, error = pixels["flux"].astype(np.float32), pixels["error"].astype(np.float32)
    seeds = np.array([spectrum_seed(spectrum_id, task.seed) for spectrum_id in spectrum_ids], dtype=np.int64)
    inputs = None
    if task.photometry_keys:  # this task's rows of the table only, the header 2MASS where it has no value
        header = phot.header_photometry(columns)
        inputs = phot.gather_inputs(task.photometry_path, spectrum_ids, header, task.photometry_keys)
    native = None
    if task.draws > 0 and task.grid not in NATIVE_PIXEL_GRIDS:  # draws on the survey's own pixels (SPEC §4)
        arrays, offsets = store.native(task.grid, positions)
        native = NativeSpectra(arrays["wavelength"], arrays["flux"], arrays["error"], offsets)
    values, errors = _predict_isolating_failures(
        model, flux, error, seeds, task.draws, task.batch_size,
        None if inputs is None else {key: inputs[key].to_numpy() for key in task.photometry_keys}, native,
    )

    degenerate = columns["flux_constant"].astype(bool).to_numpy()
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
    frame = provenance_frame(spectrum_ids, positions, task, status, reason)
    for name, column in values.items():
        frame[name] = column
    if model.info.domain:  # read by the flags stage: RESULT_UNRELIABLE outside the training domain
        frame[OUTSIDE_DOMAIN] = model.outside_domain(values).astype(np.float64)
    if inputs is not None:
        for key, column in zip(task.photometry_keys, phot.input_columns(task.photometry_keys)):
            frame[column] = inputs[key].to_numpy()
    return frame


def provenance_frame(
    spectrum_ids: Sequence[str], positions: np.ndarray, task: ChunkTask, status: Sequence[str] | str,
    reason: Sequence[str] | str,
) -> pd.DataFrame:
    """The provenance columns of results rows for ``spectrum_ids`` (at ``positions``) computed under ``task``."""
    return pd.DataFrame(
        {
            "spectrum_id": list(spectrum_ids),
            "grid": task.grid,
            POSITION: np.asarray(positions, dtype=np.int64),
            "model_name": task.model_name,
            "weights_sha256": task.weights_sha256,
            "software_version": __version__,
            "created": utc_now_iso(),
            "n_draws": task.draws,
            "seed": task.seed,
            "precision": task.precision,
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
    part = task.store.open().results.write_part(frame)
    statuses = frame["status"]
    return ChunkSummary(
        start=task.positions[0],
        stop=task.positions[-1] + 1,
        n_spectra=len(frame),
        n_ok=int((statuses == STATUS_OK).sum()),
        n_no_result=int((statuses == STATUS_NO_RESULT).sum()),
        n_degenerate=int((frame["reason"] == REASON_DEGENERATE).sum()),
        worker=worker.address,
        part=str(part) if part else None,
        seconds=time.perf_counter() - began,
        n_missing_photometry=int((frame.get(phot.MISSING_PHOTOMETRY, pd.Series(dtype=float)) == 1).sum()),
    )


def chunk_ranges(n_spectra: int, spectra_per_task: int | None) -> list[tuple[int, int]]:
    """Position ranges of ``spectra_per_task`` spectra each when given, else the store's data chunks (tasks are then
    cut from these ranges, never across them)."""
    if spectra_per_task is not None and spectra_per_task < 1:
        raise ValueError("spectra_per_task must be at least 1")
    step = spectra_per_task or SPECTRUM_CHUNK
    edges = list(range(0, n_spectra, step)) + [n_spectra]
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def compute_slots(client: Client) -> int:
    """How many inference tasks the cluster runs at once: on GPU workers (if any) their threads up to
    1 / :data:`GPU_TASK_SHARE` per GPU, else every worker thread."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpus = set(gpu_workers(client))
    if gpus:
        return max(1, sum(min(int(info.get("nthreads", 1)),
                              int(info["resources"][GPU_RESOURCE] / GPU_TASK_SHARE))
                          for address, info in workers.items() if address in gpus))
    return max(1, sum(int(info.get("nthreads", 1)) for info in workers.values()))


def check_gpu_placement(client: Client, device: str, gpus: Sequence[str]) -> None:
    """Refuse (:class:`GpuPlacementError`) a run whose model would be loaded by several worker processes onto one GPU.

    The processes computing on a GPU: with ``auto``, the workers holding a ``GPU`` resource; with ``cuda``, those, or
    every worker when none holds one. Each computes on the first GPU it sees (``worker_gpu_identity``)."""
    if device == "cpu" or (device == "auto" and not gpus):
        return
    users = list(gpus) or list(client.scheduler_info(n_workers=-1)["workers"])
    shared = shared_gpus(client.run(worker_gpu_identity, workers=users))
    if shared:
        (host, gpu), addresses = next(iter(shared.items()))
        raise GpuPlacementError(
            f"device {device!r} would put {len(addresses)} worker processes ({', '.join(addresses)}) on GPU {gpu} of "
            f"host {host}: one worker process per GPU is needed. Start GPU workers with dask-cuda (no cluster "
            "option and no --workers on a GPU machine, cluster_configs/local-gpu.yaml, or `dask cuda worker "
            "--resources GPU=1`), give --workers no more than the GPUs, or use --device cpu")


def balanced_task_size(n_pending: int, slots: int) -> int:
    """Spectra per task when none is asked for: a whole number of tasks per slot — ``TASKS_PER_SLOT`` (for balance
    and retries) when each still gets ``MIN_SPECTRA_PER_TASK`` spectra (task overhead), else one — so that the tasks
    end together (20 spectra on 2 slots: 2 tasks of 10, not 8 + 8 + 4)."""
    tasks_per_slot = max(1, min(TASKS_PER_SLOT, n_pending // (MIN_SPECTRA_PER_TASK * slots)))
    return max(1, -(-n_pending // (tasks_per_slot * slots)))


def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers advertising a ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(address for address, info in workers.items() if info.get("resources", {}).get(GPU_RESOURCE, 0) > 0)


def run_inference(
    client: Client,
    store: SpectrumStore,
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
    precision: str = "float32",
    convolution: str = "auto",
) -> InferenceReport:
    """Predict every active spectrum of the model's grid in ``store`` (at its pinned or latest snapshot) that has no
    ``ok`` result for this model and weights yet; results go to the store's results, compacted at the end.

    Only spectra the release lists are predicted: active ones (not superseded or retired, docs/store.md) of the
    predicted kinds (``constants.PREDICTED_KINDS``; apStar row 1 is not). ``batch_size``: spectra per
    ``model.predict`` call (a call that raises is redone spectrum by spectrum); ``max_batch``: rows (spectrum × draw)
    per forward pass; None: chosen per worker device, measured by the workers when at least
    :data:`ROWS_TUNING_MIN_SPECTRA` spectra per slot are pending (:mod:`~catalogbuilder.inference.device`).
    ``device``: ``auto`` computes on a GPU on workers holding a ``GPU`` resource, on the CPU elsewhere.
    ``precision``: ``float32`` (exact), ``tf32`` or ``bf16`` (GPU speed for ~1e-3 relative, see docs/inference.md).
    ``convolution`` (BossNet family): ``auto`` (each worker measures per layer which of torch's convolution and the
    FFT form is faster), ``direct`` or ``fft`` (the same on every worker: bit-identical results across workers).
    Tasks run where ``client`` sends them: with ``GPU`` workers present each task requires
    ``{"GPU": GPU_TASK_SHARE}`` (two tasks per GPU worker at once). A run that would put several worker processes on
    one GPU raises :class:`~catalogbuilder.inference.device.GpuPlacementError` before any work.
    A task that still fails after ``retries`` extra attempts yields ``no_result`` rows for its spectra, so every
    pending spectrum gets exactly one row; the run always goes on.

    Spectrum + photometry models (APOGEE Net II): ``photometry`` is a Parquet table with ``spectrum_id`` and the
    model's photometry keys (the ``catalogbuilder crossmatch`` output); each task reads the rows of its own spectra.
    Values the table lacks come from the store's header 2MASS J/H/K, the rest is imputed by the model and the row gets
    ``missing_photometry = 1``. With a table, spectra done before from other photometry (``input_*`` columns of their
    newest ok row) are recomputed; without one, only spectra without an ok row are computed (header 2MASS, no Gaia).
    Spectrum-only models ignore ``photometry``.
    """
    from catalogbuilder.config import resolve_model_dir
    from catalogbuilder.models.registry import describe_model

    if draws < 0 or batch_size < 1 or (max_batch is not None and max_batch < 1):
        raise ValueError("draws must be >= 0, batch_size and max_batch >= 1")
    precision_options(precision)  # a clear error for an unknown precision, before any work
    if convolution not in CONVOLUTION_MODES:
        raise ValueError(f"convolution must be one of {CONVOLUTION_MODES}, got {convolution!r}")
    gpus = gpu_workers(client)
    check_gpu_placement(client, device, gpus)
    began = time.perf_counter()
    store = store.at(store.snapshot_id)  # every read and every task sees this snapshot
    model_dir = str(resolve_model_dir(model).resolve())
    spectral_model = describe_model(model_dir)  # no weights loaded here: the workers load them
    if spectral_model.grid is None:
        raise ValueError(f"model {spectral_model.name!r} reads no spectra; run it with `catalogbuilder photometric`")
    photometry_keys = spectral_model.photometry_keys if spectral_model.needs_photometry else ()
    if spectral_model.needs_photometry and not photometry_keys:
        raise ValueError(f"model {spectral_model.name!r} needs photometry but names no photometry_keys to read")
    if photometry is not None and not photometry_keys:
        log.warning("model %s reads no photometry: ignoring %s", spectral_model.name, photometry)
    photometry_path = str(phot.check_photometry_table(photometry, photometry_keys)) if (
        photometry is not None and photometry_keys) else None
    name, weights = spectral_model.name, spectral_model.weights_sha256
    results = store.results
    report = InferenceReport(
        name, weights, spectral_model.grid, store.snapshot_id, n_spectra=0, n_skipped=0,
        photometry=(photometry_path or phot.HEADER_FALLBACK) if photometry_keys else None,
    )
    require_grid(store, spectral_model.grid_spec, model)
    n_spectra = store.length(spectral_model.grid)
    report.n_awaiting_regrid = store.length(store.base_grid(spectral_model.grid)) - n_spectra
    if report.n_awaiting_regrid:
        log.warning("%d spectra of the %s grid are not on %s yet: `catalogbuilder store regrid %s --model %s` puts "
                    "them there", report.n_awaiting_regrid, store.base_grid(spectral_model.grid), spectral_model.grid,
                    store.path, model)
    columns = store.columns(spectral_model.grid, ("active", "kind"))
    eligible = columns["active"].astype(bool).to_numpy() & columns["kind"].isin(PREDICTED_KINDS).to_numpy()
    report.n_spectra = int(eligible.sum())
    done = results.done_positions(name, weights, n_spectra)
    if photometry_path is not None and done.any():  # results of other photometry are stale
        done &= ~_changed_photometry(store, spectral_model.grid, results.version_dir(name, weights), done,
                                     photometry_path, photometry_keys, report)
    elif photometry_keys and photometry_path is None:
        log.warning("%s: no photometry table; using the store's header 2MASS J/H/K, Gaia bands imputed (every row "
                    "missing_photometry); run `catalogbuilder crossmatch` and pass --photometry", name)
    pending = eligible & ~done
    report.n_skipped = int((eligible & done).sum())

    slots = compute_slots(client)
    plugin = ModelPlugin(model_dir, weights, device, max_batch, precision, draws,
                         measure_rows=int(pending.sum()) >= ROWS_TUNING_MIN_SPECTRA * slots,
                         gpu_workers_only=bool(gpus), convolution=convolution)
    template = ChunkTask(
        store=store.ref(), grid=spectral_model.grid, positions=(), model_dir=model_dir, model_name=name,
        weights_sha256=weights, outputs=tuple(spectral_model.outputs), plugin=plugin.name, draws=draws, seed=seed,
        batch_size=batch_size, photometry_keys=photometry_keys, photometry_path=photometry_path, precision=precision,
    )
    tasks = []
    per_task = spectra_per_task or balanced_task_size(int(pending.sum()), slots)
    for start, stop in chunk_ranges(n_spectra, spectra_per_task):
        positions = np.flatnonzero(pending[start:stop]) + start
        for first in range(0, len(positions), per_task):  # a task never crosses a store chunk
            tasks.append(dataclasses.replace(template, positions=tuple(int(p) for p in positions[first:first + per_task])))
    if not tasks:
        report.seconds = time.perf_counter() - began
        return report

    try:
        client.register_plugin(plugin)  # loads the model on every worker now; a failure stops the run here
    except Exception:
        client.unregister_worker_plugin(plugin.name)  # forget it, so that a later run loads it afresh
        raise
    report.forward_rows = {address: rows for address, rows in client.run(plugin_forward_rows, plugin.name).items()
                           if rows is not None}
    resources = {GPU_RESOURCE: GPU_TASK_SHARE} if gpus else None
    log.info("submitting %d tasks (%s)", len(tasks), f"resources {resources}" if resources else "any worker")
    futures = client.map(
        infer_chunk,
        tasks,
        key=[f"infer-{name}-{weights[:8]}-{t.positions[0]}-{t.positions[-1] + 1}" for t in tasks],
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
            summary = _record_failed_task(store, task, future.exception(), report)
        report.chunks.append(summary)
        report.n_ok += summary.n_ok
        report.n_no_result += summary.n_no_result
        report.n_degenerate += summary.n_degenerate
        report.n_missing_photometry += summary.n_missing_photometry
        bar.update(summary.n_spectra)
        future.release()
    bar.close()
    with _writing_results(store):
        results.compact(name, weights)
    report.chunks.sort(key=lambda chunk: chunk.start)
    report.seconds = time.perf_counter() - began
    return report


def require_grid(store: SpectrumStore, spec: GridSpec, model: str | Path) -> None:
    """A model's grid must be in the store: an ingest grid always is (maybe empty); a model's own grid once
    ``store regrid`` has filled it, with the same wavelengths (:class:`~catalogbuilder.config.ConfigError` saying
    which command fills it)."""
    if spec.base is None:
        return
    recorded = store.derived_grids().get(spec.name)
    if recorded is None:
        raise ConfigError([f"the store {store.path} has no {spec.name} grid, the grid of model {model}: fill it from the "
                           f"stored native pixels with `catalogbuilder store regrid {store.path} --model {model}`"])
    if recorded != spec:
        raise ConfigError([f"the {spec.name} grid of the store {store.path} has other wavelengths than model {model} "
                           f"({recorded} vs {spec}): give the model's grid another name"])


def _changed_photometry(store: SpectrumStore, grid: str, results_dir: Path, done: np.ndarray, photometry_path: str,
                        keys: Sequence[str], report: InferenceReport) -> np.ndarray:
    """Positions done before whose photometry inputs differ from the table's now (they are recomputed)."""
    positions = np.flatnonzero(done)
    columns = store.columns(grid, ("spectrum_id", *phot.HEADER_KEYS), positions=positions)
    ids = columns["spectrum_id"].astype(str).to_numpy()
    inputs = phot.gather_inputs(photometry_path, ids, phot.header_photometry(columns), keys)
    recorded = store.results.rows(results_dir, columns=["spectrum_id", "status", *phot.input_columns(keys)])
    changed_ids = phot.changed_inputs(recorded, inputs)
    report.n_photometry_changed = len(changed_ids)
    changed = np.zeros(len(done), dtype=bool)
    changed[positions[np.isin(ids, list(changed_ids))]] = True
    return changed


def _record_failed_task(store: SpectrumStore, task: ChunkTask, exc: BaseException,
                        report: InferenceReport) -> ChunkSummary:
    """Write ``no_result`` rows for the spectra of a task that failed for good, and count it as failed."""
    positions = np.asarray(task.positions, dtype=np.int64)
    start, stop = int(positions[0]), int(positions[-1]) + 1
    reason = f"task failed after retries: {type(exc).__name__}: {exc}"
    log.warning("task %d-%d failed: %s", start, stop, reason)
    report.failed_chunks.append((start, stop, reason))
    ids = store.columns(task.grid, ("spectrum_id",), positions=positions)["spectrum_id"].astype(str).to_numpy()
    frame = provenance_frame(ids, positions, task, STATUS_NO_RESULT, reason)
    for name in value_columns(task.outputs) + phot.result_columns(task.photometry_keys):  # same columns in every part
        frame[name] = np.nan
    with _writing_results(store):
        part = store.results.write_part(frame)
    return ChunkSummary(start, stop, len(frame), 0, len(frame), 0, "", str(part) if part else None, 0.0)


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over spectra (disabled when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="spectra", desc="infer", disable=not enabled)
