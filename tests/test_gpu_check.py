"""bench/gpu_check.sh is ready for a GPU machine: its CPU dry run goes through every step (matmul peaks, the
convolution × precision table against the CPU float32 result, the conformance drift per precision, the whole
command end to end, the routing test's collection) with a small model and a few spectra."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step(shared_dir: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "CATALOGBUILDER_SHARED": str(shared_dir)}
    finished = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--spectra", "3",
                               "--draws", "4", "--end-to-end-spectra", "5"],
                              capture_output=True, text=True, env=environment, timeout=600)
    output = finished.stdout
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "device: CPU" in output and re.search(r"matmul peak \(TFLOP/s\): float32 [\d.]+, tf32 [\d.]+, bf16", output)
    table = re.findall(r"^(direct|fft)\s+(float32|tf32|bf16)\s+(\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+%\s+([\d.e+-]+)$",
                       output, flags=re.MULTILINE)
    assert {(convolution, precision) for convolution, precision, *_ in table} == {
        (c, p) for c in ("direct", "fft") for p in ("float32", "tf32", "bf16")}
    deviations = {(c, p): float(deviation) for c, p, _, _, deviation in table}
    assert deviations[("direct", "float32")] == 0.0, "the CPU float32 reference itself"
    assert deviations[("fft", "float32")] < 1e-4 and deviations[("direct", "bf16")] > 0
    drift = re.findall(r"^(apogee_small|boss_small)\s+(float32|tf32|bf16)\s+([\d.e+-]+)\s+([\d.e+-]+)$", output,
                       flags=re.MULTILINE)
    assert len(drift) == 6 and all(float(vs_reference) < 1e-4 for _, p, vs_reference, _ in drift if p == "float32")
    assert re.search(r"5 spectra in [\d.]+ s = [\d.]+ spectra/s end to end; DR19 APOGEE", output)
    assert "1 skipped" in output, "the LocalCUDACluster routing test is collected and skips without a GPU"
