"""Two exact implementations of the 1-d convolutions of the BossNet family, chosen per layer and device by speed.

:class:`Conv1d` is ``torch.nn.Conv1d`` (same parameters, same ``state_dict``) whose forward can run either as torch's
own convolution (``direct``: mkldnn on CPU, cuDNN on GPU) or as an FFT convolution (``fft``): ``torch.fft.rfft`` of
the input and of the kernel, one complex channel matmul per frequency (``torch.bmm`` with the frequencies as the
batch), ``torch.fft.irfft``. The FFT form costs O(L log L) per channel pair instead of O(L k), so it wins for the
kernel of 30 pixels of APOGEE Net III / BOSS Net on CPU.

Its ``mode``: ``direct``, ``fft``, or ``auto`` — the first forward of a new (device, dtype, autocast, layer shape,
input length, batch rows, threads) runs both implementations on the real input, keeps ``fft`` only if it agrees with
the direct convolution to :data:`AGREEMENT_TOLERANCE` relative (max |fft − direct| / max |direct|) and is faster
by :data:`FFT_MARGIN`, and caches the choice in this process (:func:`convolution_choices`) and for every process of
the machine (:mod:`catalogbuilder.models.measurements`: the first measurement of a key is the one all workers and
later runs use, so they all compute the same float32 results). Training (gradients enabled) always uses the direct
convolution; a new ``Conv1d`` starts in ``direct`` mode, so a network behaves like plain torch until an inference
wrapper switches it (:func:`set_convolution_mode`).

Semantics equal ``nn.Conv1d`` with zero padding, dilation 1, one group and any stride (computed at stride 1 and
subsampled), including the even kernel with padding k//2 (L + 1 outputs) and padding k//2 − 1 of the residual blocks.
Other configurations (reflect padding, dilation, groups, string padding) always run the direct convolution.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from catalogbuilder.constants import CONVOLUTION_MODES
from catalogbuilder.models.measurements import first_measurement

log = logging.getLogger(__name__)

AGREEMENT_TOLERANCE = 1e-5  # largest |fft - direct| / max|direct| for which the FFT form may be selected
FFT_MARGIN = 1.1  # the FFT form must be this many times faster: near-ties stay on torch's own convolution
# One implementation this many times faster in the first turn: no further turn. Well clear of FFT_MARGIN, so timing
# noise of ±20 % cannot flip the choice; further turns of a full-size layer's direct convolution cost ~0.2-0.4 s each.
DECISIVE_RATIO = 1.5
FREQUENCY_BLOCK_BYTES = 1 << 20  # complex input (or output) of one band of the FFT form's channel matmul on the CPU
TIMING_REPEATS = 3  # turns of timed calls at most (the first also checks agreement)
# The first call of a shape includes one-off costs (mkldnn primitives, FFT plans, a few ms): it counts as a timing only
# when both calls took longer than this (measured: a 6 ms convolution's first call took 33 ms), or as a decisive first
# turn when the slower call minus this is still DECISIVE_RATIO times the faster one (full-size APOGEE Net III: 117 vs
# 38 ms for 32 -> 64 channels at 21 rows; a second turn of it cost 0.16 s per worker on a first run).
FIRST_CALL_MIN_SECONDS = 0.05
FFT_RADICES: tuple[int, ...] = (2, 3, 5)  # FFT lengths are products of these (fast for pocketfft and cuFFT)
# torch's convolution is assumed able to run this many times faster than the device's measured matmul rate (the best
# of six square matmuls): its time is bounded below by its multiply-adds at that rate. A bound beyond FFT_MARGIN x the
# FFT form's first time (an upper bound on its best) decides as the full timing would, without timing it. Measured on
# an AVX-512 core: square matmuls 78-172 GFLOP/s, the full-size 32 -> 64 and 64 -> 64 convolutions 88-95 (mkldnn's
# direct kernels run on the same FMA units).
PEAK_SAFETY = 1.0
PEAK_SIZES: tuple[int, ...] = (512, 768)  # square matmuls timed for the rate (3 timed calls each after a warm-up)


@dataclasses.dataclass(frozen=True)
class ConvolutionChoice:
    """What the selection measured for one layer shape: the implementation kept, the best seconds of each (for torch's
    convolution its lower bound when it was not timed, ``direct_timed``), and the largest deviation of the FFT form
    relative to max |direct|."""

    implementation: str
    direct_seconds: float
    fft_seconds: float
    deviation: float
    direct_timed: bool = True  # False: direct_seconds is the lower bound from the matmul rate (not timed)

    @property
    def speedup(self) -> float:
        """Direct seconds / FFT seconds (> 1: the FFT form is faster)."""
        return self.direct_seconds / self.fft_seconds if self.fft_seconds > 0 else float("nan")


_CHOICES: dict[tuple, ConvolutionChoice] = {}
_CHOICES_LOCK = threading.Lock()


def fft_length(minimum: int) -> int:
    """The smallest length >= ``minimum`` whose only prime factors are 2, 3 and 5."""
    length = max(1, minimum)
    while True:
        rest = length
        for radix in FFT_RADICES:
            while rest % radix == 0:
                rest //= radix
        if rest == 1:
            return length
        length += 1


def kernel_spectrum(weight: torch.Tensor, padding: int, length: int) -> torch.Tensor:
    """(frequencies, in, out) complex spectrum of a (out, in, k) kernel for :func:`fft_conv1d` with FFT ``length``.

    The kernel is placed circularly at offsets m = −padding … k−1−padding, which applies the left zero padding without
    copying the input; the conjugate turns the product into torch's cross-correlation. With only k non-zero taps the
    transform is evaluated as a sum over the taps, Σ w_m·exp(+2πi·f·m/N) (conjugated), as two real matmuls with
    exactly reduced phases (f·m mod N): one output-sized allocation instead of the five of an FFT of the zero-padded
    kernel (0.08 against 0.2-0.8 s for 64 × 64 channels at N = 4320, same accuracy)."""
    n_out, n_in, kernel = weight.shape
    real_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    frequencies = torch.arange(length // 2 + 1, device=weight.device)
    offsets = torch.arange(kernel, device=weight.device) - padding
    angle = ((frequencies[:, None] * offsets[None, :]) % length).to(torch.float64) * (2 * math.pi / length)
    taps = weight.detach().to(real_dtype).permute(2, 1, 0).reshape(kernel, n_in * n_out)  # (k, in·out)
    with torch.autocast(weight.device.type, enabled=False):  # full precision, like the FFT it stands for
        real = torch.cos(angle).to(real_dtype) @ taps
        imaginary = torch.sin(angle).to(real_dtype) @ taps
    return torch.complex(real, imaginary).reshape(-1, n_in, n_out)


def fft_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, stride: int = 1,
               spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, stride, padding)`` (zero padding, dilation 1, one group) through FFTs.

    ``x``: (batch, in, L); ``weight``: (out, in, k); ``spectrum``: :func:`kernel_spectrum` of the weight for
    :func:`fft_conv1d_length` (computed here when None). Returns (batch, out, (L + 2·padding − k) // stride + 1)."""
    n_in, length, kernel = x.shape[1], x.shape[-1], weight.shape[-1]
    out_length = length + 2 * padding - kernel + 1
    if out_length < 1:
        raise ValueError(f"input of {length} samples is shorter than the padded kernel ({kernel} - 2x{padding})")
    if n_in != weight.shape[1]:
        raise ValueError(f"input has {n_in} channels, the kernel expects {weight.shape[1]}")
    n_fft = fft_conv1d_length(length, kernel, padding)
    if spectrum is None:
        spectrum = kernel_spectrum(weight, padding, n_fft)
    # Both transforms get contiguous, whole-length rows: torch's own zero fill (rfft's n) and a strided irfft input
    # made each transform 1.4-2x slower on the CPU than the explicit pad here and the contiguous product below.
    x_spectrum = torch.fft.rfft(zero_padded(x, n_fft))  # (batch, in, frequencies)
    batch, n_frequencies = x_spectrum.shape[0], x_spectrum.shape[-1]
    product = x_spectrum.new_empty((batch, weight.shape[0], n_frequencies))
    block = frequency_block(x_spectrum, weight.shape[0])
    for first in range(0, n_frequencies, block):  # per block: frequencies as the batch of one channel matmul
        band = slice(first, first + block)
        product[..., band] = torch.bmm(x_spectrum[..., band].permute(2, 0, 1).contiguous(), spectrum[band]
                                       ).permute(1, 2, 0)
    if bias is not None:  # a constant in time is the zero-frequency bin alone: no pass over the output for it
        product[..., 0] += n_fft * bias
    return torch.fft.irfft(product, n=n_fft)[..., :out_length:stride]


def zero_padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` (..., L) zero-padded on the right to ``length`` samples, written once (``F.pad`` fills the whole output
    with zeros before copying ``x`` in: 12 of 21 ms of the padding in a full-size forward pass)."""
    padded = x.new_empty((*x.shape[:-1], length))
    padded[..., :x.shape[-1]] = x
    padded[..., x.shape[-1]:] = 0
    return padded


def frequency_block(x_spectrum: torch.Tensor, n_out: int) -> int:
    """Frequencies per channel matmul of :func:`fft_conv1d`. On the CPU, bands of about
    :data:`FREQUENCY_BLOCK_BYTES`: the transposes into and out of the (frequency, batch, channel) layout of the matmul
    then stay in the core's L2 cache (full-size 64 × 64 layer at 20 rows, one thread: 108 → 75 ms, bit-identical); on
    a GPU one matmul over all frequencies (memory is fast there, launches are not)."""
    n_frequencies = x_spectrum.shape[-1]
    if x_spectrum.device.type != "cpu":
        return n_frequencies
    per_frequency = x_spectrum.element_size() * x_spectrum.shape[0] * max(x_spectrum.shape[1], n_out)
    return max(1, min(n_frequencies, FREQUENCY_BLOCK_BYTES // per_frequency))


def fft_conv1d_length(length: int, kernel: int, padding: int) -> int:
    """FFT length of :func:`fft_conv1d`: no wrap-around into the outputs needs ≥ L + padding samples and room for
    all L + 2·padding − k + 1 outputs; rounded up to a 2·3·5-smooth length."""
    return fft_length(max(length + padding, length + 2 * padding - kernel + 1))


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` with a selectable forward (module docstring); parameters and ``state_dict`` are nn.Conv1d's."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - exactly nn.Conv1d's arguments
        super().__init__(*args, **kwargs)
        self.mode = "direct"
        self.last_implementation: str | None = None  # what the latest forward ran (None before the first)
        self._spectra: dict[tuple, torch.Tensor] = {}

    def fft_supported(self) -> bool:
        """Whether this layer's configuration has an FFT form here (zero padding, no dilation, one group)."""
        return (self.padding_mode == "zeros" and not isinstance(self.padding, str) and self.dilation == (1,)
                and self.groups == 1)

    def weight_spectrum(self, n_fft: int) -> torch.Tensor:
        """The kernel spectrum for FFT length ``n_fft``, cached until the weight tensor changes (or moves)."""
        weight = self.weight.detach()
        key = (n_fft, weight.device, weight.dtype, weight.data_ptr(), self.weight._version)
        spectrum = self._spectra.get(key)
        if spectrum is None:  # worker threads sharing the layer may both compute it; each keeps its own result
            spectrum = kernel_spectrum(weight, self.padding[0], n_fft)
            self._spectra = {key: spectrum}  # only the current weight's
        return spectrum

    def forward_fft(self, x: torch.Tensor) -> torch.Tensor:
        """The FFT form, in float32 (or float64 for float64 input) even under autocast (torch.fft has no bfloat16)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            n_fft = fft_conv1d_length(x.shape[-1], self.kernel_size[0], self.padding[0])
            spectrum = self.weight_spectrum(n_fft).to(torch.complex128 if dtype == torch.float64 else torch.complex64)
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            return fft_conv1d(x, self.weight.detach(), bias, self.padding[0], self.stride[0], spectrum)

    def forward_direct(self, x: torch.Tensor) -> torch.Tensor:
        """torch's own convolution (nn.Conv1d.forward)."""
        return super().forward(x)

    def implementation_for(self, x: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """The implementation this forward uses — ``direct`` whenever gradients are needed or no FFT form exists —
        and its output on ``x`` when the selection has just computed it (None otherwise)."""
        if self.mode == "direct" or not self.fft_supported() or x.ndim != 3:
            return "direct", None
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return "direct", None
        if self.mode == "fft":
            return "fft", None
        choice, output = select_implementation(self, x)
        return choice.implementation, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_implementation, output = self.implementation_for(x)
        if output is not None:
            return output
        return self.forward_fft(x) if self.last_implementation == "fft" else self.forward_direct(x)


def choice_key(layer: Conv1d, x: torch.Tensor) -> tuple:
    """Cache key of a selection: device, dtype, autocast dtype, layer shape, input length, batch rows, threads."""
    device = x.device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (str(device), str(x.dtype), str(autocast), layer.in_channels, layer.out_channels, layer.kernel_size[0],
            layer.stride[0], layer.padding[0], x.shape[-1], x.shape[0], threads)


def _timed(function: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """(wall seconds, result) of one call, synchronising a GPU before and after."""
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronise()
    began = time.perf_counter()
    result = function()
    synchronise()
    return time.perf_counter() - began, result


def select_implementation(layer: Conv1d, x: torch.Tensor) -> tuple[ConvolutionChoice, torch.Tensor | None]:
    """The cached choice for this layer and input shape: this process's, else this machine's shared one
    (:mod:`catalogbuilder.models.measurements`), else measured on ``x`` now (module docstring); and, when measured
    now, the chosen implementation's output on ``x`` (the first forward pass does not compute it a third time)."""
    key = choice_key(layer, x)
    with _CHOICES_LOCK:
        choice = _CHOICES.get(key)
    if choice is not None:
        return choice, None
    # Measured outside the lock: worker threads of one process that meet a new shape together measure it side by
    # side, on their own cores, as they will then compute it (one holding the others idle cost ~1 s per run); the
    # first measurement stored (this machine's shared one, else this process's first) is the one all of them use.
    outputs: dict[str, torch.Tensor] = {}

    def measure() -> dict:
        choice, computed = _measure(layer, x)
        outputs.update(computed)
        return dataclasses.asdict(choice)

    shared = first_measurement("convolution", key, str(x.device), measure)
    with _CHOICES_LOCK:
        if key not in _CHOICES:
            choice = _CHOICES[key] = ConvolutionChoice(**shared)
            log.info("convolution %s: %s (direct %.2f ms, fft %.2f ms, deviation %.1e)", key, choice.implementation,
                     1e3 * choice.direct_seconds, 1e3 * choice.fft_seconds, choice.deviation)
        choice = _CHOICES[key]
    return choice, outputs.get(choice.implementation)


def _measure(layer: Conv1d, x: torch.Tensor) -> tuple[ConvolutionChoice, dict[str, torch.Tensor]]:
    """Run both implementations on ``x`` in turns: first in float32 without autocast (the FFT form, then torch's
    convolution), which checks agreement and is the first timing (unless the caller autocasts, or a call took under
    :data:`FIRST_CALL_MIN_SECONDS`, where one-off set-up costs would weigh; it decides alone when one form is
    :data:`DECISIVE_RATIO` times faster even with that much set-up cost taken off the slower); then timed again in the
    caller's autocast state until there are :data:`TIMING_REPEATS` timings each, or one implementation was
    :data:`DECISIVE_RATIO` times faster. When torch's convolution cannot come within :data:`FFT_MARGIN` of the FFT
    form's first time even at the device's matmul rate (:func:`direct_seconds_bound`), the timing could only choose
    the FFT form (its best time is at most its first, torch's at least the bound): it is not timed, and agreement is
    checked on one row. Returns the choice and each implementation's output on ``x`` as the caller would have computed
    it (empty where no turn was)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.no_grad():
        layer.weight_spectrum(fft_conv1d_length(x.shape[-1], layer.kernel_size[0], layer.padding[0]))  # not timed
        with torch.autocast(x.device.type, enabled=False):
            exact = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            fft_time, fft = _timed(lambda: layer.forward_fft(exact), x.device)
            outputs = {} if autocast or exact.dtype != x.dtype else {"fft": fft}
            bound = direct_seconds_bound(layer, exact)
            if not autocast and bound > FFT_MARGIN * fft_time:  # the timed choice could only be the FFT form
                deviation = _deviation(fft[:1], layer.forward_direct(exact[:1]))  # agreement on one row
                if deviation <= AGREEMENT_TOLERANCE:
                    return ConvolutionChoice("fft", bound, fft_time, deviation, direct_timed=False), outputs
            direct_time, direct = _timed(lambda: layer.forward_direct(exact), x.device)
        if outputs:
            outputs["direct"] = direct
        deviation = _deviation(fft, direct)
        if not deviation <= AGREEMENT_TOLERANCE:
            return ConvolutionChoice("direct", direct_time, fft_time, deviation), outputs
        slower, faster = max(direct_time, fft_time), min(direct_time, fft_time)
        decisive_first = not autocast and slower - FIRST_CALL_MIN_SECONDS >= DECISIVE_RATIO * faster
        first_counts = decisive_first or (not autocast and faster >= FIRST_CALL_MIN_SECONDS)
        direct_times, fft_times = ([direct_time], [fft_time]) if first_counts else ([], [])
        while not decisive_first and not _decided(direct_times, fft_times):
            for times, name, implementation in ((direct_times, "direct", layer.forward_direct),
                                                (fft_times, "fft", layer.forward_fft)):
                seconds, outputs[name] = _timed(lambda: implementation(x), x.device)
                times.append(seconds)
    best_direct, best_fft = min(direct_times), min(fft_times)
    return ConvolutionChoice("fft" if best_fft * FFT_MARGIN < best_direct else "direct", best_direct, best_fft,
                             deviation), outputs


def _deviation(fft: torch.Tensor, direct: torch.Tensor) -> float:
    """max |fft − direct| / max |direct| (the absolute difference where direct is all zeros)."""
    scale = float(direct.abs().max())
    difference = float((fft - direct).abs().max())
    return difference / scale if scale > 0 else difference


def direct_seconds_bound(layer: Conv1d, x: torch.Tensor) -> float:
    """Seconds torch's convolution of ``x`` takes at least: its multiply-adds (2·rows·in·out·k per output sample) at
    :data:`PEAK_SAFETY` × the device's measured matmul rate in ``x``'s dtype (:func:`matmul_rate`)."""
    kernel, stride, padding = layer.kernel_size[0], layer.stride[0], layer.padding[0]
    outputs = (x.shape[-1] + 2 * padding - kernel) // stride + 1
    flops = 2.0 * x.shape[0] * layer.in_channels * layer.out_channels * kernel * outputs
    return flops / (PEAK_SAFETY * matmul_rate(x.device, x.dtype))


_RATES: dict[tuple, float] = {}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of square matmuls on ``device`` in ``dtype`` at this process's thread count: the best of
    :data:`PEAK_SIZES`, measured once per machine kind (:func:`~catalogbuilder.models.measurements.first_measurement`,
    ~40 ms on a CPU core)."""
    key = (str(device), str(dtype), torch.get_num_threads() if device.type == "cpu" else 0,
           device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    rate = _RATES.get(key)
    if rate is None:
        measured = first_measurement("matmul-rate", key, str(device), lambda: {"flops": _measure_rate(device, dtype)})
        rate = _RATES[key] = float(measured["flops"])
    return rate


def _measure_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of :data:`PEAK_SIZES` square matmuls (a warm-up call, then three timed ones each)."""
    best = 0.0
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for size in PEAK_SIZES:
            left, right = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device,
                                                                                          dtype=dtype)
            left @ right
            for _ in range(3):
                best = max(best, 2.0 * size**3 / _timed(lambda: left @ right, device)[0])
    return best


def _decided(direct_times: list[float], fft_times: list[float]) -> bool:
    """Enough timings: the repeats are done, or the first turn was decisive."""
    if len(direct_times) >= TIMING_REPEATS:
        return True
    if not direct_times:
        return False
    ratio = direct_times[0] / max(fft_times[0], 1e-12)
    return max(ratio, 1 / max(ratio, 1e-12)) >= DECISIVE_RATIO


def convolution_layers(network: nn.Module) -> Iterator[Conv1d]:
    """Every selectable convolution of a network."""
    return (module for module in network.modules() if isinstance(module, Conv1d))


def set_convolution_mode(network: nn.Module, mode: str) -> None:
    """Set ``mode`` (``auto``, ``direct`` or ``fft``) on every selectable convolution of ``network``."""
    if mode not in CONVOLUTION_MODES:
        raise ValueError(f"convolution mode must be one of {CONVOLUTION_MODES}, got {mode!r}")
    for layer in convolution_layers(network):
        layer.mode = mode


def convolution_choices() -> dict[tuple, ConvolutionChoice]:
    """Every selection made in this process so far: :func:`choice_key` → :class:`ConvolutionChoice`."""
    with _CHOICES_LOCK:
        return dict(_CHOICES)


def forget_convolution_choices() -> None:
    """Drop this process's cached selections (the next ``auto`` forward of each shape reads the machine's shared
    one, or measures again if there is none)."""
    with _CHOICES_LOCK:
        _CHOICES.clear()
