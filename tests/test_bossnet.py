"""BossNet configurations beyond the official ones, the chunked weight format, preprocessing details and the registry."""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from catalogbuilder import config
from catalogbuilder.config import ConfigError
from catalogbuilder.constants import GRID_APOGEE, GRID_OPTICAL, LABEL_STATS, grid_wavelength
from catalogbuilder.models import preprocess, registry
from catalogbuilder.models.bossnet import BossNet, BossNetConfig, BossNetModel
from catalogbuilder.models.registry import ModelInfo, SpectralModel, load_model, register_family
from catalogbuilder.models.weight_files import N_CHUNKS, WeightsError, chunk_paths
from catalogbuilder.models.weights import load_state_dict, save_state_dict

SMALL = dict(model_dim=2, dim_mults=[1, 2], kernel_size=5, num_targets=3, adapt_pool_output_dim=8, num_linear=2,
             linear_dim=16, pos_enc=True)


def randomised(network: BossNet, seed: int) -> BossNet:
    """Give BatchNorm non-trivial running statistics so eval mode is not the identity, then switch to eval."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return network.eval()


def write_model_dir(directory: Path, config: BossNetConfig, seed: int = 0, stats: dict | None = None,
                    info: dict | None = None) -> BossNet:
    """A complete model directory (model_args.yaml, chunks, optional stats.yaml and catalogbuilder.yaml)."""
    torch.manual_seed(seed)
    network = randomised(BossNet(config), seed)
    directory.mkdir(parents=True, exist_ok=True)
    config.to_yaml(directory)
    save_state_dict(network.state_dict(), directory)
    if stats is not None:
        (directory / "stats.yaml").write_text(yaml.safe_dump({k: {"MEAN": m, "STD": s} for k, (m, s) in stats.items()}))
    if info is not None:
        (directory / "catalogbuilder.yaml").write_text(yaml.safe_dump(info))
    return network


@pytest.mark.parametrize(
    ("kernel_size", "dim_mults", "pixels"),
    [(3, [1, 2, 4], 101), (4, [1, 2, 4], 101), (7, [1, 3], 3900), (30, [1, 2, 4, 8], 3900), (8, [2], 257),
     (11, [1, 1, 2], 8575)],
)
def test_other_configs_run_and_round_trip_the_chunked_format(tmp_path: Path, kernel_size: int, dim_mults: list[int],
                                                            pixels: int, joined_chunks: Callable[[Path], bytes]) -> None:
    config = BossNetConfig.from_dict({**SMALL, "kernel_size": kernel_size, "dim_mults": dim_mults})
    network = write_model_dir(tmp_path, config, seed=kernel_size)
    flux = torch.randn(3, pixels)
    with torch.inference_mode():
        expected = network(flux)
    assert expected.shape == (3, config.num_targets) and torch.isfinite(expected).all()

    sizes = [path.stat().st_size for path in chunk_paths(tmp_path)]
    total = sum(sizes)
    assert sizes[:-1] == [total // N_CHUNKS] * (N_CHUNKS - 1) and sizes[-1] == total - (N_CHUNKS - 1) * (total // N_CHUNKS)
    assert BossNetConfig.from_yaml(tmp_path) == config

    reloaded = BossNet(BossNetConfig.from_yaml(tmp_path)).eval()
    state_dict, sha256 = load_state_dict(tmp_path)
    reloaded.load_weights(state_dict)
    assert sha256 == hashlib.sha256(joined_chunks(tmp_path)).hexdigest()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(flux), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["direct", "fft"])
def test_folded_batch_norms_compute_the_published_network(tmp_path: Path, mode: str) -> None:
    """The inference network with its BatchNorms folded into the convolutions (bias in the FFT form's zero-frequency
    bin) equals the published definition to float32 rounding, has no BatchNorm left, and refuses a training-mode
    BatchNorm, whose output would depend on the batch."""
    config = BossNetConfig.from_dict({**SMALL, "kernel_size": 30, "dim_mults": [1, 2, 4]})
    torch.manual_seed(5)
    network = randomised(BossNet(config), seed=5)
    for module in network.modules():  # scale and shift too, so every term of the fold is exercised
        if isinstance(module, torch.nn.BatchNorm1d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    flux = torch.randn(4, 1, 3900)

    def trunk(net: BossNet) -> torch.Tensor:  # the convolutional part, before the pooling and the linear layers
        x = net.first_conv(torch.cat([flux, net.pos_enc(flux)], dim=1))
        for block in net.res_blocks:
            x = block(x)
        return x

    with torch.inference_mode():
        features = trunk(network)
        expected = network(flux)
    config.to_yaml(tmp_path)
    save_state_dict(network.state_dict(), tmp_path)
    folded = load_model(tmp_path, convolution=mode).network
    assert not any(isinstance(module, torch.nn.BatchNorm1d) for module in folded.modules())
    assert folded.adapt_pool.by_period and not network.adapt_pool.by_period
    with torch.inference_mode():
        folded_features = trunk(folded)
        torch.testing.assert_close(folded_features, features, rtol=0, atol=2e-6 * float(features.abs().max()))
        torch.testing.assert_close(folded(flux), expected, rtol=1e-5, atol=1e-6)
    assert {layer.last_implementation for layer in folded.modules() if hasattr(layer, "last_implementation")} == {mode}
    with pytest.raises(ValueError, match="inference-mode BatchNorm"):
        BossNet(config).train().use_inference_forms()


def test_trunk_blocks_give_the_rows_of_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU passes run the convolutions in blocks of at most trunk_rows rows (here 7 rows as 3 + 2 + 2) and the linear
    layers once on all rows: the same values as one pass, and the linear layers really see every row at once."""
    network = randomised(BossNet(BossNetConfig.from_dict({**SMALL, "kernel_size": 8})), seed=2)
    flux = torch.randn(7, 1, 500)
    with torch.inference_mode():
        whole = network(flux)
        blocks, heads = [], []
        network.trunk_rows = 3
        monkeypatch.setattr(network, "features", lambda x, plain=network.features: blocks.append(len(x)) or plain(x))
        network.linear_sequential.register_forward_hook(lambda module, inputs, output: heads.append(len(inputs[0])))
        torch.testing.assert_close(network(flux), whole, rtol=1e-6, atol=1e-6)
    assert blocks == [3, 2, 2] and heads == [7]


@pytest.mark.parametrize(("length", "outputs", "matmul"), [
    (4288, 1024, True), (4288, 256, True), (257, 8, True), (10, 20, True), (1950, 1024, False), (8575, 1000, False)])
def test_adaptive_pooling_by_period_matmul_equals_torch(monkeypatch: pytest.MonkeyPatch, length: int, outputs: int,
                                                       matmul: bool) -> None:
    """Short periods (full-size APOGEE Net III: 67 inputs → 16 outputs) average by one matmul, equal to torch's
    adaptive pooling to float32 rounding; long periods use torch's own (the same bits)."""
    from catalogbuilder.models.bossnet import AdaptiveAvgPool1d

    x = torch.nn.functional.elu(torch.randn(3, 4, length, generator=torch.Generator().manual_seed(length)))
    used = []
    original = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: used.append(b.shape) or original(a, b))
    pool = AdaptiveAvgPool1d(outputs)
    expected = torch.nn.functional.adaptive_avg_pool1d(x, outputs)
    assert torch.equal(pool(x), expected) and not used, "the published form unless asked (training, the reference)"
    pool.by_period = True
    pooled = pool(x)
    assert bool(used) == matmul
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0 if not matmul else 4e-7 * float(expected.abs().max()))


@pytest.mark.parametrize(("c_in", "c_out"), [(4, 8), (3, 8), (8, 8)])
def test_residual_add_in_place_gives_the_same_bits(c_in: int, c_out: int) -> None:
    """Without gradients a growing residual block adds x into its own output's middle channels instead of adding a
    zero-padded copy of x: the same sums (x + 0 = x), the same bits as the published form used in training."""
    from catalogbuilder.models.bossnet import ResidualBlock

    block = randomised(ResidualBlock(c_in, c_out, 30), seed=c_in)
    x = torch.randn(3, c_in, 500, generator=torch.Generator().manual_seed(c_out))
    with torch.no_grad():
        in_place = block(x)
    published = block(x).detach()  # gradients on: the zero-padded residual
    assert torch.equal(in_place, published)


def test_even_kernel_geometry_matches_reference_description() -> None:
    """Even k: the first conv returns L + 1 samples (MaxPool floors), residual blocks keep the length."""
    network = BossNet(BossNetConfig.from_dict({**SMALL, "kernel_size": 30, "dim_mults": [1, 2, 4]})).eval()
    lengths: dict[str, int] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            lengths[name] = output.shape[-1]
        return hook

    network.first_conv.conv_layer.register_forward_hook(record("conv"))
    network.first_conv.register_forward_hook(record("pool"))
    network.res_blocks[-1].register_forward_hook(record("res"))
    with torch.inference_mode():
        network(torch.zeros(1, 1, 8575))
    assert lengths == {"conv": 8576, "pool": 4288, "res": 4288}


def test_single_pt_file_loads_like_the_chunks(tmp_path: Path, joined_chunks: Callable[[Path], bytes]) -> None:
    config = BossNetConfig.from_dict(SMALL)
    write_model_dir(tmp_path / "chunked", config)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tmp_path / "chunked" / "model_args.yaml", single)
    (single / "weights.pt").write_bytes(joined_chunks(tmp_path / "chunked"))
    chunked_model, single_model = load_model(tmp_path / "chunked"), load_model(single)
    assert chunked_model.weights_sha256 == single_model.weights_sha256
    flux = np.random.default_rng(0).uniform(0.5, 2.0, (2, len(grid_wavelength(GRID_APOGEE)))).astype(np.float32)
    assert chunked_model.predict(flux, None, draws=0)["logg"].tolist() == single_model.predict(flux, None, draws=0)["logg"].tolist()


def test_bad_weights_give_clear_errors(tmp_path: Path) -> None:
    write_model_dir(tmp_path, BossNetConfig.from_dict(SMALL))
    (tmp_path / "model_chunk_9").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a loadable torch state_dict"):
        load_state_dict(tmp_path)
    (tmp_path / "model_chunk_3").unlink()
    with pytest.raises(WeightsError, match=r"missing \['model_chunk_3'\]"):
        load_state_dict(tmp_path)
    with pytest.raises(WeightsError, match="no such weights"):
        load_state_dict(tmp_path / "absent")


def test_model_args_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown BossNet model_args keys"):
        BossNetConfig.from_dict({**SMALL, "dropout": 0.1})
    with pytest.raises(ValueError, match="incomplete"):
        BossNetConfig.from_dict({key: value for key, value in SMALL.items() if key != "linear_dim"})
    with pytest.raises(ValueError, match="positive"):
        BossNetConfig.from_dict({**SMALL, "kernel_size": 0})


def test_preprocessing_matches_torch_quantile() -> None:
    rng = np.random.default_rng(1)
    flux = rng.lognormal(0.0, 1.0, (7, 500)).astype(np.float32)
    flux[:, :40] = 0.0  # floor pixels count in the percentile
    flux[0, 5:9] = [np.nan, np.inf, -np.inf, -3.0]
    log_flux = torch.log(torch.clamp(torch.nan_to_num(torch.from_numpy(flux), nan=0, posinf=0, neginf=0), min=1e-6))
    expected = torch.minimum(log_flux, torch.quantile(log_flux, 0.95, dim=1, keepdim=True) + 1.0)
    result = preprocess.log_scale_flux(flux)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert torch.equal(result[0, 5:9], torch.full((4,), float(np.log(np.float32(1e-6)))))
    torch.testing.assert_close(preprocess.log_scale_flux(flux[3]), expected[3], rtol=0, atol=0)


@pytest.mark.parametrize("q", [0.95, 0.5, 0.0, 1.0, 0.05])
def test_row_quantile_is_torch_quantile_bit_for_bit(q: float) -> None:
    generator = torch.Generator().manual_seed(3)
    for n in (*range(1, 90), 4648, 8575):
        for rows in (torch.randn(4, n, generator=generator),
                     torch.randint(0, 3, (4, n), generator=generator).float()):  # ties
            assert torch.equal(preprocess.row_quantile(rows, q), torch.quantile(rows, q, dim=1, keepdim=True)), n


def test_stats_default_to_constants_and_unknown_labels_fail(tmp_path: Path) -> None:
    assert preprocess.load_label_stats(tmp_path, "boss") == LABEL_STATS["boss"]
    with pytest.raises(ValueError, match="no MEAN/STD"):
        preprocess.unnormalize(torch.zeros(1, 1), ["rv"], LABEL_STATS["apogee"])


def test_registry_infers_grid_name_and_stats(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "anet", BossNetConfig.from_dict(SMALL))
    apogee = load_model(tmp_path / "anet")
    assert (apogee.name, apogee.family, apogee.grid) == ("anet", "bossnet", GRID_APOGEE)
    assert apogee.outputs == ("teff", "logg", "fe_h") and not apogee.needs_photometry
    assert apogee.stats == LABEL_STATS["apogee"]

    write_model_dir(tmp_path / "bnet", BossNetConfig.from_dict({**SMALL, "num_targets": 4}))
    boss = load_model(tmp_path / "bnet")
    assert boss.grid == GRID_OPTICAL and boss.outputs == ("teff", "logg", "fe_h", "rv")
    assert boss.stats == LABEL_STATS["boss"]

    custom_stats = {"logg": (1.0, 2.0), "logTeff": (3.0, 0.5), "FeH": (0.0, 1.0), "rv": (0.0, 10.0)}
    info = {"name": "optical3", "grid": "optical", "description": "test", "domain": {"teff": [4000, 7000]}, "note": "kept"}
    write_model_dir(tmp_path / "dir3", BossNetConfig.from_dict(SMALL), stats=custom_stats, info=info)
    optical3 = load_model(tmp_path / "dir3")
    assert (optical3.name, optical3.grid, optical3.stats) == ("optical3", GRID_OPTICAL, custom_stats)
    assert optical3.info.extra == {"note": "kept"} and optical3.info.domain == {"teff": (4000.0, 7000.0)}

    write_model_dir(tmp_path / "baddomain", BossNetConfig.from_dict(SMALL), info={"domain": {"teff": [7000, 4000]}})
    with pytest.raises(ValueError, match="low < high"):
        load_model(tmp_path / "baddomain")

    write_model_dir(tmp_path / "rvstats", BossNetConfig.from_dict(SMALL), stats=custom_stats)
    assert load_model(tmp_path / "rvstats").grid == GRID_OPTICAL  # stats with rv → optical

    with pytest.raises(ValueError, match=r"flux must be \(spectra, 3900\)"):
        boss.predict(np.ones((1, 8575), np.float32), None, draws=0)


def test_shipped_names_and_unknown_families(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model_dir(tmp_path / "shipped_small", BossNetConfig.from_dict(SMALL))
    monkeypatch.setattr(config, "SHIPPED_MODELS_DIR", tmp_path)
    assert config.shipped_models() == ["shipped_small"]
    assert load_model("shipped_small").info.directory == (tmp_path / "shipped_small").resolve()
    with pytest.raises(FileNotFoundError, match="no shipped model"):
        load_model("no_such_model")
    write_model_dir(tmp_path / "other", BossNetConfig.from_dict(SMALL), info={"family": "no_such_family"})
    with pytest.raises(ConfigError, match="other/catalogbuilder.yaml: family: got 'no_such_family'; allowed: one of"):
        load_model(tmp_path / "other")


def test_a_family_registers_itself(tmp_path: Path) -> None:
    class ConstantModel(SpectralModel):
        def predict(self, flux, error, draws=20, seeds=None, photometry=None):
            return {"logg": np.full(len(flux), float(self.info.extra["logg"]))}

    @register_family("test_constant")
    def build(info: ModelInfo, device: torch.device) -> SpectralModel:
        return ConstantModel(info, None, "0" * 64, ["logg"], device)

    tmp_path.joinpath("catalogbuilder.yaml").write_text(yaml.safe_dump({"family": "test_constant", "logg": 4.5}))
    model = load_model(tmp_path)
    assert isinstance(model, ConstantModel) and model.family == "test_constant" and model.grid is None
    assert model.predict(np.zeros((2, 3)), None)["logg"].tolist() == [4.5, 4.5]
    assert "test_constant" in registry.registered_families() and "bossnet" in registry.registered_families()
    with pytest.raises(ValueError, match="already registered"):
        register_family("bossnet")(build)
    write_model_dir(tmp_path / "b", BossNetConfig.from_dict(SMALL))
    assert isinstance(load_model(tmp_path / "b"), BossNetModel)


def test_training_starts_from_a_network_blind_to_the_flux_level() -> None:
    """The bossnet family's untrained network (registry ``build``) has zero-sum flux kernels in its first layer: away
    from the array ends, adding a constant to the log-flux input (another flux level) or a plateau (a chip gap) changes
    nothing, where a default-initialised BossNet answers with its whole output."""
    family = registry.network_family("bossnet")
    config = BossNetConfig.from_dict(SMALL)
    torch.manual_seed(0)
    untrained = family.build(config).eval()
    torch.manual_seed(0)
    default = BossNet(config).eval()
    assert torch.allclose(untrained.first_conv.conv_layer.weight[:, 0].sum(dim=-1), torch.zeros(config.channels[0]),
                          atol=1e-6)
    assert torch.equal(untrained.first_conv.conv_layer.weight[:, 1], default.first_conv.conv_layer.weight[:, 1])
    log_flux = torch.randn(3, 400) * 0.05 + 6.0
    with torch.no_grad():
        # the first convolution's output away from the zero-padded array ends
        shifted = [net.first_conv.conv_layer(torch.cat([x.unsqueeze(1), net.pos_enc(x.unsqueeze(1))], dim=1))[..., 4:-4]
                   for net in (untrained, default) for x in (log_flux, log_flux + 3.0)]
    assert torch.allclose(shifted[0], shifted[1], atol=1e-4)
    assert (shifted[2] - shifted[3]).abs().mean() > 0.1
    assert family.with_arguments(config).targets == ("logg", "logTeff", "FeH")
