"""Getting a Dask client: a local CPU cluster by default, a local GPU cluster when asked and possible,
an existing scheduler (address or scheduler file), a dask-jobqueue cluster (SLURM, PBS) or a SLURM runner
described by a YAML file in ``cluster_configs/``.

A cluster YAML has dask-jobqueue's schema plus a small ``catalogbuilder:`` section::

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
import dataclasses
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from distributed import Client, LocalCluster
from distributed.deploy import Cluster

log = logging.getLogger(__name__)

CLUSTER_KINDS: tuple[str, ...] = ("local", "local-gpu", "slurm", "pbs", "slurm-runner")
JOBQUEUE_KINDS: tuple[str, ...] = ("slurm", "pbs")
RUNNERS: tuple[str, ...] = ("slurm",)
# Defaults of every local cluster started here: one thread per worker process (torch and numpy already use
# their own threads), no dashboard unless the config asks for one, and worker logs at ERROR only (the warnings
# distributed prints while a local cluster shuts down, heartbeats to a closed scheduler, are noise to a user).
LOCAL_DEFAULTS: dict[str, Any] = {"threads_per_worker": 1, "processes": True, "dashboard_address": None,
                                  "silence_logs": logging.ERROR}
RUNNER_DEFAULT_SCHEDULER_FILE = "scheduler-{job_id}.json"
# Worker resource advertised by GPU workers (``dask cuda worker --resources GPU=1``); GPU tasks require one unit.
GPU_RESOURCE = "GPU"


class ClusterConfigError(ValueError):
    """A cluster YAML that cannot describe a cluster; the message says which key is wrong."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A parsed cluster YAML.

    kind: one of :data:`CLUSTER_KINDS`. jobqueue: keyword arguments of the dask-jobqueue cluster class
    (keys with ``_``). options: keyword arguments of LocalCluster, LocalCUDACluster or SLURMRunner.
    scale_jobs / adapt: how many jobs (jobqueue) or workers (local) to start. wait_for_workers: workers to wait
    for before the client is handed out (``None``: 0, or every task of the job for the runner).
    """

    kind: str
    jobqueue: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    scale_jobs: int | None = None
    adapt: dict[str, int] | None = None
    wait_for_workers: int | None = None
    source: Path | None = None


def _underscored(mapping: dict[str, Any]) -> dict[str, Any]:
    """dask config spells keys with ``-``; Python keyword arguments need ``_``."""
    return {str(key).replace("-", "_"): value for key, value in mapping.items()}


def parse_cluster_config(document: dict[str, Any], source: Path | None = None) -> ClusterConfig:
    """Validate a loaded cluster YAML document (see the module docstring) into a :class:`ClusterConfig`."""
    where = f" in {source}" if source else ""
    if not isinstance(document, dict):
        raise ClusterConfigError(f"cluster config{where} must be a mapping, got {type(document).__name__}")
    ours = document.get("catalogbuilder") or {}
    unknown = set(ours) - {"kind", "scale", "adapt", "options", "wait_for_workers", "wait-for-workers"}
    if unknown:
        raise ClusterConfigError(f"unknown catalogbuilder keys{where}: {sorted(unknown)}")
    queues = document.get("jobqueue") or {}
    kind = ours.get("kind") or (next(iter(queues)) if len(queues) == 1 else None)
    if kind not in CLUSTER_KINDS:
        raise ClusterConfigError(f"catalogbuilder.kind{where} must be one of {CLUSTER_KINDS}, got {kind!r}")
    jobqueue: dict[str, Any] = {}
    if kind in JOBQUEUE_KINDS:
        if kind not in queues:
            raise ClusterConfigError(f"kind {kind!r}{where} needs a jobqueue.{kind} section")
        jobqueue = _underscored(queues[kind] or {})
        if "name" in jobqueue:  # in dask-jobqueue's YAML `name` is the job name; as a keyword it is `job_name`
            jobqueue.setdefault("job_name", jobqueue.pop("name"))
        for required in ("cores", "memory"):
            if required not in jobqueue:
                raise ClusterConfigError(f"jobqueue.{kind}.{required} is required{where}")
    scale = ours.get("scale")
    adapt = ours.get("adapt")
    if scale is not None and adapt is not None:
        raise ClusterConfigError(f"give either catalogbuilder.scale or catalogbuilder.adapt{where}, not both")
    scale_jobs = None
    if scale is not None:
        scale_jobs = int(scale["jobs"] if isinstance(scale, dict) else scale)
    if adapt is not None:
        if not isinstance(adapt, dict) or not set(adapt) <= {"minimum", "maximum"}:
            raise ClusterConfigError(f"catalogbuilder.adapt{where} must be {{minimum: N, maximum: M}}")
        adapt = {key: int(value) for key, value in adapt.items()}
    wait = ours.get("wait_for_workers", ours.get("wait-for-workers"))
    return ClusterConfig(
        kind=kind,
        jobqueue=jobqueue,
        options=_underscored(ours.get("options") or {}),
        scale_jobs=scale_jobs,
        adapt=adapt,
        wait_for_workers=None if wait is None else int(wait),
        source=source,
    )


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ClusterConfigError(f"cluster config not found: {path}")
    with open(path) as handle:
        return parse_cluster_config(yaml.safe_load(handle), source=path.resolve())


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


def gpu_unavailable_reason() -> str | None:
    """Why a local GPU cluster cannot start (dask-cuda missing, no GPU visible), or None when it can."""
    try:
        from dask_cuda.utils import get_n_gpus
    except ImportError:
        return "dask-cuda is not installed (pip install 'catalogbuilder[gpu]')"
    try:
        n_gpus = get_n_gpus()
    except Exception as error:  # NVML missing or broken: no usable GPU either way
        return f"no GPU could be queried ({error})"
    return None if n_gpus >= 1 else "no GPU is visible"


def local_gpu_cluster(workers: int | None = None, **options: Any) -> LocalCluster:
    """A ``dask_cuda.LocalCUDACluster`` (one worker per GPU, each advertising the resource ``GPU=1`` unless
    ``resources`` is given); falls back, with a warning, to a CPU LocalCluster when dask-cuda is not installed or no
    GPU is visible. Options meant for GPUs only (``CUDA_VISIBLE_DEVICES``, ``rmm_*``, ``device_memory_limit``, and
    the ``GPU`` resource) are dropped in the fallback."""
    reason = gpu_unavailable_reason()
    if reason is None:
        from dask_cuda import LocalCUDACluster

        kwargs = {**LOCAL_DEFAULTS, "resources": {GPU_RESOURCE: 1}, **options}
        kwargs.pop("processes", None)  # LocalCUDACluster always uses one process per GPU
        if workers is not None:
            kwargs["n_workers"] = workers
        return LocalCUDACluster(**kwargs)
    warnings.warn(f"local-gpu cluster requested but {reason}: starting a CPU LocalCluster instead", stacklevel=2)
    cpu_options = {
        key: value
        for key, value in options.items()
        if key not in {"CUDA_VISIBLE_DEVICES", "device_memory_limit", "resources"} and not key.startswith("rmm_")
    }
    return local_cpu_cluster(workers, **cpu_options)


def make_cluster(config: ClusterConfig, workers: int | None = None) -> Cluster:
    """The cluster object a config describes, with no jobs submitted yet (see :func:`start_workers`).

    ``workers`` overrides the local worker count. Raises ClusterConfigError for a runner config (a runner is not
    a cluster object: use :func:`connect`) and for jobqueue options the cluster class does not accept."""
    if config.kind == "local":
        return local_cpu_cluster(workers, **config.options)
    if config.kind == "local-gpu":
        return local_gpu_cluster(workers, **config.options)
    if config.kind in JOBQUEUE_KINDS:
        cluster_class = _import_jobqueue_class(config.kind)
        try:
            return cluster_class(**config.jobqueue)
        except (TypeError, ValueError) as error:  # dask-jobqueue reports an unknown option as a ValueError
            raise ClusterConfigError(f"jobqueue.{config.kind} in {config.source}: {error}") from error
    raise ClusterConfigError(f"kind {config.kind!r} is run by connect(), not built as a cluster object")


def start_workers(cluster: Cluster, config: ClusterConfig) -> None:
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
def _cluster_client(cluster: Cluster, config: ClusterConfig | None = None) -> Iterator[Client]:
    """A client of ``cluster`` after the config's scaling and waiting; the cluster is closed on exit."""
    with cluster, Client(cluster) as client:
        if config is not None:
            start_workers(cluster, config)
            if config.wait_for_workers:
                client.wait_for_workers(config.wait_for_workers)
            log.info("cluster %s (%s), dashboard %s", config.source, config.kind, client.dashboard_link)
        yield client


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--cluster/--scheduler-file/--address/--runner/--workers`` options to a sub-command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cluster", metavar="YAML", help="cluster config (cluster_configs/*.yaml)")
    group.add_argument("--scheduler-file", metavar="FILE", help="connect to a running scheduler via its scheduler file")
    group.add_argument("--address", metavar="ADDR", help="connect to a running scheduler, e.g. tcp://host:8786")
    group.add_argument(
        "--runner", choices=RUNNERS, help="inside `srun`: task 0 scheduler, task 1 client, the rest workers"
    )
    parser.add_argument("--workers", type=int, default=None, help="local cluster size (default: one per core)")


@contextlib.contextmanager
def connect(
    cluster: str | Path | None = None,
    scheduler_file: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    runner: str | None = None,
    gpu: bool | str = False,
) -> Iterator[Client]:
    """Yield a connected :class:`distributed.Client`; clusters started here are closed on exit.

    At most one of ``cluster`` (YAML path), ``scheduler_file``, ``address``, ``runner`` (``"slurm"``); with none
    a local cluster is started: ``gpu=False`` a CPU cluster of ``workers`` processes (default one per core);
    ``gpu=True`` a ``LocalCUDACluster`` (one worker per GPU, resource ``GPU=1``), falling back with a warning to CPU;
    ``gpu="auto"`` the GPU cluster when dask-cuda is installed and a GPU is visible, else the CPU one."""
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
        config = load_cluster_config(cluster)
        if config.kind == "slurm-runner":
            with _runner_client(config.options, config.wait_for_workers) as client:
                yield client
            return
        with _cluster_client(make_cluster(config, workers), config) as client:
            yield client
        return
    use_gpu = gpu is True or (gpu == "auto" and gpu_unavailable_reason() is None)
    with _cluster_client(local_gpu_cluster(workers) if use_gpu else local_cpu_cluster(workers)) as client:
        yield client


def cluster_requested(args: argparse.Namespace) -> bool:
    """True when any option of :func:`add_cluster_arguments` was given on the command line."""
    return any(getattr(args, name, None) for name in ("cluster", "scheduler_file", "address", "runner", "workers"))


def connect_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager[Client]:
    """``connect`` with the options added by :func:`add_cluster_arguments`."""
    return connect(
        cluster=getattr(args, "cluster", None),
        scheduler_file=getattr(args, "scheduler_file", None),
        address=getattr(args, "address", None),
        workers=getattr(args, "workers", None),
        runner=getattr(args, "runner", None),
        gpu=getattr(args, "gpu", False),
    )
