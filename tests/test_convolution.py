"""The selectable convolution of the BossNet family: the FFT form equals torch's Conv1d (every padding/stride the
networks use and more), the per-shape choice is measured once and cached, and anything the FFT form cannot do
(gradients, dilation, groups, non-zero padding modes) runs torch's own convolution."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from catalogbuilder.models import convolution
from catalogbuilder.models.convolution import (Conv1d, convolution_choices, fft_conv1d, fft_length,
                                               forget_convolution_choices, set_convolution_mode)
from catalogbuilder.models.measurements import CACHE_ENV, first_measurement, measurements_directory


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test measures for itself: an empty shared-measurement folder, an empty process cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "measurements"))
    forget_convolution_choices()


def relative_deviation(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize(("n_in", "n_out", "kernel", "padding", "stride", "length"), [
    (2, 4, 30, 15, 1, 8575),   # first BossNet convolution: even kernel, L + 1 outputs
    (8, 16, 30, 15, 1, 4288),  # residual block, first convolution
    (16, 16, 30, 14, 1, 4289),  # residual block, second convolution (k//2 - 1 restores L)
    (3, 5, 3, 1, 1, 100),      # APOGEE Net-like odd kernel
    (4, 6, 7, 0, 1, 50),       # no padding
    (4, 6, 30, 15, 2, 301),    # stride 2
    (1, 1, 5, 9, 3, 4),        # padding wider than the kernel, input shorter than it
])
def test_fft_form_equals_torch_conv1d(n_in: int, n_out: int, kernel: int, padding: int, stride: int,
                                      length: int) -> None:
    generator = torch.Generator().manual_seed(n_in * 100 + kernel)
    x = torch.randn(3, n_in, length, generator=generator, dtype=torch.float64) - 5.0  # offset like log flux
    weight = torch.randn(n_out, n_in, kernel, generator=generator, dtype=torch.float64)
    bias = torch.randn(n_out, generator=generator, dtype=torch.float64)
    reference = F.conv1d(x, weight, bias, stride=stride, padding=padding)
    exact = fft_conv1d(x, weight, bias, padding, stride)
    assert exact.shape == reference.shape
    assert relative_deviation(exact, reference) < 1e-12
    single = fft_conv1d(x.float(), weight.float(), None, padding, stride)
    assert relative_deviation(single, reference - bias[:, None]) < 1e-5


@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 20])  # one frequency per band, ragged bands, one band
def test_frequency_bands_of_the_channel_product_give_the_same_bits(monkeypatch: pytest.MonkeyPatch,
                                                                  block_bytes: int) -> None:
    """The CPU splits the per-frequency channel matmul into cache-sized bands (frequency_block): the same products,
    so the same bits as one matmul over all frequencies, and torch's result to float32 rounding."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(5, 16, 1000, generator=generator) - 5.0
    weight = torch.randn(24, 16, 30, generator=generator)
    reference = F.conv1d(x, weight, None, padding=15)
    monkeypatch.setattr(convolution, "FREQUENCY_BLOCK_BYTES", 1 << 40)
    whole = fft_conv1d(x, weight, None, 15)
    monkeypatch.setattr(convolution, "FREQUENCY_BLOCK_BYTES", block_bytes)
    assert convolution.frequency_block(torch.fft.rfft(x), 24) == max(1, min(501, block_bytes // (8 * 5 * 24)))
    banded = fft_conv1d(x, weight, None, 15)
    torch.testing.assert_close(banded, whole, rtol=0, atol=0)
    assert relative_deviation(banded, reference) < 1e-5


def test_fft_lengths_are_smooth_and_short() -> None:
    assert [fft_length(n) for n in (1, 7, 4317, 4318, 8590)] == [1, 8, 4320, 4320, 8640]
    with pytest.raises(ValueError, match="shorter"):
        fft_conv1d(torch.zeros(1, 1, 3), torch.zeros(1, 1, 30), None, 0)


def test_layer_keeps_nn_conv1d_parameters_and_each_mode_agrees() -> None:
    torch.manual_seed(0)
    plain = nn.Conv1d(8, 16, 30, padding=15)
    layer = Conv1d(8, 16, 30, padding=15)
    layer.load_state_dict(plain.state_dict(), strict=True)
    assert list(layer.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 8, 600)
    outputs = {}
    with torch.inference_mode():
        reference = plain(x)
        for mode in ("direct", "fft", "auto"):
            set_convolution_mode(layer, mode)
            outputs[mode] = layer(x)
            assert layer.last_implementation in ((mode,) if mode != "auto" else ("direct", "fft"))
    assert torch.equal(outputs["direct"], reference), "direct mode is torch's own convolution"
    assert relative_deviation(outputs["fft"], reference) < 1e-5
    assert relative_deviation(outputs["auto"], reference) < 1e-5
    with pytest.raises(ValueError, match="convolution mode"):
        set_convolution_mode(layer, "winograd")


def test_gradients_and_unsupported_layers_use_the_direct_convolution() -> None:
    layer = Conv1d(4, 4, 30, padding=15)
    set_convolution_mode(layer, "fft")
    x = torch.randn(2, 4, 200)
    layer(x).sum().backward()  # training: gradients enabled
    assert layer.last_implementation == "direct" and layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
    assert layer.last_implementation == "fft"
    for unsupported in (Conv1d(4, 4, 5, padding=2, dilation=2), Conv1d(4, 4, 5, padding=2, groups=2),
                        Conv1d(4, 4, 5, padding="same"), Conv1d(4, 4, 5, padding=2, padding_mode="reflect")):
        set_convolution_mode(unsupported, "fft")
        with torch.inference_mode():
            unsupported(x)
        assert unsupported.last_implementation == "direct"


def test_new_weights_give_a_new_kernel_spectrum() -> None:
    layer = Conv1d(3, 3, 9, padding=4, bias=False)
    set_convolution_mode(layer, "fft")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)  # in place: same storage, new version
        after = layer(x)
        layer.weight = nn.Parameter(torch.ones_like(layer.weight))  # a new tensor
        ones = layer(x)
    assert relative_deviation(after, 2.0 * before) < 1e-6
    assert relative_deviation(ones, F.conv1d(x, torch.ones(3, 3, 9), padding=4)) < 1e-6


def test_auto_measures_once_per_shape_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual convolution of the full-size APOGEE Net III (32 channels, k = 30, L = 4289) at one spectrum's 20
    draws on one thread (a CPU worker): the FFT form is several times faster; a new batch size is a new measurement,
    a repeated one is not. (At 2 rows on 2 threads the per-frequency products are too small for it to win.)"""
    forget_convolution_choices()
    layer = Conv1d(32, 32, 30, padding=14, bias=False)
    set_convolution_mode(layer, "auto")
    measured = []
    original = convolution._measure
    monkeypatch.setattr(convolution, "_measure", lambda *args: measured.append(args[1].shape) or original(*args))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for rows in (20, 20, 21):
                layer(torch.randn(rows, 32, 4289))
    finally:
        torch.set_num_threads(threads)
    assert [shape[0] for shape in measured] == [20, 21]
    choices = convolution_choices()
    assert len(choices) == 2 and {choice.implementation for choice in choices.values()} == {"fft"}
    assert all(choice.speedup > convolution.FFT_MARGIN and choice.deviation < 1e-5 for choice in choices.values())
    assert layer.last_implementation == "fft"


def test_the_measuring_forward_returns_the_measured_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ``auto`` forward of a shape returns the output its measurement computed with the chosen form, equal
    to the next forward of the same input, instead of computing it once more; under autocast the float32 first turn
    is not the caller's arithmetic, and the output of the timed turn in the caller's autocast state is returned."""
    calls = []
    layer = Conv1d(8, 8, 30, padding=15)
    set_convolution_mode(layer, "auto")
    for name in ("forward_direct", "forward_fft"):
        original = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda x, original=original, name=name: calls.append(name) or original(x))
    monkeypatch.setattr(convolution, "DECISIVE_RATIO", 1.0)  # each timed turn decides
    monkeypatch.setattr(convolution, "FIRST_CALL_MIN_SECONDS", 0.0)  # the float32 first turn counts as a timing
    monkeypatch.setattr(convolution, "matmul_rate", lambda device, dtype: 1e18)  # torch's convolution is timed
    x = torch.randn(3, 8, 700)
    for autocast, turns in ((False, 1), (True, 2)):
        forget_convolution_choices()
        calls.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            first = layer(x)
            expected = ["forward_fft", "forward_direct"] + ["forward_direct", "forward_fft"] * (turns - 1)
            assert calls == expected, "measured, not computed once more"
            calls.clear()
            again = layer(x)
        assert calls == [f"forward_{layer.last_implementation}"] and torch.equal(first, again), autocast


@pytest.mark.parametrize(("times", "turns", "chosen"), [
    ((0.03, 0.2), 1, "fft"),  # 0.2 - 0.05 s of possible set-up cost is still 1.5 x 0.03 s: decided
    ((0.2, 0.03), 1, "direct"),
    ((0.03, 0.06, 0.05, 0.04, 0.05, 0.04, 0.05, 0.04), 4, "fft"),  # a 33 ms first call can be set-up: more turns
])
def test_first_turn_decides_alone_only_beyond_its_set_up_cost(monkeypatch: pytest.MonkeyPatch, times: tuple,
                                                            turns: int, chosen: str) -> None:
    """Scripted timings (first turn: fft, direct; later turns: direct, fft): the first turn, whose calls include
    one-off set-up costs, ends the measurement only when one form stays DECISIVE_RATIO times faster after
    FIRST_CALL_MIN_SECONDS is taken off the slower one; otherwise the turns go on up to TIMING_REPEATS timed ones."""
    forget_convolution_choices()
    monkeypatch.setattr(convolution, "matmul_rate", lambda device, dtype: 1e18)  # the bound never decides here
    scripted = iter(times)
    timed = []
    monkeypatch.setattr(convolution, "_timed", lambda function, device: (timed.append(1) or next(scripted), function()))
    layer = Conv1d(4, 4, 30, padding=15)
    set_convolution_mode(layer, "auto")
    with torch.inference_mode():
        layer(torch.randn(2, 4, 300))
    assert len(timed) == 2 * turns and layer.last_implementation == chosen


def test_torch_convolution_is_not_timed_where_even_the_matmul_rate_loses(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """A layer whose multiply-adds take longer at PEAK_SAFETY x the device's matmul rate than 1.5 x the FFT form's
    time: torch's convolution runs on one row only (the agreement check), the FFT form is chosen with that bound as
    torch's time; an FFT form that disagrees is still caught (then both are timed on every row)."""
    layer = Conv1d(8, 8, 30, padding=15)
    set_convolution_mode(layer, "auto")
    rows = []
    original = layer.forward_direct
    monkeypatch.setattr(layer, "forward_direct", lambda x: rows.append(len(x)) or original(x))
    monkeypatch.setattr(convolution, "matmul_rate", lambda device, dtype: 1e3)  # a very slow device: a large bound
    x = torch.randn(5, 8, 700)
    forget_convolution_choices()
    with torch.inference_mode():
        layer(x)
    (choice,) = convolution_choices().values()
    assert rows == [1] and choice.implementation == "fft" and not choice.direct_timed
    assert choice.direct_seconds == pytest.approx(2 * 5 * 8 * 8 * 30 * 701 / (convolution.PEAK_SAFETY * 1e3))
    assert 0 < choice.deviation < 1e-5
    fft_form = layer.forward_fft
    monkeypatch.setattr(layer, "forward_fft", lambda x: fft_form(x) + 1.0)  # wrong: caught on the row
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "another-machine"))
    forget_convolution_choices()
    rows.clear()
    with torch.inference_mode():
        layer(x)
    (choice,) = convolution_choices().values()
    assert rows[:2] == [1, 5] and choice.implementation == "direct" and choice.direct_timed


def test_the_matmul_rate_is_measured_once_per_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(convolution, "_RATES", {})
    rate = convolution.matmul_rate(torch.device("cpu"), torch.float32)
    assert 1e8 < rate < 1e13  # FLOP/s of a CPU
    monkeypatch.setattr(convolution, "_RATES", {})
    monkeypatch.setattr(convolution, "_measure_rate", lambda device, dtype: pytest.fail("measured again"))
    assert convolution.matmul_rate(torch.device("cpu"), torch.float32) == rate, "read from the machine's file"


def test_auto_keeps_torch_when_the_fft_form_is_slower_or_inexact(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    layer = Conv1d(4, 4, 30, padding=15)
    set_convolution_mode(layer, "auto")
    x = torch.randn(2, 4, 300)
    fft_form = layer.forward_fft

    def slow_fft(inputs: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return fft_form(inputs)

    forget_convolution_choices()
    monkeypatch.setattr(layer, "forward_fft", slow_fft)
    with torch.inference_mode():
        layer(x)
    assert layer.last_implementation == "direct"
    assert next(iter(convolution_choices().values())).speedup < 1

    forget_convolution_choices()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "other-measurements"))
    monkeypatch.setattr(layer, "forward_fft", fft_form)
    monkeypatch.setattr(convolution, "AGREEMENT_TOLERANCE", 0.0)  # nothing agrees exactly: never the FFT form
    with torch.inference_mode():
        layer(x)
    choice = next(iter(convolution_choices().values()))
    assert layer.last_implementation == "direct" and choice.implementation == "direct" and choice.deviation > 0
    forget_convolution_choices()


def test_fft_form_under_bfloat16_autocast_computes_in_float32() -> None:
    layer = Conv1d(4, 8, 30, padding=15)
    set_convolution_mode(layer, "fft")
    x = torch.randn(2, 4, 500)
    with torch.inference_mode():
        reference = F.conv1d(x, layer.weight, layer.bias, padding=15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = layer(x)
    assert result.dtype == torch.float32 and relative_deviation(result, reference) < 1e-5


def test_a_machine_measures_each_shape_once_for_all_its_processes(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """The first measurement of a key is shared through the cache folder: another process (here: the same one with
    its own cache emptied) reads it instead of measuring, and a later offer does not replace it."""
    layer = Conv1d(4, 4, 30, padding=15)
    set_convolution_mode(layer, "auto")
    x = torch.randn(2, 4, 300)
    with torch.inference_mode():
        layer(x)
    first = dict(convolution_choices())
    assert len(list(measurements_directory().glob("convolution-*.json"))) == 1
    forget_convolution_choices()
    monkeypatch.setattr(convolution, "_measure", lambda *args: pytest.fail("measured again"))
    with torch.inference_mode():
        layer(x)
    assert convolution_choices() == first

    assert first_measurement("test", ("k",), "cpu", lambda: {"value": 1}) == {"value": 1}
    assert first_measurement("test", ("k",), "cpu", lambda: {"value": 2}) == {"value": 1}, "the first one wins"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    assert first_measurement("test", ("k",), "cpu", lambda: {"value": 3}) == {"value": 3}, "unshared, still works"
