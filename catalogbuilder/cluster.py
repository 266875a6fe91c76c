"""Getting a Dask client: a local CPU cluster by default, a local GPU cluster when asked and possible,
an existing scheduler (address or scheduler file), or a dask-jobqueue cluster from a YAML file in cluster_configs/."""
from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--cluster/--scheduler-file/--address/--workers`` options to a sub-command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cluster", metavar="YAML", help="cluster config (cluster_configs/*.yaml)")
    group.add_argument("--scheduler-file", metavar="FILE", help="connect to a running scheduler via its scheduler file")
    group.add_argument("--address", metavar="ADDR", help="connect to a running scheduler, e.g. tcp://host:8786")
    parser.add_argument("--workers", type=int, default=None, help="local cluster size (default: one per core)")


@contextlib.contextmanager
def connect(
    cluster: str | None = None,
    scheduler_file: str | None = None,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[Client]:
    """Yield a connected :class:`distributed.Client`; clusters started here are closed on exit."""
    if scheduler_file:
        with Client(scheduler_file=scheduler_file) as client:
            yield client
        return
    if address:
        with Client(address) as client:
            yield client
        return
    if cluster:
        raise NotImplementedError("cluster YAML configs are added with cluster_configs/")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        with Client(local) as client:
            yield client


def connect_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager[Client]:
    """``connect`` with the options added by :func:`add_cluster_arguments`."""
    return connect(
        cluster=getattr(args, "cluster", None),
        scheduler_file=getattr(args, "scheduler_file", None),
        address=getattr(args, "address", None),
        workers=getattr(args, "workers", None),
    )
