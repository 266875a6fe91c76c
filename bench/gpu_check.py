"""GPU check of the inference path (run by ``bench/gpu_check.sh``; about 3 minutes on one H100/H200-class GPU).

Prints:

1. the device, and its measured dense matmul peak (TFLOP/s) in float32 (IEEE), TF32 and bfloat16;
2. for the full-size APOGEE Net III (official architecture, random weights in the official format) at 20 draws, for
   torch's convolutions (cuDNN) and the FFT form, each in float32 / TF32 / bf16: the forward rows the workers would
   choose (measured), spectra/s of ``model.predict`` over real apStar spectra, achieved TFLOP/s counting 2.25 GFLOP
   per forward (the direct convolutions' count, also for the FFT form, which does fewer operations), that as a
   fraction of the measured peak of the same precision, and the largest deviation from the CPU float32 result
   (torch's CPU convolutions) on the same spectra and seeds, relative to max(1, |value|);
3. the drift of each precision on the conformance configs (../shared/conformance): largest deviation of the
   predictions from the reference's, and from this device's float32;
4. the whole ``catalogbuilder infer`` command on a store of real apStar copies with no cluster option (a
   LocalCUDACluster where dask-cuda and GPUs are there): spectra/s end to end and the hours for DR19's 3.7 M spectra.

``--dry-run`` runs every step on the CPU with the small conformance architecture and a few spectra, so the script is
exercised where no GPU is lent (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference as bench_inference  # noqa: E402 - bench/inference.py: store and model builders

DR19_APOGEE_SPECTRA = 3_700_000
OUTPUTS = ("teff", "logg", "fe_h")
CONVOLUTIONS = ("direct", "fft")


def matmul_peak(device: str, precision: str, size: int, repeats: int = 5) -> float:
    """Dense matmul TFLOP/s of a size × size product in ``precision`` (best of ``repeats``)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        best = min(_seconds(lambda: a @ b, device) for _ in range(repeats + 1))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * size**3 / best / 1e12


def _seconds(function, device: str) -> float:  # noqa: ANN001 - a no-argument callable
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def real_spectra(n_spectra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flux, error, seeds) of ``n_spectra`` rows cycling over the real spectra of the benchmark apStar file."""
    from catalogbuilder.models.montecarlo import spectrum_seed
    from catalogbuilder.readers import read_spectra

    spectra = [s for s in read_spectra(bench_inference.find_apstar()) if np.nanmax(np.abs(s.flux)) > 0]
    chosen = list(itertools.islice(itertools.cycle(spectra), n_spectra))
    flux = np.stack([s.flux for s in chosen]).astype(np.float32)
    error = np.stack([s.error for s in chosen]).astype(np.float32)
    return flux, error, np.array([spectrum_seed(f"gpu-check-{i}", 0) for i in range(n_spectra)])


def predict_values(model, flux: np.ndarray, error: np.ndarray, seeds: np.ndarray, draws: int) -> np.ndarray:
    """(spectra, outputs) medians of ``model.predict``."""
    result = model.predict(flux, error, draws=draws, seeds=seeds)
    return np.stack([result[name] for name in OUTPUTS], axis=1)


def relative_deviation(values: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(values - reference) / np.maximum(1.0, np.abs(reference))))


def throughput_table(model_dir: Path, device: str, n_spectra: int, n_reference: int, draws: int,
                     flops: float, peaks: dict[str, float]) -> None:
    """Section 2: every convolution × precision on ``n_spectra`` real spectra."""
    from catalogbuilder.inference.device import (PRECISIONS, choose_forward_rows, forward_rows_candidates,
                                                 precision_options)
    from catalogbuilder.models.registry import load_model

    flux, error, seeds = real_spectra(n_spectra)
    began = time.perf_counter()
    cpu = load_model(model_dir, device="cpu", convolution="direct")
    references: dict[int, np.ndarray] = {}

    def reference(rows: int) -> np.ndarray:
        """The CPU float32 values with ``rows`` rows per forward pass: torch's CPU matmuls round differently for
        different row counts (~1e-7), which is not a deviation of the device or the precision under test."""
        if rows not in references:
            cpu.max_batch = rows
            references[rows] = predict_values(cpu, flux[:n_reference], error[:n_reference], seeds[:n_reference],
                                              draws)
        return references[rows]

    reference(cpu.max_batch)
    print(f"CPU float32 reference: {n_reference} spectra in {time.perf_counter() - began:.1f} s")
    print(f"{'convolution':<12}{'precision':<10}{'rows':>6}{'spectra/s':>11}{'TFLOP/s':>9}{'of peak':>9}"
          f"{'vs CPU fp32':>13}")
    for precision, convolution in itertools.product(PRECISIONS, CONVOLUTIONS):
        model = load_model(model_dir, device=device, convolution=convolution, **precision_options(precision))
        rows, _ = choose_forward_rows(model, draws, forward_rows_candidates(device, draws))
        warm = max(1, rows // max(draws, 1))
        predict_values(model, flux[:warm], error[:warm], seeds[:warm], draws)
        seconds = _seconds(functools.partial(predict_values, model, flux, error, seeds, draws), device)
        deviation = relative_deviation(predict_values(model, flux[:n_reference], error[:n_reference],
                                                      seeds[:n_reference], draws), reference(rows))
        rate = n_spectra / seconds
        tflops = rate * draws * flops / 1e12
        print(f"{convolution:<12}{precision:<10}{rows:>6}{rate:>11.1f}{tflops:>9.2f}{tflops / peaks[precision]:>9.1%}"
              f"{deviation:>13.1e}")
        del model  # (each model sets the process's TF32 switches for its precision when it is loaded)
        if device == "cuda":
            torch.cuda.empty_cache()


def conformance_drift(conformance_dir: Path, device: str) -> None:
    """Section 3: per conformance config and precision, deviation from the reference and from float32 here."""
    from catalogbuilder.inference.device import PRECISIONS, precision_options
    from catalogbuilder.models.registry import load_model

    print(f"{'config':<14}{'precision':<10}{'vs reference':>14}{'vs float32':>12}")
    for config_dir in sorted(path.parent for path in conformance_dir.glob("*/vectors.npz")):
        vectors = np.load(config_dir / "vectors.npz")
        model_input = torch.from_numpy(vectors["model_input"])
        float32 = None
        for precision in PRECISIONS:
            model = load_model(config_dir, device=device, **precision_options(precision))
            predictions = model.forward_labels(model_input).cpu().numpy().astype(np.float64)
            float32 = predictions if float32 is None else float32
            print(f"{config_dir.name:<14}{precision:<10}{relative_deviation(predictions, vectors['predictions']):>14.1e}"
                  f"{relative_deviation(predictions, float32):>12.1e}")


def end_to_end(model_dir: Path, workdir: Path, n_spectra: int, device: str, draws: int) -> None:
    """Section 4: the whole command with no cluster option (``--device auto``; ``cpu`` for the dry run)."""
    store = bench_inference.build_store(workdir, n_spectra)
    options = ["--draws", str(draws), "--device", "auto" if device == "cuda" else "cpu"]
    options += ["--workers", "1"] if device == "cpu" else []
    command = [sys.executable, "-m", "catalogbuilder.cli", "infer", "--store", str(store), "--model", str(model_dir),
               "--no-progress", *options]
    seconds = _seconds(lambda: subprocess.run(command, check=True, capture_output=True), device)
    rate = n_spectra / seconds
    print(f"catalogbuilder infer {' '.join(options)}: {n_spectra} spectra in {seconds:.1f} s = {rate:.1f} spectra/s "
          f"end to end; DR19 APOGEE ({DR19_APOGEE_SPECTRA / 1e6:.1f} M spectra): "
          f"{DR19_APOGEE_SPECTRA / rate / 3600:.1f} h at this rate (goal: under 1 h, >= 1030 spectra/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small architecture, few spectra")
    parser.add_argument("--spectra", type=int, default=None, help="spectra per throughput measurement")
    parser.add_argument("--end-to-end-spectra", type=int, default=None, help="spectra of the whole-command run")
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()

    from catalogbuilder.models.bossnet import BossNet, BossNetConfig

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --dry-run to exercise the script on a CPU)")
    n_spectra = args.spectra or (8 if args.dry_run else 2048)
    n_end_to_end = args.end_to_end_spectra or (10 if args.dry_run else 8192)
    conformance_dir = bench_inference.SHARED / "conformance"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads), dry run"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    size = 1024 if args.dry_run else 8192
    peaks = {precision: matmul_peak(device, precision, size) for precision in ("float32", "tf32", "bf16")}
    print("matmul peak (TFLOP/s): " + ", ".join(f"{p} {value:.1f}" for p, value in peaks.items()))

    workdir = Path(tempfile.mkdtemp(prefix="catalogbuilder-gpu-check-"))
    try:
        if args.dry_run:
            model_dir = Path(shutil.copytree(conformance_dir / "apogee_small", workdir / "model"))
        else:
            model_dir = bench_inference.full_size_model(workdir / "model")
        network = BossNet(BossNetConfig.from_yaml(model_dir))
        flops = bench_inference.flops_per_forward(network, 8575)
        architecture = "conformance apogee_small" if args.dry_run else "full-size APOGEE Net III, random weights"
        print(f"model: {architecture}, {flops / 1e9:.3f} GFLOP per forward, {args.draws} draws")
        throughput_table(model_dir, device, n_spectra, min(8, n_spectra), args.draws, flops, peaks)
        if conformance_dir.is_dir():
            conformance_drift(conformance_dir, device)
        else:
            print(f"conformance drift: {conformance_dir} not found, skipped")
        end_to_end(model_dir, workdir / "end_to_end", n_end_to_end, device, args.draws)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
