"""Where and how a worker runs a model: device (a GPU only on workers holding the ``GPU`` resource), arithmetic
precision, one worker process per GPU, and the rows per forward pass chosen by measured throughput.

Rows per forward pass: the Monte-Carlo draws of whole spectra, ``draws × 2^i`` rows (so a 256-spectrum store chunk
splits into whole forward passes without padding), at most :data:`CPU_MAX_ROWS` on CPU (convolution activations
leave the caches beyond) and :data:`GPU_MAX_ROWS` on GPU. Without measurement: the largest candidate within
:data:`CPU_DEFAULT_ROWS` / :data:`GPU_DEFAULT_ROWS`. With measurement (:func:`choose_forward_rows`, run by the worker
plugin when a run is large enough to repay it): each candidate predicts synthetic spectra twice (warm-up, which also
selects its convolutions, then timed), and the candidate with the most spectra/s wins, a larger one only if faster by
:data:`ROWS_MARGIN`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catalogbuilder.constants import DEVICES, PRECISIONS

log = logging.getLogger(__name__)

# On a CPU a BossNet runs its convolutions in blocks of ~21 rows (models.bossnet.CPU_TRUNK_ROWS: activations stay
# in the caches) and its linear layers once per forward pass, so larger passes read the first linear layer's weights
# for more rows: full-size APOGEE Net III, 1 thread, 21 rows per pass 11.7 ms/row, 84 rows 10.2, 168 rows 10.0.
CPU_MAX_ROWS = 256
CPU_DEFAULT_ROWS = 96  # without measurement: at 20 draws 4 spectra per forward pass (few padded rows in small runs)
GPU_MAX_ROWS = 4096
GPU_DEFAULT_ROWS = 512
ROWS_CANDIDATES = 4  # the largest this many of the draws × 2^i candidates are measured
ROWS_MARGIN = 1.05  # a larger batch must be this much faster to be chosen (near-ties keep the smaller one)
MAX_SPECTRA_PER_FORWARD = 256  # = the store chunk: whole forward passes tile a chunk


def resolve_device(device: str, holds_gpu: bool) -> str:
    """The torch device type of a worker: ``auto`` → ``cuda`` only on a worker holding a ``GPU`` resource and seeing
    CUDA, else ``cpu`` (a CPU worker on a GPU node stays on the CPU); ``cpu``/``cuda`` are returned as given."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device != "auto":
        return device
    if not holds_gpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_options(precision: str) -> dict[str, Any]:
    """``load_model`` options of a precision: ``float32`` (exact, the default), ``tf32`` (TF32 tensor-core
    convolutions and matmuls on GPUs that have them, ~1e-3 relative), ``bf16`` (bfloat16 autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "tf32":
        return {"allow_tf32": True}
    if precision == "bf16":
        import torch

        return {"autocast_dtype": torch.bfloat16}
    return {}


def forward_rows_candidates(device_type: str, draws: int) -> tuple[int, ...]:
    """Rows per forward pass worth measuring on ``device_type`` (``cpu``/``cuda``) for ``draws`` draws per spectrum
    (whole spectra: each takes its noiseless row and its draws, ``models.montecarlo.spectra_per_forward``)."""
    per_spectrum = draws + 1
    limit = CPU_MAX_ROWS if device_type == "cpu" else GPU_MAX_ROWS
    spectra = [2**power for power in range(MAX_SPECTRA_PER_FORWARD.bit_length())]
    rows = [count * per_spectrum for count in spectra if count * per_spectrum <= limit] or [per_spectrum]
    return tuple(rows[-ROWS_CANDIDATES:])


def default_forward_rows(device_type: str, draws: int) -> int:
    """Rows per forward pass without measurement: the largest candidate within the device's default."""
    candidates = forward_rows_candidates(device_type, draws)
    default = CPU_DEFAULT_ROWS if device_type == "cpu" else GPU_DEFAULT_ROWS
    return max([rows for rows in candidates if rows <= default] or [min(candidates)])


@dataclasses.dataclass(frozen=True)
class RowsMeasurement:
    """Throughput of one forward-pass size: rows, spectra per forward pass and spectra/s (timed pass only)."""

    rows: int
    spectra: int
    spectra_per_second: float


def choose_forward_rows(model: Any, draws: int, candidates: Sequence[int]) -> tuple[int, list[RowsMeasurement]]:
    """The rows per forward pass giving ``model`` (a loaded spectral model with ``max_batch``, ``grid``, ``device`` and
    ``weights_sha256``) the most spectra/s at ``draws`` draws, with the measurements: this machine's shared choice for
    the same model, settings and threads (:mod:`catalogbuilder.models.measurements`), else measured now. Leaves
    ``model.max_batch`` at the choice."""
    import torch

    from catalogbuilder.models.convolution import convolution_layers
    from catalogbuilder.models.measurements import first_measurement

    network = getattr(model, "network", None)
    convolutions = sorted({layer.mode for layer in convolution_layers(network)}) if network is not None else []
    settings = (model.weights_sha256, draws, tuple(sorted(candidates)), torch.get_num_threads(),
                getattr(model, "autocast_dtype", None), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32, convolutions)
    shared = first_measurement("forward-rows", settings, str(model.device),
                               lambda: [dataclasses.asdict(m) for m in _measure_rows(model, draws, candidates)])
    measurements = [RowsMeasurement(**measurement) for measurement in shared]
    best = measurements[0]
    for measurement in measurements[1:]:
        if measurement.spectra_per_second > ROWS_MARGIN * best.spectra_per_second:
            best = measurement
    model.max_batch = best.rows
    log.info("forward rows %d chosen from %s", best.rows, measurements)
    return best.rows, measurements


def _measure_rows(model: Any, draws: int, candidates: Sequence[int]) -> list[RowsMeasurement]:
    """Spectra/s of ``model.predict`` at each candidate rows per forward pass, on synthetic spectra (a smooth positive
    continuum with 1 % errors; the noise drawn on the grid, as the forward passes are what is compared): a warm-up call
    (allocations, convolution choices), then a timed one."""
    n_pixels = model.grid_spec.pixels
    measurements = []
    for rows in sorted(candidates):
        spectra = max(1, rows // (draws + 1))
        flux = np.tile(1.0 + 0.1 * np.sin(np.arange(n_pixels, dtype=np.float32) / 50.0), (spectra, 1))
        error = 0.01 * flux
        seeds = np.arange(spectra)
        model.max_batch = rows
        model.predict(flux, error, draws=draws, seeds=seeds, noise_on_grid=True)  # warm-up: allocations, convolutions
        began = time.perf_counter()
        model.predict(flux, error, draws=draws, seeds=seeds, noise_on_grid=True)
        measurements.append(RowsMeasurement(rows, spectra, spectra / (time.perf_counter() - began)))
    return measurements


def worker_gpu_identity() -> tuple[str, str]:
    """(host name, the GPU this process computes on as ``cuda:0``: the first entry of ``CUDA_VISIBLE_DEVICES``, or
    ``0`` when unset). Run on workers with ``client.run``; needs no CUDA initialisation."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return socket.gethostname(), visible or "0"


def shared_gpus(identities: Mapping[str, tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """GPUs that more than one worker process would compute on: (host, GPU) → worker addresses."""
    users: dict[tuple[str, str], list[str]] = {}
    for address, identity in identities.items():
        users.setdefault(tuple(identity), []).append(address)
    return {gpu: sorted(addresses) for gpu, addresses in users.items() if len(addresses) > 1}


class GpuPlacementError(ValueError):
    """A run that would make several worker processes compute on one GPU; the message says which and what to do."""
