"""Device choice, GPU placement, precision and forward-batch rows without a GPU: the decisions are made from worker
resources, environment and measurements, which are faked here where hardware would be needed (dask-cuda, CUDA)."""
from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from catalogbuilder import cluster
from catalogbuilder.cli import main as catalogbuilder_main
from catalogbuilder.cluster import GPU_RESOURCE, connect
from catalogbuilder.config import ConfigError
from catalogbuilder.constants import GRID_SPECS
from catalogbuilder.inference import device as device_module
from catalogbuilder.inference import graph
from catalogbuilder.inference.device import (GpuPlacementError, choose_forward_rows, default_forward_rows,
                                             forward_rows_candidates, precision_options, resolve_device, shared_gpus)
from catalogbuilder.inference.graph import (ModelPlugin, balanced_task_size, check_gpu_placement, compute_slots,
                                           run_inference)
from catalogbuilder.store import SpectrumStore
from catalogbuilder.store.results import STATUS_OK
from catalogbuilder.models.registry import describe_model
from catalogbuilder.submit import build_parser


@pytest.fixture
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process pretends to see CUDA (as every process on a GPU node does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_means_cuda_only_on_workers_holding_a_gpu(cuda_visible: None) -> None:
    assert resolve_device("auto", holds_gpu=True) == "cuda"
    assert resolve_device("auto", holds_gpu=False) == "cpu", "a CPU worker on a GPU node stays on the CPU"
    assert resolve_device("cuda", holds_gpu=False) == "cuda" and resolve_device("cpu", holds_gpu=True) == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu", holds_gpu=True)


def test_a_cpu_worker_on_a_gpu_node_loads_the_model_on_cpu(cuda_visible: None, conformance_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's model loading on a worker without a GPU resource, in a process that sees CUDA: model on the CPU."""
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # process-wide settings stay as they are
    monkeypatch.setattr(graph, "reuse_freed_memory", lambda: False)
    summary = describe_model(conformance_dir / "apogee_small")
    worker = types.SimpleNamespace(address="tcp://cpu-worker", state=types.SimpleNamespace(total_resources={},
                                                                                           nthreads=1))
    plugin = ModelPlugin(str(summary.directory), summary.weights_sha256, device="auto", draws=20)
    plugin.load(worker)
    assert plugin.model.device.type == "cpu" and plugin.model.max_batch == 84  # 4 spectra: CPU_DEFAULT_ROWS
    skipped = ModelPlugin(str(summary.directory), summary.weights_sha256, gpu_workers_only=True)
    skipped.load(worker)
    assert skipped.model is None, "with GPU workers in the cluster, CPU workers load nothing"


def test_several_processes_on_one_gpu_are_refused(conformance_dir: Path, store: Path) -> None:
    assert shared_gpus({"a": ("node1", "0"), "b": ("node1", "1"), "c": ("node2", "0")}) == {}
    assert shared_gpus({"a": ("node1", "0"), "b": ("node1", "0")}) == {("node1", "0"): ["a", "b"]}
    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as two,
          Client(two, set_as_default=False) as client):
        check_gpu_placement(client, "cpu", [])
        check_gpu_placement(client, "auto", [])  # no GPU workers: nobody computes on a GPU
        with pytest.raises(GpuPlacementError, match="2 worker processes .* on GPU 0"):
            check_gpu_placement(client, "cuda", [])
        with pytest.raises(GpuPlacementError, match="one worker process per GPU"):
            run_inference(client, SpectrumStore.open(store), conformance_dir / "apogee_small", device="cuda",
                          progress=False)
    assert not (store / "results").exists(), "refused before any task"


class FakeLocalCUDACluster(LocalCluster):
    """Stands in for dask_cuda.LocalCUDACluster: records its keyword arguments, starts in-process CPU workers with
    the requested threads and resources."""

    calls: list[dict] = []

    def __init__(self, **kwargs: object) -> None:
        FakeLocalCUDACluster.calls.append(kwargs)
        super().__init__(n_workers=int(kwargs.get("n_workers") or 1), threads_per_worker=kwargs["threads_per_worker"],
                         resources=kwargs["resources"], processes=False, dashboard_address=None)


@pytest.fixture
def fake_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """dask-cuda 'installed' with one visible GPU. Its in-process workers set up models in this test process, so
    torch's thread count and glibc's malloc settings (process-wide: they change float rounding of later tests' CPU
    matmuls) are left as they are."""
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(graph, "reuse_freed_memory", lambda: False)
    FakeLocalCUDACluster.calls = []
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeLocalCUDACluster))
    monkeypatch.setattr(cluster, "visible_gpus", lambda: (1, None))
    yield FakeLocalCUDACluster.calls


def test_commands_start_a_gpu_cluster_by_default_where_there_are_gpus(fake_gpu_machine: list[dict], store: Path,
                                                                      conformance_dir: Path, capsys) -> None:
    """`catalogbuilder infer` with no cluster option on a GPU machine: one GPU worker (GPU=1, two threads), every task
    there (the model stays on the CPU here only because this process has no CUDA); more workers than GPUs: exit 2.
    ``--device cpu`` is covered with dask-submit's parser below."""
    assert catalogbuilder_main(["infer", "--store", str(store), "--model", str(conformance_dir / "apogee_small"),
                                "--draws", "2", "--no-progress"]) == 0
    (call,) = fake_gpu_machine
    assert call["resources"] == {GPU_RESOURCE: 1} and call["threads_per_worker"] == cluster.GPU_WORKER_THREADS
    output = capsys.readouterr().out
    assert "5 ok" in output and "96 rows per forward pass" in output, output  # 32 spectra x (2 draws + 1)
    assert (SpectrumStore.open(store).results.read()["status"] == STATUS_OK).all()

    assert catalogbuilder_main(["infer", "--store", str(store), "--model", str(conformance_dir / "apogee_small"),
                                "--workers", "2", "--no-progress"]) == 2
    assert "--workers: got 2 GPU workers, but 1 GPU(s) are visible" in capsys.readouterr().err


def test_dask_submit_defaults_to_the_gpu_cluster(fake_gpu_machine: list[dict]) -> None:
    args, workflow_argv = build_parser().parse_known_args(["workflow.py", "--config", "x.yaml"])
    assert args.device == "auto" and workflow_argv == ["--config", "x.yaml"]
    with cluster.connect_from_args(args) as client:
        assert [info["resources"] for info in client.scheduler_info()["workers"].values()] == [{GPU_RESOURCE: 1}]
        assert compute_slots(client) == 2, "two tasks in flight on the GPU worker: one computes, one reads/writes"
    with cluster.connect_from_args(build_parser().parse_args(["workflow.py", "--device", "cpu", "--workers", "1"])) \
            as client:
        assert [info.get("resources") for info in client.scheduler_info()["workers"].values()] in ([None], [{}])
    with pytest.raises(ConfigError, match="--workers: got 3 GPU workers"), connect(workers=3, gpu=True):
        pass


def test_precisions_map_to_model_options() -> None:
    assert precision_options("float32") == {}
    assert precision_options("tf32") == {"allow_tf32": True}
    assert precision_options("bf16") == {"autocast_dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="precision must be"):
        precision_options("fp8")


def test_forward_rows_candidates_tile_a_store_chunk() -> None:
    assert forward_rows_candidates("cpu", 20) == (21, 42, 84, 168), "whole spectra: the noiseless row and 20 draws"
    assert forward_rows_candidates("cuda", 20) == (336, 672, 1344, 2688)
    assert forward_rows_candidates("cpu", 0) == (32, 64, 128, 256)
    assert forward_rows_candidates("cpu", 300) == (301,), "one spectrum's rows even above the limit"
    assert (default_forward_rows("cpu", 20), default_forward_rows("cpu", 0), default_forward_rows("cuda", 20)) == (
        84, 64, 336)


class TimedModel:
    """A model whose predict call costs 50 ms plus 1 ms per spectrum: bigger forward passes give more spectra/s."""

    grid = "apogee"
    grid_spec = GRID_SPECS["apogee"]
    max_batch = 1
    device = "cpu"

    def __init__(self, name: str) -> None:
        self.weights_sha256 = name  # the key of its shared measurement

    def predict(self, flux: np.ndarray, error: np.ndarray, draws: int, seeds: np.ndarray, noise_on_grid: bool) -> None:
        assert flux.shape == error.shape and len(seeds) == len(flux) and self.max_batch == len(flux) * (draws + 1)
        time.sleep(0.05 + 0.001 * len(flux))


def test_rows_are_chosen_by_measured_throughput(monkeypatch: pytest.MonkeyPatch, conformance_dir: Path) -> None:
    model = TimedModel("timed")
    rows, measurements = choose_forward_rows(model, 3, (8, 16, 32))
    assert rows == 32 == model.max_batch and [m.spectra for m in measurements] == [2, 4, 8]
    monkeypatch.setattr(device_module, "ROWS_MARGIN", 100.0)  # a larger batch must be 100x faster: keep the smallest
    assert choose_forward_rows(model, 3, (8, 16, 32))[0] == 8
    monkeypatch.setattr(TimedModel, "predict", lambda *args, **kwargs: pytest.fail("measured twice"))
    shared = choose_forward_rows(TimedModel("timed"), 3, (8, 16, 32))[1]
    assert shared == measurements, "another process reads the machine's first measurement"

    from catalogbuilder.models.registry import load_model

    for model_dir in ("apogee_small", "boss_small"):  # the optical model measures with noise drawn on its grid
        real = load_model(conformance_dir / model_dir, convolution="direct")
        rows, measurements = choose_forward_rows(real, 2, (3, 6))
        assert rows in (3, 6) and real.max_batch == rows and all(m.spectra_per_second > 0 for m in measurements)


def test_small_runs_are_cut_into_tasks_that_end_together() -> None:
    assert [balanced_task_size(pending, slots) for pending, slots in ((20, 2), (80, 2), (7, 1), (1000, 2), (5, 4))] \
        == [10, 20, 7, 250, 2]


def test_stages_without_a_network_start_cpu_workers_on_a_gpu_machine(fake_gpu_machine: list[dict], tmp_path: Path,
                                                                     capsys) -> None:
    """Reading FITS files needs cores, not GPUs: `ingest` (and the other CPU stages) start one worker per core on a
    GPU machine unless --device asks for GPU workers."""
    sample = sorted((Path(__file__).resolve().parents[1] / "catalogbuilder/data/sample/boss").glob("spec-*.fits"))
    store = tmp_path / "store"
    assert catalogbuilder_main(["ingest", "--store", str(store), "--workers", "1", "--no-progress", *map(str, sample)]) == 0
    assert fake_gpu_machine == [], "no LocalCUDACluster for an ingest"
    assert "added 2 spectra" in capsys.readouterr().out
