"""The BossNet network family: APOGEE Net III ("ANet v3", 3 targets, APOGEE grid) and BOSS Net (4 targets, optical grid).

One definition serves both; it is built from the keys of the official ``model_args.yaml`` and its ``state_dict`` keys and
shapes equal the reference implementation's (``conformance/official_shapes.json``), so the SDSS weights load unchanged and
strictly. Architecture (SPEC §3): a sin(pixel index) positional channel stacked after the flux channel → ConvBlock
(Conv1d k, padding k//2, BatchNorm, ELU, MaxPool 2) → residual blocks between ``model_dim * dim_mults[i]`` channels
→ AdaptiveAvgPool1d → flatten (channel-major) → ``num_linear`` × (Linear + ReLU) → Linear to the targets (z-scores).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from catalogbuilder.constants import BOSSNET_PARAMS_BOSS, DEFAULT_DRAWS, GRID_APOGEE, GRID_OPTICAL
from catalogbuilder.models.convolution import Conv1d, set_convolution_mode
from catalogbuilder.models.montecarlo import (DEFAULT_MAX_BATCH, LABEL_TO_OUTPUT, NativeSpectra, canonical_outputs,
                                             monte_carlo_predict, require_noise_source)
from catalogbuilder.models.preprocess import load_label_stats, log_scale_flux, unnormalize
from catalogbuilder.models.registry import ModelInfo, ModelSummary, NetworkFamily, SpectralModel, register_family
from catalogbuilder.models.weight_files import weights_sha256
from catalogbuilder.models.weights import load_state_dict

MODEL_ARGS_FILE = "model_args.yaml"
# Rows per pass of the convolutional part on a CPU (BossNet.trunk_rows). Full-size APOGEE Net III, FFT convolutions,
# one thread, ms per row by (rows per forward pass, rows per trunk pass): (21, 21) 11.7, (84, 21) 10.2, (168, 21)
# 10.0, (84, 28) 10.4, (84, 42) 11.7, (10, 10) 17.1: blocks of about one spectrum's 21 draws, many per forward pass.
CPU_TRUNK_ROWS = 24


@dataclasses.dataclass(frozen=True)
class BossNetConfig:
    """Constructor arguments of a BossNet, with the key names of the official ``model_args.yaml``.

    ``in_channels`` is kept only so the file round-trips: the reference ignores it (the first convolution has 2 input
    channels with ``pos_enc``, 1 without), and so does this implementation.
    """

    model_dim: int
    dim_mults: tuple[int, ...]
    kernel_size: int
    num_targets: int
    adapt_pool_output_dim: int
    num_linear: int
    linear_dim: int
    pos_enc: bool
    in_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))
        positive = {name: getattr(self, name) for name in
                    ("model_dim", "kernel_size", "num_targets", "adapt_pool_output_dim", "num_linear", "linear_dim")}
        bad = {name: value for name, value in positive.items() if int(value) < 1}
        if bad or not self.dim_mults or min(self.dim_mults) < 1:
            raise ValueError("BossNet arguments must be positive integers with non-empty dim_mults; "
                             f"got {bad or self.dim_mults}")

    @classmethod
    def from_dict(cls, arguments: dict[str, Any]) -> BossNetConfig:
        """Config from a ``model_args.yaml`` mapping; unknown or missing keys raise ``ValueError``."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = set(arguments) - fields
        if unknown:
            raise ValueError(f"unknown BossNet model_args keys {sorted(unknown)}; expected {sorted(fields)}")
        try:
            return cls(**arguments)
        except TypeError as error:  # a required key is missing
            raise ValueError(f"incomplete BossNet model_args: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> BossNetConfig:
        """Read ``model_args.yaml`` (a file, or the model directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_ARGS_FILE
        with open(path) as handle:
            arguments = yaml.safe_load(handle)
        if not isinstance(arguments, dict):
            raise ValueError(f"{path}: expected a mapping of BossNet constructor arguments")
        return cls.from_dict(arguments)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping in the official key order (``dim_mults`` as a list)."""
        arguments = dataclasses.asdict(self)
        arguments["dim_mults"] = list(self.dim_mults)
        order = ("in_channels", "model_dim", "dim_mults", "kernel_size", "num_targets", "adapt_pool_output_dim",
                 "num_linear", "linear_dim", "pos_enc")
        return {key: arguments[key] for key in order}

    def to_yaml(self, path: str | Path) -> None:
        """Write ``model_args.yaml`` (a file path, or a directory to write it into)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_ARGS_FILE
        with open(path, "w") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False, default_flow_style=None)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel count after the first convolution and after each residual block."""
        return tuple(self.model_dim * mult for mult in self.dim_mults)


class PositionalEncoding(nn.Module):
    """One positional channel sin(i · inv_freq) of the float32 pixel index i (inv_freq = [1.0], the reference buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(1))

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        """(batch, 1, pixels) → the positional channel broadcast to the same shape."""
        index = torch.arange(flux.shape[-1], device=flux.device, dtype=self.inv_freq.dtype)
        return torch.sin(index * self.inv_freq).to(flux.dtype).expand(flux.shape[0], 1, -1)


class ConvBlock(nn.Module):
    """Conv1d (with bias, padding k//2) → BatchNorm → ELU → MaxPool(2). An even k returns L+1 samples before pooling."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv_layer = Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm1d(out_channels)
        self.pool = nn.MaxPool1d(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(nn.functional.elu(self.bn(self.conv_layer(x))))

    def fold_batch_norm(self) -> None:
        """Inference only: the BatchNorm folded into the convolution (:func:`fold_batch_norm`)."""
        self.bn = fold_batch_norm(self.conv_layer, self.bn)


class ResidualBlock(nn.Module):
    """Two bias-free Conv1d + BatchNorm with ELU between, residual added before the final ELU.

    The second convolution uses padding k//2 − 1 for even k so the block keeps the length; when the channel count
    grows, the residual is zero-padded on the channel axis with floor(Δ/2) channels before and the rest after.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = Conv1d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = Conv1d(out_channels, out_channels, kernel_size,
                               padding=padding - 1 if kernel_size % 2 == 0 else padding, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        growth = out_channels - in_channels
        self.channel_padding = (0, 0, growth // 2, growth - growth // 2)  # (pixel before/after, channel before/after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.elu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if any(self.channel_padding) and not torch.is_grad_enabled():
            # the same sums without the zero-padded copy of x: out is this call's own tensor (full-size APOGEE Net
            # III, 21 rows: ~7 ms of ~200 per forward pass)
            out[:, self.channel_padding[2]:out.shape[1] - self.channel_padding[3]] += x
            return nn.functional.elu(out)
        residual = nn.functional.pad(x, self.channel_padding) if any(self.channel_padding) else x
        return nn.functional.elu(out + residual)

    def fold_batch_norm(self) -> None:
        """Inference only: both BatchNorms folded into their convolutions (:func:`fold_batch_norm`)."""
        self.bn1 = fold_batch_norm(self.conv1, self.bn1)
        self.bn2 = fold_batch_norm(self.conv2, self.bn2)


def fold_batch_norm(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> nn.Identity:
    """Fold an inference-mode BatchNorm that follows ``conv`` into the convolution's weight and bias (computed in
    float64, stored in the weight's dtype); returns the identity that replaces the BatchNorm.

    bn(conv(x)) = conv(x) · γ/√(var + ε) + β − mean · γ/√(var + ε) is again a convolution; folded, a forward pass
    skips one pass over every convolution's output (full-size APOGEE Net III: 25 of ~280 ms at 21 rows on one CPU
    thread), and the FFT form adds the bias in its zero-frequency bin. Equal in exact arithmetic; in float32 the
    outputs differ by rounding (~1e-7 relative). ``ValueError`` for a BatchNorm in training mode or without running
    statistics (its output would then depend on the batch)."""
    if bn.training or conv.training or bn.running_mean is None or bn.running_var is None:
        raise ValueError("only an inference-mode BatchNorm with running statistics can be folded into a convolution")
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller is in

        def float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().double()

        weight, bias = fuse_conv_bn_weights(float64(conv.weight), float64(conv.bias), float64(bn.running_mean),
                                            float64(bn.running_var), bn.eps, float64(bn.weight), float64(bn.bias))
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return nn.Identity()


class AdaptiveAvgPool1d(nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d`` that, with ``by_period`` set (an inference form, :meth:`BossNet.use_inference_forms`),
    averages with one small matmul on the CPU where its windows repeat with a short period.

    Window j covers inputs floor(j·L/O) … ceil((j + 1)·L/O) − 1; with g = gcd(L, O) the pattern repeats every L/g
    inputs and O/g outputs, so the pooling is (rows · channels · g, L/g) @ (L/g, O/g) with 1/width in each window.
    Full-size APOGEE Net III (4288 → 1024: 67 inputs → 16 outputs per period) at 21 rows on one thread: 3.4 against
    18 ms, equal to float32 rounding (the sums are taken in another order). Longer periods (more than
    :data:`MAX_PERIOD_OUTPUTS` outputs), other devices and autocast use torch's own pooling."""

    MAX_PERIOD_OUTPUTS = 32  # matmul cost per input value: this many multiply-adds

    def __init__(self, output_size: int) -> None:
        super().__init__(output_size)
        self.by_period = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, outputs = x.shape[-1], int(self.output_size if isinstance(self.output_size, int) else self.output_size[0])
        period = math.gcd(length, outputs)
        if (not self.by_period or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or x.dtype not in (torch.float32, torch.float64) or outputs // period > self.MAX_PERIOD_OUTPUTS):
            return super().forward(x)
        weights = period_weights(length // period, outputs // period, x.dtype)
        return (x.reshape(-1, length // period) @ weights).reshape(*x.shape[:-1], outputs)


@functools.lru_cache(maxsize=16)
def period_weights(inputs: int, outputs: int, dtype: torch.dtype) -> torch.Tensor:
    """(inputs, outputs) averaging weights of one period of adaptive average pooling (:class:`AdaptiveAvgPool1d`); an
    ordinary tensor even when first asked for in inference mode (it is cached for every later caller)."""
    with torch.inference_mode(False):
        weights = torch.zeros(inputs, outputs, dtype=torch.float64)
        for output in range(outputs):
            first, end = output * inputs // outputs, -(-(output + 1) * inputs // outputs)
            weights[first:end, output] = 1.0 / (end - first)
        return weights.to(dtype)


class LinearBlock(nn.Module):
    """Linear → ReLU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_layer = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.linear_layer(x))


class BossNet(nn.Module):
    """The BossNet network; input (batch, 1, pixels) or (batch, pixels) preprocessed flux, output (batch, targets) z-scores.

    ``trunk_rows`` (None: all rows at once) splits a forward pass's rows into equal blocks of at most this many for
    the convolutional part, then runs the linear layers once on all of them: on a CPU the convolutions' activations
    stay in the caches while the first linear layer (256 MB of weights in the full-size APOGEE Net III) is read once
    for many rows (:data:`CPU_TRUNK_ROWS`). Rows are independent: the result is the same up to float32 rounding.
    """

    def __init__(self, config: BossNetConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk_rows: int | None = None
        channels = config.channels
        self.pos_enc = PositionalEncoding() if config.pos_enc else None
        self.first_conv = ConvBlock(2 if config.pos_enc else 1, channels[0], config.kernel_size)
        self.res_blocks = nn.ModuleList(
            ResidualBlock(c_in, c_out, config.kernel_size) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.adapt_pool = AdaptiveAvgPool1d(config.adapt_pool_output_dim)
        linear_input = channels[-1] * config.adapt_pool_output_dim
        self.linear_sequential = nn.Sequential(
            LinearBlock(linear_input, config.linear_dim),
            *(LinearBlock(config.linear_dim, config.linear_dim) for _ in range(config.num_linear - 1)),
            nn.Linear(config.linear_dim, config.num_targets),
        )

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        if flux.ndim == 2:
            flux = flux.unsqueeze(1)
        if flux.ndim != 3 or flux.shape[1] != 1:
            raise ValueError(f"BossNet expects (batch, pixels) or (batch, 1, pixels); got {tuple(flux.shape)}")
        if not self.trunk_rows or flux.shape[0] <= self.trunk_rows:
            return self.linear_sequential(self.features(flux))
        blocks = flux.tensor_split(math.ceil(flux.shape[0] / self.trunk_rows))
        return self.linear_sequential(torch.cat([self.features(block) for block in blocks]))

    def features(self, flux: torch.Tensor) -> torch.Tensor:
        """The convolutional part and the pooling: (batch, 1, pixels) → (batch, channels × pooled length)."""
        x = torch.cat([flux, self.pos_enc(flux)], dim=1) if self.pos_enc is not None else flux
        x = self.first_conv(x)
        for block in self.res_blocks:
            x = block(x)
        return self.adapt_pool(x).flatten(1)

    def use_inference_forms(self) -> None:
        """Inference only: every BatchNorm folded into the convolution before it (:func:`fold_batch_norm`) and the
        adaptive pooling by period matmul (:class:`AdaptiveAvgPool1d`) — the published network up to float32 rounding.
        The ``state_dict`` then no longer has the official keys: never save such a network."""
        self.first_conv.fold_batch_norm()
        for block in self.res_blocks:
            block.fold_batch_norm()
        self.adapt_pool.by_period = True

    def load_weights(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load a state_dict strictly (every key and shape must match), with a clear error otherwise.

        ``assign=True`` adopts the given tensors instead of copying them (use it on a network built on the ``meta``
        device: no memory is allocated, nor time spent, for the random initial weights).
        """
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong_shape = sorted(key for key in set(expected) & set(state_dict)
                             if tuple(expected[key].shape) != tuple(state_dict[key].shape))
        if missing or unexpected or wrong_shape:
            shapes = [(key, tuple(state_dict[key].shape), tuple(expected[key].shape)) for key in wrong_shape[:5]]
            raise ValueError(
                "weights do not match model_args.yaml: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
                f"wrong shape (key, file, model) {shapes}"
            )
        self.load_state_dict(state_dict, strict=True, assign=assign)


class BossNetModel(SpectralModel):
    """A loaded BossNet (ANet v3 or BOSS Net) behind the :class:`SpectralModel` interface.

    Output columns of the network are the first ``num_targets`` of ``logg, logTeff, FeH, rv`` (SPEC §3).
    ``convolution``: ``auto`` (default; per layer and input shape the faster of torch's convolution and the FFT
    form, which agree to 1e-5 relative: :mod:`catalogbuilder.models.convolution`), ``direct`` or ``fft``.
    ``inference_forms`` (default): BatchNorms folded into the convolutions and pooling by matmul
    (:meth:`BossNet.use_inference_forms`, float32 rounding differences only); off, the network computes exactly as the
    published definition.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``), ``compile`` and ``allow_tf32`` trade exactness for speed and are off
    by default; conformance holds only with all three off. On a CUDA device the default sets the process-wide cuDNN
    convolution precision to IEEE float32 (PyTorch otherwise runs float32 convolutions in TF32 on Ampere and newer GPUs,
    ~1e-3 relative error); ``allow_tf32=True`` lets cuDNN convolutions and cuBLAS matmuls (the FFT form's channel
    products) of the whole process use TF32.
    """

    def __init__(self, network: BossNet, info: ModelInfo, grid: str, stats: dict[str, tuple[float, float]],
                 weights_sha256: str, device: torch.device, max_batch: int = DEFAULT_MAX_BATCH,
                 autocast_dtype: torch.dtype | None = None, compile: bool = False, allow_tf32: bool = False,
                 convolution: str = "auto", inference_forms: bool = True) -> None:
        self.labels: tuple[str, ...] = BOSSNET_PARAMS_BOSS[:network.config.num_targets]
        super().__init__(info, grid, weights_sha256, bossnet_outputs(network.config.num_targets), device)
        self.network = network.to(device).eval()
        if inference_forms:
            self.network.use_inference_forms()
        self.network.trunk_rows = CPU_TRUNK_ROWS if self.device.type == "cpu" else None
        set_convolution_mode(self.network, convolution)
        self.stats = stats
        self.max_batch = max_batch
        self.autocast_dtype = autocast_dtype
        self._forward = torch.compile(self.network) if compile else self.network
        if self.device.type == "cuda":
            _set_cuda_tf32(allow_tf32)
        self.n_pixels = self.grid_spec.pixels

    def predict_labels(self, flux: torch.Tensor, spectrum_index: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocess + forward + de-normalise one batch of flux rows on the model grid → (rows, targets) labels."""
        return self.forward_labels(log_scale_flux(flux.to(self.device)))

    def forward_labels(self, model_input: torch.Tensor) -> torch.Tensor:
        """Forward + de-normalise one batch of preprocessed rows (the network input) → (rows, targets) labels, in
        this model's precision."""
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            z_scores = self._forward(model_input.to(self.device).contiguous())
        return unnormalize(z_scores.float(), self.labels, self.stats)

    def predict(self, flux: np.ndarray, error: np.ndarray | None, draws: int = DEFAULT_DRAWS,
                seeds: Sequence[int] | np.ndarray | None = None,
                photometry: dict[str, np.ndarray] | None = None, native: NativeSpectra | None = None,
                noise_on_grid: bool = False) -> dict[str, np.ndarray]:
        """See :meth:`SpectralModel.predict`; ``photometry`` is not used by this family.

        Draws on the optical grid need ``native`` (noise on the native pixels, as the reference) unless
        ``noise_on_grid=True`` asks for noise on the stored grid with ``error``; APOGEE-grid draws use ``error``."""
        flux = np.asarray(flux, dtype=np.float32)
        if flux.ndim != 2 or flux.shape[1] != self.n_pixels:
            raise ValueError(f"{self.name}: flux must be (spectra, {self.n_pixels}) on the {self.grid} grid; "
                             f"got {flux.shape}")
        require_noise_source(self.name, self.grid, draws, native, noise_on_grid)
        if len(flux) == 0:
            empty = np.empty((0, len(self.labels)))
            return canonical_outputs(self.labels, empty, empty, empty)
        value, raw_error, noiseless = monte_carlo_predict(
            flux, error, self.predict_labels, draws, seeds, self.device, self.max_batch, native=native,
            grid_wavelength=self.grid_spec.wavelength() if native is not None else None)
        return canonical_outputs(self.labels, value, raw_error, noiseless)


def _set_cuda_tf32(allowed: bool) -> None:
    """Let (or forbid) cuDNN convolutions and cuBLAS matmuls of this process compute float32 in TF32 (the setters
    every PyTorch version has; the newer ``fp32_precision`` API would break code that reads the legacy flags)."""
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def bossnet_outputs(num_targets: int) -> tuple[str, ...]:
    """Canonical outputs of a BossNet with ``num_targets`` targets (teff from logTeff), in canonical order."""
    labels = BOSSNET_PARAMS_BOSS[:num_targets]
    outputs = ["teff" if LABEL_TO_OUTPUT[label] == "logteff" else LABEL_TO_OUTPUT[label] for label in labels]
    return tuple(sorted(outputs, key=("teff", "logg", "fe_h", "rv").index))


def bossnet_layout(info: ModelInfo) -> tuple[BossNetConfig, str, dict[str, tuple[float, float]]]:
    """(architecture, grid, label stats) of a BossNet model directory, from its small files only.

    Grid: ``info.grid`` if given (an ingest grid, or the model's own with ``grid_wavelengths``), else optical when the
    model has 4 targets or its stats have ``rv``, else apogee. Default stats (no ``stats.yaml``):
    ``constants.LABEL_STATS["boss"]`` for models on the optical grid or one derived from it, ``["apogee"]`` otherwise.
    """
    config = BossNetConfig.from_yaml(info.directory)
    if config.num_targets > len(BOSSNET_PARAMS_BOSS):
        raise ValueError(f"{info.directory}: BossNet has at most {len(BOSSNET_PARAMS_BOSS)} targets "
                         f"{BOSSNET_PARAMS_BOSS}, model_args says {config.num_targets}")
    ingest_grid = info.grid_wavelengths.base if info.grid_wavelengths is not None else info.grid
    optical_hint = ingest_grid == GRID_OPTICAL or (ingest_grid is None and config.num_targets == 4)
    stats = load_label_stats(info.directory, "boss" if optical_hint else "apogee")
    grid = info.grid or (GRID_OPTICAL if config.num_targets == 4 or "rv" in stats else GRID_APOGEE)
    return config, grid, stats


def describe_bossnet(info: ModelInfo) -> ModelSummary:
    """The :class:`ModelSummary` of a BossNet model directory (no weights loaded)."""
    config, grid, _ = bossnet_layout(info)
    return ModelSummary(info.name, info.family, grid, bossnet_outputs(config.num_targets), False, (), dict(info.domain),
                        weights_sha256(info.directory), info.directory)


def load_bossnet(info: ModelInfo, device: torch.device, **options: Any) -> BossNetModel:
    """Build a :class:`BossNetModel` from a model directory (``model_args.yaml``, weights, optional ``stats.yaml``;
    grid and stats as :func:`bossnet_layout` says); ``options`` go to :class:`BossNetModel`."""
    config, grid, stats = bossnet_layout(info)
    with torch.device("meta"):
        network = BossNet(config)
    state_dict, checksum = load_state_dict(info.directory)
    network.load_weights(state_dict, assign=True)
    return BossNetModel(network, info, grid, stats, checksum, device, **options)


def bossnet_targets(config: BossNetConfig) -> tuple[str, ...]:
    """Outputs of a BossNet of ``config``: 3 targets ``logg, logTeff, FeH`` (APOGEE Net III), 4 add ``rv`` (BOSS Net)."""
    if config.num_targets not in (3, 4):
        raise ValueError(f"BossNet-family models have 3 or 4 targets, got {config.num_targets}")
    return BOSSNET_PARAMS_BOSS[:config.num_targets]


def untrained_bossnet(config: BossNetConfig) -> BossNet:
    """A fresh BossNet to train: PyTorch's default initialisation, then each first-layer kernel's flux taps shifted to
    sum to zero (high-pass; the positional channel is left alone).

    The input is log flux without normalisation, so a spectrum's flux level is an additive offset and an apStar chip
    gap a plateau at log(1e-6), 20 units below the data. With random kernels both pass the first convolution at full
    strength, dominate the first BatchNorm's statistics and bury the absorption lines: a small network then does not
    start learning (docs/training.md). Zero-sum kernels answer to neither offsets nor plateaus at the start; training
    may move them anywhere. Inference never uses this (weights are loaded)."""
    network = BossNet(config)
    with torch.no_grad():
        flux_taps = network.first_conv.conv_layer.weight[:, 0]  # (out channels, kernel); channel 1 is the position
        flux_taps -= flux_taps.mean(dim=-1, keepdim=True)
    return network


def read_bossnet_args(path: Path | None) -> BossNetConfig:
    """The BossNet constructor arguments of a ``model_args.yaml``; the architecture has no defaults."""
    if path is None:
        raise ValueError("the bossnet family needs --config (model_args.yaml with the BossNet constructor arguments)")
    return BossNetConfig.from_yaml(path)


FAMILY = register_family(NetworkFamily(
    "bossnet", load_bossnet, describe_bossnet, read_args=read_bossnet_args, build=untrained_bossnet, targets=bossnet_targets,
    write_args=lambda config, directory: config.to_yaml(directory), preprocess=log_scale_flux,
))
