"""GPU routing without a GPU: on a cluster where one worker advertises ``GPU=1`` every inference task must run there,
however idle the other worker is; without GPU workers everything runs on a CPU cluster."""
from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, Scheduler, SpecCluster, Worker, get_worker

from catalogbuilder.cluster import GPU_RESOURCE, connect, gpu_unavailable_reason
from catalogbuilder.inference.graph import gpu_workers, run_inference
from catalogbuilder.store.results import STATUS_OK


@pytest.fixture(scope="module")
def mixed_cluster() -> Iterator[tuple[Client, str, str]]:
    """An in-process cluster of two single-threaded workers, only the first advertising ``GPU=1``.
    Yields (client, GPU worker address, CPU worker address)."""
    torch.set_num_threads(1)
    workers = {
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {GPU_RESOURCE: 1}}},
        "cpu": {"cls": Worker, "options": {"nthreads": 1}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "port 8787 in use" from a parallel test run
        cluster = SpecCluster(workers=workers, scheduler=scheduler)
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {worker["name"]: address for address, worker in info.items()}
        yield client, by_name["gpu"], by_name["cpu"]


def worker_address(_: int) -> str:
    """A short task that reports where it ran."""
    time.sleep(0.05)
    return get_worker().address


def test_cluster_really_has_two_workers_for_unrouted_tasks(mixed_cluster: tuple[Client, str, str]) -> None:
    client, gpu_address, cpu_address = mixed_cluster
    assert gpu_workers(client) == [gpu_address]
    # control: tasks without a resource requirement use both workers, so the routing test below can fail
    ran_on = set(client.gather(client.map(worker_address, range(20), pure=False)))
    assert ran_on == {gpu_address, cpu_address}


def test_every_inference_task_runs_on_the_gpu_worker(mixed_cluster: tuple[Client, str, str], tmp_path: Path,
                                                    shared_data: Path, conformance_dir: Path) -> None:
    from catalogbuilder.store import SpectrumStore

    client, gpu_address, _ = mixed_cluster
    store = tmp_path / "store"
    SpectrumStore.open(store, create=True).ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    report = run_inference(client, SpectrumStore.open(store), conformance_dir / "apogee_small", draws=2, spectra_per_task=1,
                           device="cpu", progress=False)
    assert len(report.chunks) == 5 and report.n_ok == 5
    assert {chunk.worker for chunk in report.chunks} == {gpu_address}
    assert (SpectrumStore.open(store).results.read()["status"] == STATUS_OK).all()


def test_without_gpus_connect_gives_a_cpu_cluster() -> None:
    if gpu_unavailable_reason() is None:
        pytest.skip("this machine has a GPU and dask-cuda")
    with connect(workers=1, gpu="auto") as client:
        assert gpu_workers(client) == []
        assert client.submit(torch.cuda.is_available).result() is False
    with pytest.warns(UserWarning, match="starting a CPU LocalCluster instead"), connect(workers=1, gpu=True) as client:
        assert gpu_workers(client) == []
    with pytest.raises(ValueError, match="gpu must be"), connect(workers=1, gpu="yes"):
        pass


def test_a_cuda_request_without_cuda_fails_before_any_task(mixed_cluster: tuple[Client, str, str], tmp_path: Path,
                                                          shared_data: Path, conformance_dir: Path) -> None:
    from catalogbuilder.store import SpectrumStore

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    client, _, _ = mixed_cluster
    store = tmp_path / "store"
    SpectrumStore.open(store, create=True).ingest([shared_data / "apogee" / "apStar-dr17-2M19485057+5005279.fits"], progress=False)
    model = tmp_path / "model"
    shutil.copytree(conformance_dir / "apogee_small", model)
    with pytest.raises(Exception, match="CUDA|cuda"):
        run_inference(client, SpectrumStore.open(store), model, device="cuda", progress=False)
    assert not (store / "results").exists()


@pytest.mark.skipif(gpu_unavailable_reason() is not None,
                    reason=f"needs dask-cuda and a GPU: {gpu_unavailable_reason()} (bench/gpu_check.sh runs it)")
def test_inference_on_a_local_cuda_cluster(tmp_path: Path, shared_data: Path, conformance_dir: Path) -> None:
    """On a real LocalCUDACluster (what every command starts by default on a GPU machine): one worker per GPU, each
    on its own GPU, every task on a GPU worker, the model on CUDA there, and the reference predictions reproduced."""
    from catalogbuilder.cluster import visible_gpus
    from catalogbuilder.inference.device import shared_gpus, worker_gpu_identity
    from catalogbuilder.store import SpectrumStore

    store = SpectrumStore.open(tmp_path / "store", create=True)
    store.ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    model_dir = conformance_dir / "apogee_small"
    with connect() as client:
        gpus = gpu_workers(client)
        assert len(gpus) == visible_gpus()[0] == len(client.scheduler_info(n_workers=-1)["workers"])
        assert shared_gpus(client.run(worker_gpu_identity)) == {}
        report = run_inference(client, store, model_dir, draws=0, spectra_per_task=1, progress=False)
        assert report.n_ok == 5 and {chunk.worker for chunk in report.chunks} <= set(gpus)  # apStar rows 1 aside
        devices = client.run(lambda dask_worker: sorted({plugin.model.device.type for plugin in
                                                         dask_worker.plugins.values()
                                                         if getattr(plugin, "model", None) is not None}))
        assert all(found == ["cuda"] for found in devices.values()), devices
    vectors = np.load(model_dir / "vectors.npz")
    columns = store.columns("apogee", ("spectrum_id", "file_path", "row"))
    names = {spectrum_id: f"apogee/{Path(path).name}[{row}]"
             for spectrum_id, path, row in zip(columns["spectrum_id"], columns["file_path"], columns["row"])}
    reference = dict(zip((str(name) for name in vectors["names"]),
                         vectors["predictions"][:, list(vectors["param_names"]).index("logTeff")].astype(np.float64)))
    results = store.results.read()
    expected = np.array([reference[names[spectrum_id]] for spectrum_id in results["spectrum_id"]])
    np.testing.assert_allclose(results["logteff"].to_numpy(), expected, rtol=1e-4)
