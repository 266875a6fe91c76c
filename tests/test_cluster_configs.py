"""Every shipped cluster config renders a valid job script (jobqueue) or a working cluster (local), without
submitting anything; the SLURM runner is exercised with three local processes standing in for srun tasks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from distributed import Client

from catalogbuilder.cluster import connect, local_gpu_cluster, make_cluster
from catalogbuilder.config import ClusterSettings, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cluster_configs"
JOBQUEUE_CONFIGS = {
    # file: (scheduler directive prefix, memory directive, walltime directive, GPU config?)
    "slurm-cpu.yaml": ("#SBATCH", "#SBATCH --mem=64G", "#SBATCH -t 04:00:00", False),
    "slurm-gpu.yaml": ("#SBATCH", "#SBATCH --mem=64G", "#SBATCH -t 04:00:00", True),
    "pbs-gpu.yaml": ("#PBS", "mem=64GB", "#PBS -l walltime=04:00:00", True),
}


def test_every_shipped_config_is_covered() -> None:
    shipped = {path.name for path in CONFIG_DIR.glob("*.yaml")}
    assert shipped == set(JOBQUEUE_CONFIGS) | {"local.yaml", "local-gpu.yaml", "slurm-runner.yaml"}


@pytest.mark.parametrize("name", sorted(JOBQUEUE_CONFIGS))
def test_jobqueue_config_renders_job_script(name: str) -> None:
    prefix, memory, walltime, gpu = JOBQUEUE_CONFIGS[name]
    config = ClusterSettings.load(CONFIG_DIR / name)
    cluster = make_cluster(config)
    try:
        script = cluster.job_script()
        assert len(cluster.workers) == 0, "building the cluster must not submit jobs"
    finally:
        cluster.close()
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    assert any(line.startswith(prefix) for line in lines)
    assert memory in script and walltime in script
    assert f"{prefix} -N catalogbuilder-" in script or f"{prefix} -J catalogbuilder-" in script
    worker_line = lines[-1]
    assert worker_line.startswith(sys.executable)
    assert cluster.scheduler_address.split("://")[1] in worker_line
    if gpu:
        assert "-m dask_cuda.cli " in worker_line
        assert "--resources GPU=1" in worker_line
        assert "--nworkers" not in worker_line, "dask-cuda starts one worker per GPU by itself"
    else:
        assert "-m distributed.cli.dask_worker " in worker_line
        assert "--nworkers 8" in worker_line and "--lifetime 3h50m" in worker_line


def test_slurm_gpu_books_a_gpu_and_cpus() -> None:
    cluster = make_cluster(ClusterSettings.load(CONFIG_DIR / "slurm-gpu.yaml"))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "--nthreads 2" in script


def test_local_config_runs_tasks_and_closes() -> None:
    with connect(cluster=CONFIG_DIR / "local.yaml", workers=1) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        assert [info["nthreads"] for info in workers.values()] == [1]
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert client.status == "closed"


def test_in_process_local_cluster_runs_tasks_in_this_process_without_memory_limit() -> None:
    """``infer``'s local CPU cluster: worker threads of the calling process, one thread each, no per-worker memory
    limit (the shared process's memory would pause every worker); the default local cluster has worker processes."""
    with connect(workers=2, gpu=False, in_process=True) as client:
        workers = client.scheduler_info()["workers"]
        assert [info["nthreads"] for info in workers.values()] == [1, 1]
        assert set(client.run(os.getpid).values()) == {os.getpid()}
        assert set(client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit).values()) == {None}
        assert client.submit(sum, [1, 2, 3]).result() == 6
    with connect(workers=1, gpu=False) as client:
        assert os.getpid() not in set(client.run(os.getpid).values())


def test_local_gpu_falls_back_to_cpu_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # as on a machine without dask-cuda
    with pytest.warns(UserWarning, match="dask-cuda is not installed.*CPU LocalCluster"):
        cluster = local_gpu_cluster(1, **ClusterSettings.load(CONFIG_DIR / "local-gpu.yaml").options)
    with cluster, Client(cluster) as client:
        (info,) = client.scheduler_info()["workers"].values()
        assert not info.get("resources"), "a CPU fallback worker must not advertise a GPU"
        assert client.submit(pow, 2, 5).result() == 32


def test_runner_config_options() -> None:
    config = ClusterSettings.load(CONFIG_DIR / "slurm-runner.yaml")
    assert config.kind == "slurm-runner"
    assert config.options["scheduler_file"] == "scheduler-{job_id}.json"
    assert config.options["worker_options"]["resources"] == {"GPU": 1}


def test_runner_outside_slurm_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RuntimeError, match="SLURM_PROCID"), connect(runner="slurm"):
        pass


def test_runner_with_three_srun_like_tasks(tmp_path: Path) -> None:
    """What `srun -n 3 dask-submit workflow.py --cluster slurm-runner.yaml` does, with the three SLURM tasks
    played by local processes: task 0 scheduler, task 1 the workflow, task 2 a worker with the GPU resource."""
    workflow = tmp_path / "count_workers.py"
    workflow.write_text(
        textwrap.dedent(
            """
            def main(client, argv):
                (info,) = client.scheduler_info()["workers"].values()
                total = client.submit(sum, range(int(argv[0]))).result()
                print("RESULT", total, info["resources"], flush=True)
            """
        )
    )
    base_env = {**os.environ, "SLURM_NTASKS": "3", "SLURM_JOB_ID": "4242"}
    command = [sys.executable, "-m", "catalogbuilder.submit", str(workflow), "--cluster",
               str(CONFIG_DIR / "slurm-runner.yaml"), "10"]
    tasks = [
        subprocess.Popen(command, cwd=tmp_path, env={**base_env, "SLURM_PROCID": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(3)
    ]
    try:
        outputs = [task.communicate(timeout=120)[0] for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    client_output = outputs[1]
    assert "RESULT 45 {'GPU': 1}" in client_output, client_output
    assert tasks[1].returncode == 0, client_output
    assert "Scheduler at" in outputs[0] and "Start worker" in outputs[2]
    assert not (tmp_path / "scheduler-4242.json").exists(), "the scheduler removes its file when it closes"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"catalogbuilder": {"kind": "kubernetes"}}, "catalogbuilder.kind: got 'kubernetes'; allowed: one of local,"),
        ({"catalogbuilder": {"kind": "slurm"}}, "jobqueue.slurm: got None; allowed: keyword arguments of"),
        ({"jobqueue": {"slurm": {"cores": 4}}, "catalogbuilder": {"kind": "slurm"}}, "including cores and memory"),
        ({"catalogbuilder": {"kind": "local", "scale": 2, "adapt": {"maximum": 3}}}, "either scale or adapt, not both"),
        ({"catalogbuilder": {"kind": "local", "adapt": {"max": 3}}},
         "catalogbuilder.adapt.max: unknown key; allowed keys here: minimum, maximum"),
        ({"catalogbuilder": {"kind": "local", "workers": 3}}, "catalogbuilder.workers: unknown key"),
        (["not", "a", "mapping"], "(whole file): got ['not', 'a', 'mapping']; allowed: mapping with keys"),
    ],
)
def test_bad_config_is_a_clear_error(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        ClusterSettings.parse(document, "cluster.yaml")
    assert str(error.value).startswith("cluster.yaml: ") and message in str(error.value)


def test_unknown_jobqueue_option_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"jobqueue": {"slurm": {"cores": 2, "memory": "4GiB", "wallclock": "1:00:00"}}}))
    config = ClusterSettings.load(path)
    assert config.kind == "slurm", "a single jobqueue section names the kind"
    with pytest.raises(ConfigError, match="wallclock"):
        make_cluster(config)


def test_dask_style_keys_and_job_name(tmp_path: Path) -> None:
    path = tmp_path / "dashed.yaml"
    path.write_text(
        yaml.safe_dump(
            {"jobqueue": {"slurm": {"name": "nightly", "cores": 2, "memory": "4GiB", "job-extra-directives": ["-C gpu"]}}}
        )
    )
    cluster = make_cluster(ClusterSettings.load(path))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -J nightly" in script and "#SBATCH -C gpu" in script


def test_local_scale_from_config(tmp_path: Path) -> None:
    path = tmp_path / "scaled.yaml"
    path.write_text(yaml.safe_dump({"catalogbuilder": {"kind": "local", "options": {"n_workers": 0}, "scale": {"jobs": 1},
                                                       "wait_for_workers": 1}}))
    with connect(cluster=path) as client:
        assert len(client.scheduler_info()["workers"]) == 1


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        ClusterSettings.load("no/such/cluster.yaml")
