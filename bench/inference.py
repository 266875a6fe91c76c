"""Benchmark: the whole ``catalogbuilder infer`` command against an Astra-style per-spectrum loop, same machine, same
spectra, same weights, same per-spectrum seeds; interleaved, median of ``--repeats`` runs each.

* command: ``catalogbuilder infer --store S --model M --workers W --device D`` as a subprocess, timed from start to
  exit: Python start-up, cluster start-up, model loading and convolution selection on every worker, reading the
  store, Monte-Carlo inference, writing the results. Its results are then deleted for the next run. Each run gets an
  empty folder for the machine's shared speed measurements, so each measures its convolution choices as a first run
  on a new machine would (``--reuse-measurements``: later runs on a machine read them instead).
* loop: the way a user runs the reference model today, in this process, timed over the spectra only (model loaded and
  spectra already in memory: nothing of its I/O or start-up is charged): the BossNet network with torch's own
  ``Conv1d`` (the FFT form switched off, so the loop is the reference network as published), with ``W`` torch
  threads, one spectrum at a time: a forward pass of the noiseless spectrum (the reference makes it), then one forward
  pass of its ``--draws`` noisy copies (flux + capped error × N(0, 1) from the spectrum's own seed, as the command
  draws them); value = median of the draws.

Both compute the same numbers; the largest difference between them is printed (float32 rounding of different
convolution algorithms and batch shapes, well within the conformance tolerance 1e-4 × max(1, |value|)).

Input spectra are real: copies of the apStar file ``apStar-dr17-2M17335483-2753043.fits`` (5 spectra each) differing
only by one header card, so each copy has its own checksum and its spectra their own ids.

Full-size APOGEE Net III (official architecture, random weights in the official format, 2.25 GFLOP per forward) on
the 2 CPU cores of a development machine::

    python bench/inference.py --full-size --spectra 80 --workers 2 --repeats 3

``--conv-table`` also prints, per convolution layer of the model at one spectrum's draws per forward pass, torch's
convolution vs the FFT form (seconds — "≥" where torch's was not timed, being slower even at the device's matmul
rate — speed-up, deviation) and both whole forward passes.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CATALOGBUILDER_SHARED", REPO.parent / "shared"))
APSTAR_NAME = "apStar-dr17-2M17335483-2753043.fits"
SPECTRA_PER_COPY = 5
OFFICIAL_APOGEE = {"in_channels": 1, "model_dim": 4, "dim_mults": [1, 2, 4, 8, 16], "kernel_size": 30, "num_targets": 3,
                   "adapt_pool_output_dim": 1024, "num_linear": 6, "linear_dim": 1024, "pos_enc": True}
COMPARED = ("logteff", "logg", "fe_h")


def find_apstar() -> Path:
    """The real apStar file: ../shared/data/apogee, else the shipped sample."""
    for folder in (SHARED / "data" / "apogee", REPO / "catalogbuilder" / "data" / "sample" / "apogee"):
        if (folder / APSTAR_NAME).is_file():
            return folder / APSTAR_NAME
    raise FileNotFoundError(f"{APSTAR_NAME} not found in ../shared/data/apogee or the shipped sample")


def build_store(directory: Path, n_spectra: int) -> Path:
    """A spectrum store of at least ``n_spectra`` real spectra from copies of the apStar file, each made a new star
    (the ingest treats copies of one star's file as reductions of one product: only the newest would be active)."""
    from astropy.io import fits

    from catalogbuilder.store import SpectrumStore

    source = find_apstar()
    copies = directory / "fits"
    copies.mkdir(parents=True)
    for index in range(math.ceil(n_spectra / SPECTRA_PER_COPY)):
        with fits.open(source) as hdul:
            hdul[0].header["CBBENCH"] = (index, "catalogbuilder benchmark copy")
            hdul[0].header["OBJID"] = f"2M9{index:07d}+0000000"  # a star of its own: copies of one star supersede
            hdul.writeto(copies / f"apStar-bench-{index:05d}.fits")
    store = directory / "store"
    report = SpectrumStore.open(store, create=True).ingest(sorted(copies.iterdir()), progress=False)
    print(f"store: {report.added['apogee']} spectra from {report.files_added} files in {report.seconds:.1f} s")
    shutil.rmtree(copies)
    return store


def full_size_model(directory: Path, seed: int = 0) -> Path:
    """The official APOGEE Net III architecture with random weights, saved in the official chunked format."""
    from catalogbuilder.models.bossnet import BossNet, BossNetConfig
    from catalogbuilder.models.weights import save_state_dict

    torch.manual_seed(seed)
    config = BossNetConfig.from_dict(OFFICIAL_APOGEE)
    directory.mkdir(parents=True)
    config.to_yaml(directory)
    save_state_dict(BossNet(config).eval().state_dict(), directory)
    return directory


def flops_per_forward(network: torch.nn.Module, n_pixels: int) -> float:
    """Floating-point operations of one forward pass of one spectrum (torch's FLOP counter, direct convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from catalogbuilder.models.convolution import set_convolution_mode

    set_convolution_mode(network, "direct")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, n_pixels, device=next(network.parameters()).device))
    return float(counter.get_total_flops())


def run_command(store: Path, model_dir: Path, args: argparse.Namespace, measurements: Path | None) -> float:
    """Wall seconds of one whole ``catalogbuilder infer`` run (a fresh process and cluster); ``measurements``: an
    empty folder for its shared speed measurements, so it measures its convolution choices like a first run on a new
    machine (None: the user's cache, as later runs on a machine do)."""
    from catalogbuilder.models.measurements import CACHE_ENV

    command = [sys.executable, "-m", "catalogbuilder.cli", "infer", "--store", str(store), "--model", str(model_dir),
               "--draws", str(args.draws), "--seed", "0", "--workers", str(args.workers), "--device", args.device,
               "--no-progress"]
    began = time.perf_counter()
    environment = {**os.environ, **({CACHE_ENV: str(measurements)} if measurements else {})}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - began
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stdout}\n{finished.stderr}")
    print(f"  command: {seconds:7.2f} s   {finished.stdout.strip().splitlines()[-1]}")
    return seconds


def astra_style_loop(model, flux: np.ndarray, error: np.ndarray, seeds: list[int], draws: int) -> tuple[float, np.ndarray]:
    """Per spectrum a noiseless forward pass, then one of its ``draws`` noisy copies; returns (seconds, medians of
    :data:`COMPARED` per spectrum)."""
    from catalogbuilder.models.montecarlo import canonical_outputs, cap_errors

    device = model.device
    medians = np.empty((len(flux), len(COMPARED)))
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronise()
    began = time.perf_counter()
    for index in range(len(flux)):
        spectrum = torch.from_numpy(flux[index : index + 1]).to(device)
        model.predict_labels(spectrum)  # the noiseless prediction Astra also makes
        capped = cap_errors(spectrum, torch.from_numpy(error[index : index + 1]).to(device))
        generator = torch.Generator(device=device).manual_seed(seeds[index])
        noise = torch.randn((draws, flux.shape[1]), generator=generator, device=device)
        labels = model.predict_labels(spectrum + capped * noise).double()
        median = labels.median(dim=0, keepdim=True).values.cpu().numpy()  # torch.median (the lower middle), as Astra
        outputs = canonical_outputs(model.labels, median, np.zeros_like(median))
        medians[index] = [outputs[name][0] for name in COMPARED]
    synchronise()
    return time.perf_counter() - began, medians


def convolution_table(model_dir: Path, rows: int, device: str) -> None:
    """Per layer: torch's convolution vs the FFT form at ``rows`` rows, on one thread on CPU (as a CPU worker runs
    them); then both whole forward passes."""
    from catalogbuilder.models.registry import load_model

    from catalogbuilder.models.measurements import CACHE_ENV

    threads, cache = torch.get_num_threads(), os.environ.get(CACHE_ENV)
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as fresh:  # measured here, not read from this machine's cache
            os.environ[CACHE_ENV] = fresh
            _convolution_table(load_model(model_dir, device=device, convolution="auto"), rows, device)
    finally:
        torch.set_num_threads(threads)
        if cache is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = cache


def _convolution_table(model, rows: int, device: str) -> None:  # noqa: ANN001 - a BossNetModel
    from catalogbuilder.constants import grid_wavelength
    from catalogbuilder.models.convolution import convolution_choices, forget_convolution_choices, set_convolution_mode

    x = torch.randn(rows, len(grid_wavelength(model.grid)), device=device)
    forget_convolution_choices()
    with torch.inference_mode():
        model.network(x)
    print(f"convolutions at {rows} rows (threads: {torch.get_num_threads()}):")
    print(f"  {'in':>4} {'out':>4} {'k':>3} {'pad':>4} {'length':>7} {'direct ms':>10} {'fft ms':>8} {'speed-up':>9} "
          f"{'deviation':>10}  chosen")
    for key, choice in convolution_choices().items():
        n_in, n_out, kernel, _, padding, length = key[3:9]
        direct = f"{'' if choice.direct_timed else '≥'}{1e3 * choice.direct_seconds:.1f}"  # ≥: the matmul-rate bound
        print(f"  {n_in:>4} {n_out:>4} {kernel:>3} {padding:>4} {length:>7} {direct:>10} "
              f"{1e3 * choice.fft_seconds:>8.1f} {choice.speedup:>8.2f}x {choice.deviation:>10.1e}  "
              f"{choice.implementation}")
    seconds = {}
    with torch.inference_mode():
        for mode in ("direct", "auto"):
            set_convolution_mode(model.network, mode)
            model.network(x)
            seconds[mode] = min(_timed_forward(model.network, x) for _ in range(3))
    print(f"  whole forward: direct {seconds['direct']:.3f} s, chosen {seconds['auto']:.3f} s "
          f"({seconds['direct'] / seconds['auto']:.2f}x)")


def _timed_forward(network: torch.nn.Module, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    network(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spectra", type=int, default=80, help="spectra in the benchmark store")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="command: Dask workers; loop: torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; medians compared")
    parser.add_argument("--model", default=str(SHARED / "conformance" / "apogee_small"), help="model directory")
    parser.add_argument("--full-size", action="store_true", help="official APOGEE Net III architecture, random weights")
    parser.add_argument("--conv-table", action="store_true", help="print per-layer convolution timings")
    parser.add_argument("--reuse-measurements", action="store_true",
                        help="let the command runs use this machine's shared convolution choices (default: every run "
                        "measures them afresh, as a first run on a new machine)")
    args = parser.parse_args()

    from catalogbuilder.models.montecarlo import spectrum_seed
    from catalogbuilder.models.registry import load_model
    from catalogbuilder.store import SpectrumStore
    from catalogbuilder.store.handle import predicted

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    workdir = Path(tempfile.mkdtemp(prefix="catalogbuilder-bench-"))
    try:
        model_dir = full_size_model(workdir / "full_size") if args.full_size else Path(args.model)
        store = build_store(workdir, args.spectra)
        torch.set_num_threads(args.workers if args.device == "cpu" else 1)
        if args.conv_table:
            convolution_table(model_dir, max(args.draws, 1), args.device)
        model = load_model(model_dir, device=args.device, convolution="direct", inference_forms=False)  # as published
        opened = SpectrumStore.open(store)
        columns = opened.columns(model.grid, ("spectrum_id", "kind"))
        positions = np.flatnonzero(predicted(columns["kind"]))  # what infer predicts (not apStar row 1)
        ids = columns["spectrum_id"].to_numpy(str)[positions]
        pixels = opened.pixels(model.grid, positions)
        flux, error = pixels["flux"].astype(np.float32), pixels["error"].astype(np.float32)
        seeds = [spectrum_seed(spectrum_id, 0) for spectrum_id in ids]
        astra_style_loop(model, flux[:1], error[:1], seeds[:1], args.draws)  # warm-up (allocator, kernels)

        command_seconds, loop_seconds = [], []
        for repeat in range(args.repeats):
            print(f"round {repeat + 1}/{args.repeats}")
            shutil.rmtree(store / "results", ignore_errors=True)
            fresh = None if args.reuse_measurements else workdir / f"measurements-{repeat}"
            command_seconds.append(run_command(store, model_dir, args, fresh))
            seconds, loop_values = astra_style_loop(model, flux, error, seeds, args.draws)
            loop_seconds.append(seconds)
            print(f"  loop:    {seconds:7.2f} s   {len(ids) / seconds:.2f} spectra/s")
        ours = SpectrumStore.open(store).results.read(model.name).set_index("spectrum_id").loc[ids, list(COMPARED)]
        ours = ours.to_numpy()
        deviation = np.nanmax(np.abs(ours - loop_values) / np.maximum(1.0, np.abs(loop_values)), axis=0)
        flops = flops_per_forward(model.network, flux.shape[1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    n_spectra = len(ids)
    command_rate = n_spectra / statistics.median(command_seconds)
    loop_rate = n_spectra / statistics.median(loop_seconds)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.workers} core(s)"
    architecture = "official APOGEE Net III architecture, random weights" if args.full_size else model_dir
    print(f"model {model.name} ({architecture}), "
          f"{flops / 1e9:.3f} GFLOP per forward; {args.draws} draws; {n_spectra} real apStar spectra; {device_name}")
    header = f"{'path':<62}{'median s':>10}{'spectra/s':>11}{'TFLOP/s':>9}"
    print(header)
    print("-" * len(header))
    for label, seconds, rate, forwards in (
        (f"catalogbuilder infer, whole command ({args.workers} worker(s))", statistics.median(command_seconds),
         command_rate, max(args.draws, 1)),
        (f"Astra-style loop, torch Conv1d (1 + {args.draws} rows/spectrum, {args.workers} thread(s))",
         statistics.median(loop_seconds), loop_rate, 1 + args.draws),
    ):
        print(f"{label:<62}{seconds:>10.2f}{rate:>11.2f}{rate * forwards * flops / 1e12:>9.4f}")
    print(f"ratio command / loop: {command_rate / loop_rate:.2f}x (medians of {args.repeats} interleaved runs each)")
    print("check: max |command - loop| / max(1, |loop|) = "
          + ", ".join(f"{name} {value:.1e}" for name, value in zip(COMPARED, deviation)) + " (same seeds)")


if __name__ == "__main__":
    main()
