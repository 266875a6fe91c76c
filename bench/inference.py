"""Benchmark: spectra/s of the Dask-batched inference path against an Astra-style loop, same weights, same machine.

The Astra-style loop predicts one spectrum per forward pass and then one forward pass of that spectrum's Monte-Carlo
draws, spectrum after spectrum (arrays already in memory, so the loop is not charged for any I/O). The Dask path is
``catalogbuilder.inference.graph.run_inference`` on a spectrum store: reading, batching, Monte-Carlo, writing results.

Input spectra are real: copies of the apStar file ``apStar-dr17-2M17335483-2753043.fits`` (5 spectra each) differing
only by one header card, so each copy has its own checksum and its spectra their own ids. Both paths use the same
per-spectrum seeds, so they compute the same numbers; the largest difference is printed as a check.

CPU (default): the conformance ``apogee_small`` weights::

    python bench/inference.py --spectra 200 --workers 2

GPU, the official APOGEE Net III architecture with random weights (≈2.2 GFLOP per forward)::

    python bench/inference.py --full-size --device cuda --spectra 4000
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
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


def find_apstar() -> Path:
    """The real apStar file: ../shared/data/apogee, else the shipped sample."""
    for folder in (SHARED / "data" / "apogee", REPO / "catalogbuilder" / "data" / "sample" / "apogee"):
        if (folder / APSTAR_NAME).is_file():
            return folder / APSTAR_NAME
    raise FileNotFoundError(f"{APSTAR_NAME} not found in ../shared/data/apogee or the shipped sample")


def build_store(directory: Path, n_spectra: int) -> Path:
    """A spectrum store of at least ``n_spectra`` real spectra from header-tagged copies of the apStar file."""
    from astropy.io import fits

    from catalogbuilder.store.spectra import SpectrumStore

    source = find_apstar()
    copies = directory / "fits"
    copies.mkdir(parents=True)
    for index in range(math.ceil(n_spectra / SPECTRA_PER_COPY)):
        with fits.open(source) as hdul:
            hdul[0].header["CBBENCH"] = (index, "catalogbuilder benchmark copy")
            hdul.writeto(copies / f"apStar-bench-{index:05d}.fits")
    store = directory / "store"
    report = SpectrumStore.open(store).ingest(sorted(copies.iterdir()), progress=False)
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
    """Floating-point operations of one forward pass of one spectrum (torch's FLOP counter, CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    network = network.to("cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, n_pixels))
    return float(counter.get_total_flops())


def astra_style_loop(model, flux: np.ndarray, error: np.ndarray, seeds: list[int], draws: int) -> tuple[float, np.ndarray]:
    """One forward per spectrum, then one forward of its ``draws`` noisy copies; returns (seconds, median logTeff)."""
    from catalogbuilder.models.montecarlo import cap_errors

    device = model.device
    medians = np.empty(len(flux))
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronise()
    began = time.perf_counter()
    for index in range(len(flux)):
        spectrum = torch.from_numpy(flux[index : index + 1]).to(device)
        model.predict_labels(spectrum)  # the noiseless prediction Astra also makes
        capped = cap_errors(spectrum, torch.from_numpy(error[index : index + 1]).to(device))
        generator = torch.Generator(device=device).manual_seed(seeds[index])
        noise = torch.randn((draws, flux.shape[1]), generator=generator, device=device)
        labels = model.predict_labels(spectrum + capped * noise)
        medians[index] = torch.quantile(labels[:, model.labels.index("logTeff")].double(), 0.5).item()
    synchronise()
    return time.perf_counter() - began, medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spectra", type=int, default=200, help="spectra in the benchmark store")
    parser.add_argument("--loop-spectra", type=int, default=None, help="spectra timed in the loop (default: all)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="Dask workers (CPU: one thread each; loop uses as many)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default=str(SHARED / "conformance" / "apogee_small"), help="model directory")
    parser.add_argument("--full-size", action="store_true", help="official architecture, random weights")
    parser.add_argument("--batch-size", type=int, default=None, help="spectra per model call (default: graph's)")
    parser.add_argument("--max-batch", type=int, default=None, help="rows per forward pass (default: graph's)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from catalogbuilder.cluster import GPU_RESOURCE
    from catalogbuilder.inference.graph import DEFAULT_BATCH_SIZE, as_str_array, run_inference
    from catalogbuilder.models.montecarlo import spectrum_seed
    from catalogbuilder.models.registry import load_model
    from catalogbuilder.store.spectra import SpectrumStore

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    workdir = Path(tempfile.mkdtemp(prefix="catalogbuilder-bench-"))
    try:
        model_dir = full_size_model(workdir / "full_size") if args.full_size else Path(args.model)
        store = build_store(workdir, args.spectra)
        batch_size = args.batch_size or DEFAULT_BATCH_SIZE

        resources = {GPU_RESOURCE: 1} if args.device == "cuda" else None
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          resources=resources) as cluster, Client(cluster) as client:
            cold = run_inference(client, store, model_dir, draws=args.draws, batch_size=batch_size,
                                 device=args.device, max_batch=args.max_batch, progress=False)
            shutil.rmtree(store / "results")
            warm = run_inference(client, store, model_dir, draws=args.draws, batch_size=batch_size,
                                 device=args.device, max_batch=args.max_batch, progress=False)
        assert warm.n_ok + warm.n_no_result == warm.n_spectra, "every spectrum must get a row"
        from catalogbuilder.inference.results import ResultsStore

        ours = ResultsStore.for_store(store).read().set_index("spectrum_id")

        torch.set_num_threads(args.workers if args.device == "cpu" else 1)
        model = load_model(model_dir, device=args.device)
        dataset = SpectrumStore.open(store).dataset(model.grid)
        n_loop = min(args.loop_spectra or warm.n_spectra, warm.n_spectra)
        ids = as_str_array(dataset["spectrum_id"].values[:n_loop])
        flux = np.asarray(dataset["flux"].values[:n_loop], dtype=np.float32)
        error = np.asarray(dataset["error"].values[:n_loop], dtype=np.float32)
        seeds = [spectrum_seed(spectrum_id, 0) for spectrum_id in ids]
        astra_style_loop(model, flux[:2], error[:2], seeds[:2], args.draws)  # warm-up (allocator, kernels)
        loop_seconds, loop_logteff = astra_style_loop(model, flux, error, seeds, args.draws)
        agreement = np.nanmax(np.abs(loop_logteff - ours.loc[ids, "logteff"].to_numpy()))
        flops = flops_per_forward(model.network, flux.shape[1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    loop_rate = n_loop / loop_seconds
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.workers} core(s)"
    print(f"model {model.name} ({'official architecture, random weights' if args.full_size else model_dir}), "
          f"{flops / 1e9:.3f} GFLOP per forward; {args.draws} draws; device {device_name}")
    header = f"{'path':<52}{'spectra':>9}{'seconds':>10}{'spectra/s':>12}{'TFLOP/s':>10}{'vs loop':>9}"
    print(header)
    print("-" * len(header))
    rows = [
        (f"Astra-style loop (1 + 1x{args.draws} forwards/spectrum)", n_loop, loop_seconds,
         (1 + args.draws) if args.draws else 1),
        (f"Dask batched, cold (incl. model load, {args.workers} worker(s))", cold.n_computed, cold.seconds,
         max(args.draws, 1)),
        (f"Dask batched, warm (model cached, {args.workers} worker(s))", warm.n_computed, warm.seconds,
         max(args.draws, 1)),
    ]
    for label, count, seconds, forwards in rows:
        rate = count / seconds
        tflops = rate * forwards * flops / 1e12
        print(f"{label:<52}{count:>9}{seconds:>10.2f}{rate:>12.1f}{tflops:>10.4f}{rate / loop_rate:>8.1f}x")
    print(f"check: max |logteff(loop) - logteff(Dask)| = {agreement:.2e} dex (same seeds, same weights)")


if __name__ == "__main__":
    main()
