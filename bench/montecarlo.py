"""Benchmark: the cost of the native-pixel Monte-Carlo against the forward passes it feeds.

Inputs are real optical spectra read by the readers: the 10 BOSS and LAMOST inputs of the ``boss_small`` conformance
config (``../shared``), else the shipped BOSS/LAMOST sample files, cycled to ``--spectra``. Two models: the
conformance ``boss_small`` weights and a full-size BOSS Net with random weights in the official shape (checked against
``conformance/official_shapes.json``, ``model_boss``; ≈2.2 GFLOP per forward).

Per model, in one run and interleaved repetition by repetition, ``model.predict(..., draws, native=...)`` is timed with
the network's forward passes timed inside it; the Monte-Carlo cost is the rest (interpolation preparation, noise,
``flux + error × N(0, 1)`` on the native pixels, interpolation, log scaling, de-normalisation, median and std). The
same is printed for noise drawn on the stored grid (``noise_on_grid=True``, the old procedure), and a breakdown of the
native steps. Timings on a shared machine are indicative; the fractions are measured side by side::

    nice -n 10 python bench/montecarlo.py --spectra 10 --full-size-spectra 2 --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CATALOGBUILDER_SHARED", REPO.parent / "shared"))
CATALOG_SPECTRA = 3_700_000  # DR19-era scale (SPEC §8) for the extrapolation


def input_files() -> list[Path]:
    """The real optical files: the boss_small conformance inputs, else the shipped BOSS/LAMOST samples."""
    vectors = SHARED / "conformance" / "boss_small" / "vectors.npz"
    if vectors.is_file():
        names = [str(name).rsplit("[", 1)[0] for name in np.load(vectors)["names"]]
        return [SHARED / "data" / name for name in names]
    sample = REPO / "catalogbuilder" / "data" / "sample"
    return sorted(path for folder in ("boss", "lamost") for path in (sample / folder).rglob("spec-*.fits*"))


def full_size_boss(directory: Path) -> Path:
    """A BOSS Net of the official configuration with random weights, in the official chunked format; its state_dict
    shapes are checked against ``official_shapes.json`` when ../shared is present."""
    from catalogbuilder.models.bossnet import BossNet, BossNetConfig
    from catalogbuilder.models.weights import save_state_dict

    torch.manual_seed(0)
    config = BossNetConfig(model_dim=4, dim_mults=(1, 2, 4, 8, 16), kernel_size=30, num_targets=4,
                           adapt_pool_output_dim=1024, num_linear=6, linear_dim=1024, pos_enc=True)
    network = BossNet(config).eval()
    shapes_file = SHARED / "conformance" / "official_shapes.json"
    if shapes_file.is_file():
        official = json.loads(shapes_file.read_text())["model_boss"]
        assert {key: list(value.shape) for key, value in network.state_dict().items()} == official
    directory.mkdir(parents=True)
    config.to_yaml(directory)
    save_state_dict(network.state_dict(), directory)
    return directory


@contextlib.contextmanager
def forward_timer(model, seconds: list[float]) -> Iterator[None]:
    """Time every forward pass of ``model``'s network into ``seconds`` (appended) while inside the block."""
    forward = model._forward

    def timed(model_input: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        output = forward(model_input)
        seconds.append(time.perf_counter() - began)
        return output

    model._forward = timed
    try:
        yield
    finally:
        model._forward = forward


def timed(function: Callable[[], object]) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def measure(model, flux: np.ndarray, error: np.ndarray, native, seeds: list[int], draws: int,
            repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per path, (total, forward) seconds of ``repeats`` interleaved predict calls."""
    paths = {
        "native pixels": lambda: model.predict(flux, None, draws=draws, seeds=seeds, native=native),
        "stored grid (noise_on_grid)": lambda: model.predict(flux, error, draws=draws, seeds=seeds,
                                                             noise_on_grid=True),
    }
    paths["native pixels"]()  # warm-up: allocator, first-call costs
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            forwards: list[float] = []
            with forward_timer(model, forwards):
                total = timed(run)
            times[name].append((total, sum(forwards)))
    return times


def native_breakdown(native, flux: torch.Tensor, seeds: list[int], draws: int, repeats: int) -> dict[str, float]:
    """Median seconds of each native Monte-Carlo step for the whole batch (what ``monte_carlo_predict`` does)."""
    from catalogbuilder.constants import GRID_OPTICAL, grid_wavelength
    from catalogbuilder.models.montecarlo import GridInterpolation
    from catalogbuilder.models.preprocess import log_scale_flux

    grid = grid_wavelength(GRID_OPTICAL)
    values = torch.from_numpy(native.flux)
    errors = torch.from_numpy(native.error)
    steps: dict[str, list[float]] = {"prepare interpolation": [], "noise N(0,1)": [], "flux + error x noise": [],
                                     "interpolate draws": [], "log scale + clip": []}
    for _ in range(repeats):
        began = time.perf_counter()
        interpolation = GridInterpolation.build(native, grid)
        steps["prepare interpolation"].append(time.perf_counter() - began)
        began = time.perf_counter()
        noise = torch.cat([torch.randn((draws, int(length)), generator=torch.Generator().manual_seed(seed))
                           for seed, length in zip(seeds, native.lengths)], dim=1)
        steps["noise N(0,1)"].append(time.perf_counter() - began)
        began = time.perf_counter()
        noisy = values + errors * noise
        steps["flux + error x noise"].append(time.perf_counter() - began)
        began = time.perf_counter()
        rows = interpolation(noisy).transpose(0, 1).reshape(-1, flux.shape[1])
        steps["interpolate draws"].append(time.perf_counter() - began)
        began = time.perf_counter()
        log_scale_flux(rows)
        steps["log scale + clip"].append(time.perf_counter() - began)
    return {name: statistics.median(seconds) for name, seconds in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spectra", type=int, default=10, help="spectra per predict call, boss_small")
    parser.add_argument("--full-size-spectra", type=int, default=2, help="spectra per predict call, full size")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per path")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows per forward pass (default: the model's, 512; the inference stage uses 32 on CPU)")
    args = parser.parse_args()

    from catalogbuilder.models.montecarlo import NativeSpectra, spectrum_seed
    from catalogbuilder.models.registry import load_model
    from catalogbuilder.readers import read_spectra
    from catalogbuilder.store.resample import to_model_grid

    torch.set_num_threads(args.threads)
    spectra = [spectrum for path in input_files() for spectrum in read_spectra(path)]
    with tempfile.TemporaryDirectory(prefix="catalogbuilder-bench-mc-") as workdir:
        models = {"boss_small": (SHARED / "conformance" / "boss_small", args.spectra),
                  "BOSS Net full size (official shape, random weights)":
                      (full_size_boss(Path(workdir) / "full_size"), args.full_size_spectra)}
        for label, (model_dir, n_spectra) in models.items():
            if not (Path(model_dir) / "model_args.yaml").is_file():
                print(f"{label}: {model_dir} not found, skipped")
                continue
            model = load_model(model_dir, **({"max_batch": args.max_batch} if args.max_batch else {}))
            chosen = [spectra[index % len(spectra)] for index in range(n_spectra)]
            native = NativeSpectra.from_spectra(chosen)
            on_grid = [to_model_grid(spectrum) for spectrum in chosen]
            flux = np.stack([grid_flux for grid_flux, _, _ in on_grid])
            error = np.stack([grid_error for _, grid_error, _ in on_grid])
            seeds = [spectrum_seed(f"bench-{index}", 0) for index in range(n_spectra)]
            times = measure(model, flux, error, native, seeds, args.draws, args.repeats)
            print(f"\n{label}: {n_spectra} spectra x ({args.draws} draws + 1 noiseless row), {model.max_batch} rows "
                  f"per forward at most, {args.threads} CPU thread(s), median of {args.repeats} interleaved runs")
            print(f"  {'noise drawn on':<30}{'total s':>10}{'forward s':>11}{'MC s':>9}{'MC ms/spectrum':>16}"
                  f"{'MC / forward':>14}")
            for path, runs in times.items():
                total, forward = (statistics.median(values) for values in zip(*runs))
                overhead = total - forward
                print(f"  {path:<30}{total:>10.3f}{forward:>11.3f}{overhead:>9.3f}"
                      f"{1e3 * overhead / n_spectra:>16.2f}{overhead / forward:>13.1%}")
            native_runs = times["native pixels"]
            per_spectrum = statistics.median(total - forward for total, forward in native_runs) / n_spectra
            forward_per_spectrum = statistics.median(forward for _, forward in native_runs) / n_spectra
            print(f"  extrapolated to {CATALOG_SPECTRA:,} spectra on one such core: native MC "
                  f"{per_spectrum * CATALOG_SPECTRA / 3600:,.1f} h, forward passes "
                  f"{forward_per_spectrum * CATALOG_SPECTRA / 3600:,.1f} h")
            steps = native_breakdown(native, torch.from_numpy(flux), seeds, args.draws, args.repeats)
            print("  native steps (ms/spectrum): " + ", ".join(f"{name} {1e3 * seconds / n_spectra:.2f}"
                                                              for name, seconds in steps.items()))


if __name__ == "__main__":
    main()
