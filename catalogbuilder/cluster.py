"""Getting a Dask client: a local CPU cluster by default, a local GPU cluster when asked and possible,
an existing scheduler (address or scheduler file), a dask-jobqueue cluster (SLURM, PBS) or a SLURM runner
described by a YAML file in ``cluster_configs/``.

A cluster YAML has dask-jobqueue's schema plus a small ``catalogbuilder:`` section (validated as a whole by
:class:`catalogbuilder.config.ClusterSettings`; unknown keys are errors)::

    jobqueue:
      slurm:                      # keyword arguments of dask_jobqueue.SLURMCluster (``-`` or ``_`` both accepted)
        cores: 8
        memory: 32GiB
        walltime: "04:00:00"
        worker_extra_args: [--resources, GPU=1]
    catalogbuilder:
      kind: slurm                 # local | local-gpu | slurm | pbs | slurm-runner
      scale: {jobs: 4}            # or adapt: {minimum: 0, maximum: 20} (jobs for jobqueue, workers for local)
      options: {}                 # keyword arguments of LocalCluster / LocalCUDACluster / SLURMRunner
      wait_for_workers: 1         # block until this many workers joined (default: 0, the runner: all)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster
from distributed.deploy import Cluster

from catalogbuilder.config import JOBQUEUE_KINDS, ClusterSettings, ConfigError

log = logging.getLogger(__name__)

RUNNERS: tuple[str, ...] = ("slurm",)
# Defaults of every local cluster started here: one thread per worker process (torch and numpy already use
# their own threads), no dashboard unless the config asks for one, and worker logs at ERROR only (the warnings
# distributed prints while a local cluster shuts down, heartbeats to a closed scheduler, are noise to a user).
LOCAL_DEFAULTS: dict[str, Any] = {"threads_per_worker": 1, "processes": True, "dashboard_address": None,
                                  "silence_logs": logging.ERROR}
RUNNER_DEFAULT_SCHEDULER_FILE = "scheduler-{job_id}.json"
# Worker resource advertised by GPU workers (``dask cuda worker --resources GPU=1``); inference tasks require a share.
GPU_RESOURCE = "GPU"
# Threads of a local GPU worker: two inference tasks at once, one reading and writing while the other computes.
GPU_WORKER_THREADS = 2
# --device of the stage commands → connect(gpu=...): which local cluster starts when no cluster option is given.
DEVICE_TO_GPU: dict[str, bool | str] = {"auto": "auto", "cpu": False, "cuda": True}
# A local CPU cluster whose workers are threads of the calling process (``connect(in_process=True)``, the ``infer``
# command): for work that releases the GIL (torch forward passes) two worker threads compute as fast as two processes
# (full-size ANet III, 21 rows per forward: 0.169 vs 0.17 s), and no worker process is started, imports torch, or is
# shut down (a cold `infer` of 64 spectra: 18.7 s instead of 20.8 s). No per-worker memory limit: the workers share
# the process, whose whole memory distributed would otherwise compare with each worker's share and pause them all.
IN_PROCESS_OPTIONS: dict[str, Any] = {"processes": False, "memory_limit": 0}


def _import_jobqueue_class(kind: str) -> type[Cluster]:
    """The dask-jobqueue cluster class of ``kind``. Importing dask_jobqueue installs a process-wide SIGINT handler
    (for its runners) that turns Ctrl-C into ``sys.exit``; the previous handler is put back for jobqueue clusters."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    import dask_jobqueue

    if in_main_thread and previous is not None:
        signal.signal(signal.SIGINT, previous)
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def local_cpu_cluster(workers: int | None = None, **options: Any) -> LocalCluster:
    """A CPU :class:`LocalCluster` (one single-threaded process per core unless told otherwise)."""
    kwargs = {**LOCAL_DEFAULTS, **options}
    if workers is not None:
        kwargs["n_workers"] = workers
    return LocalCluster(**kwargs)


def visible_gpus() -> tuple[int, str | None]:
    """(GPUs a local GPU cluster would use, why it cannot start or None). dask-cuda is imported only here, so a
    machine without it never needs it; its count honours ``CUDA_VISIBLE_DEVICES``."""
    try:
        from dask_cuda.utils import get_n_gpus
    except ImportError:
        return 0, "dask-cuda is not installed (pip install 'catalogbuilder[gpu]')"
    try:
        n_gpus = get_n_gpus()
    except Exception as error:  # NVML missing or broken: no usable GPU either way
        return 0, f"no GPU could be queried ({error})"
    return n_gpus, None if n_gpus >= 1 else "no GPU is visible"


def gpu_unavailable_reason() -> str | None:
    """Why a local GPU cluster cannot start (dask-cuda missing, no GPU visible), or None when it can."""
    return visible_gpus()[1]


def local_gpu_cluster(workers: int | None = None, **options: Any) -> LocalCluster:
    """A ``dask_cuda.LocalCUDACluster`` (one worker process per GPU, :data:`GPU_WORKER_THREADS` threads each, each
    advertising the resource ``GPU=1`` unless ``resources`` is given); falls back, with a warning, to a CPU
    LocalCluster when dask-cuda is not installed or no GPU is visible. Options meant for GPUs only
    (``CUDA_VISIBLE_DEVICES``, ``rmm_*``, ``device_memory_limit``, and the ``GPU`` resource) are dropped in the
    fallback. More workers than GPUs (``workers`` or ``n_workers``) would share a GPU: :class:`~catalogbuilder.config.ConfigError`."""
    n_gpus, reason = visible_gpus()
    if reason is None:
        from dask_cuda import LocalCUDACluster

        kwargs = {**LOCAL_DEFAULTS, "threads_per_worker": GPU_WORKER_THREADS, "resources": {GPU_RESOURCE: 1},
                  **options}
        kwargs.pop("processes", None)  # LocalCUDACluster always uses one process per GPU
        if workers is not None:
            kwargs["n_workers"] = workers
        visible = kwargs.get("CUDA_VISIBLE_DEVICES")
        available = n_gpus if visible is None else len(
            visible.split(",") if isinstance(visible, str) else list(visible))
        if kwargs.get("n_workers") is not None and int(kwargs["n_workers"]) > available:
            raise ConfigError([
                f"--workers: got {kwargs['n_workers']} GPU workers, but {available} GPU(s) are visible; allowed: at "
                f"most {available} (a local GPU cluster runs one worker process per GPU, several processes on one GPU "
                "are refused), or --device cpu for a CPU cluster of that many workers"])
        return LocalCUDACluster(**kwargs)
    warnings.warn(f"local-gpu cluster requested but {reason}: starting a CPU LocalCluster instead", stacklevel=2)
    cpu_options = {
        key: value
        for key, value in options.items()
        if key not in {"CUDA_VISIBLE_DEVICES", "device_memory_limit", "resources"} and not key.startswith("rmm_")
    }
    return local_cpu_cluster(workers, **cpu_options)


def make_cluster(config: ClusterSettings, workers: int | None = None) -> Cluster:
    """The cluster object a config describes, with no jobs submitted yet (see :func:`start_workers`).

    ``workers`` overrides the local worker count. Raises ConfigError for jobqueue options the cluster class does
    not accept, ValueError for a runner config (a runner is not a cluster object: use :func:`connect`)."""
    if config.kind == "local":
        return local_cpu_cluster(workers, **config.options)
    if config.kind == "local-gpu":
        return local_gpu_cluster(workers, **config.options)
    if config.kind in JOBQUEUE_KINDS:
        cluster_class = _import_jobqueue_class(config.kind)
        try:
            return cluster_class(**config.jobqueue)
        except (TypeError, ValueError) as error:  # dask-jobqueue reports an unknown option as a ValueError
            raise ConfigError([f"{config.source}: jobqueue.{config.kind}: {error}; allowed: keyword arguments of "
                               f"{cluster_class.__name__}"]) from error
    raise ValueError(f"kind {config.kind!r} is run by connect(), not built as a cluster object")


def start_workers(cluster: Cluster, config: ClusterSettings) -> None:
    """Apply the config's ``scale`` (jobs for jobqueue, workers for local clusters) or ``adapt`` bounds."""
    is_jobqueue = config.kind in JOBQUEUE_KINDS
    if config.scale_jobs is not None:
        if is_jobqueue:
            cluster.scale(jobs=config.scale_jobs)
        else:
            cluster.scale(config.scale_jobs)
    elif config.adapt is not None:
        if is_jobqueue:
            cluster.adapt(**{f"{key}_jobs": value for key, value in config.adapt.items()})
        else:
            cluster.adapt(**config.adapt)


@contextlib.contextmanager
def _runner_client(options: dict[str, Any], wait_for_workers: int | None) -> Iterator[Client]:
    """A client inside an ``srun``-launched job via ``dask_jobqueue.slurm.SLURMRunner``: task 0 runs the scheduler,
    task 1 this client code, every other task a worker. On the scheduler and worker tasks the runner blocks
    and then exits the process, so only the client task gets past it."""
    from dask_jobqueue.slurm import SLURMRunner

    kwargs = {"scheduler_file": RUNNER_DEFAULT_SCHEDULER_FILE, **options}
    with SLURMRunner(**kwargs) as runner, Client(runner) as client:
        expected = runner.n_workers if wait_for_workers is None else wait_for_workers
        log.info("SLURM runner: waiting for %d workers", expected)
        client.wait_for_workers(expected)
        yield client


@contextlib.contextmanager
def _cluster_client(cluster: Cluster, config: ClusterSettings | None = None) -> Iterator[Client]:
    """A client of ``cluster`` after the config's scaling and waiting; the cluster is closed on exit."""
    with cluster, Client(cluster) as client:
        if config is not None:
            start_workers(cluster, config)
            if config.wait_for_workers:
                client.wait_for_workers(config.wait_for_workers)
            log.info("cluster %s (%s), dashboard %s", config.source, config.kind, client.dashboard_link)
        yield client


def add_cluster_arguments(parser: argparse.ArgumentParser, device: str = "auto") -> None:
    """Add the common ``--cluster/--scheduler-file/--address/--runner/--workers/--device`` options to a sub-command;
    ``device`` is its ``--device`` default (``cpu`` for stages without a model to run on GPUs: a local cluster of
    theirs has one worker per core, not per GPU)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cluster", metavar="YAML", help="cluster config (cluster_configs/*.yaml)")
    group.add_argument("--scheduler-file", metavar="FILE", help="connect to a running scheduler via its scheduler file")
    group.add_argument("--address", metavar="ADDR", help="connect to a running scheduler, e.g. tcp://host:8786")
    group.add_argument(
        "--runner", choices=RUNNERS, help="inside `srun`: task 0 scheduler, task 1 client, the rest workers"
    )
    parser.add_argument("--workers", type=int, default=None,
                        help="local cluster size (default: one per core, or one per GPU on a GPU cluster)")
    parser.add_argument("--device", choices=tuple(DEVICE_TO_GPU), default=device,
                        help=f"(default: {device}) auto: a dask-cuda LocalCUDACluster, one worker per GPU, when no "
                        "cluster option is given and dask-cuda and GPUs are there, else CPU workers; models compute on "
                        "the GPU of workers holding a GPU resource. cpu: CPU workers, models on CPU. cuda: GPU workers, "
                        "models on GPU")


@contextlib.contextmanager
def connect(
    cluster: str | Path | None = None,
    scheduler_file: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    runner: str | None = None,
    gpu: bool | str = "auto",
    in_process: bool = False,
) -> Iterator[Client]:
    """Yield a connected :class:`distributed.Client`; clusters started here are closed on exit.

    At most one of ``cluster`` (YAML path), ``scheduler_file``, ``address``, ``runner`` (``"slurm"``); with none
    a local cluster is started: ``gpu=False`` a CPU cluster of ``workers`` processes (default one per core);
    ``gpu=True`` a ``LocalCUDACluster`` (one worker per GPU, resource ``GPU=1``), falling back with a warning to CPU;
    ``gpu="auto"`` (default) the GPU cluster when dask-cuda is installed and a GPU is visible, else the CPU one.
    ``in_process``: a local CPU cluster's workers are threads of this process (:data:`IN_PROCESS_OPTIONS`; for tasks
    that release the GIL); other clusters are unaffected."""
    if not (gpu is True or gpu is False or gpu == "auto"):
        raise ValueError(f"gpu must be True, False or 'auto'; got {gpu!r}")
    chosen = [name for name, value in (("cluster", cluster), ("scheduler_file", scheduler_file),
                                       ("address", address), ("runner", runner)) if value]
    if len(chosen) > 1:
        raise ValueError(f"give at most one of cluster, scheduler_file, address, runner; got {chosen}")
    if scheduler_file:
        with Client(scheduler_file=scheduler_file) as client:
            yield client
        return
    if address:
        with Client(address) as client:
            yield client
        return
    if runner:
        if runner not in RUNNERS:
            raise ValueError(f"unknown runner {runner!r}; expected one of {RUNNERS}")
        with _runner_client({}, None) as client:
            yield client
        return
    if cluster:
        config = ClusterSettings.load(cluster)
        if config.kind == "slurm-runner":
            with _runner_client(config.options, config.wait_for_workers) as client:
                yield client
            return
        with _cluster_client(make_cluster(config, workers), config) as client:
            yield client
        return
    use_gpu = gpu is True or (gpu == "auto" and gpu_unavailable_reason() is None)
    local = local_gpu_cluster(workers) if use_gpu else local_cpu_cluster(
        workers, **(IN_PROCESS_OPTIONS if in_process else {}))
    with _cluster_client(local) as client:
        yield client


def cluster_requested(args: argparse.Namespace) -> bool:
    """True when any option of :func:`add_cluster_arguments` was given on the command line."""
    return any(getattr(args, name, None) for name in ("cluster", "scheduler_file", "address", "runner", "workers"))


def connect_from_args(args: argparse.Namespace, in_process: bool = False) -> contextlib.AbstractContextManager[Client]:
    """``connect`` with the options added by :func:`add_cluster_arguments` (``--device`` picks the local cluster;
    ``in_process``: a local CPU cluster of threads, see :func:`connect`)."""
    return connect(
        cluster=getattr(args, "cluster", None),
        scheduler_file=getattr(args, "scheduler_file", None),
        address=getattr(args, "address", None),
        workers=getattr(args, "workers", None),
        runner=getattr(args, "runner", None),
        gpu=DEVICE_TO_GPU[getattr(args, "device", "auto")],
        in_process=in_process,
    )
