"""describe_model: what a client plans a run with, read without loading any weights, equal to what the loaded model
says; the weights checksum is cached per file identity and follows rewritten weights."""
from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from catalogbuilder.models import weight_files, weights
from catalogbuilder.config import shipped_models
from catalogbuilder.models.registry import describe_model, load_model


def test_summary_equals_the_loaded_model_and_loads_no_weights(conformance_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    names = [*shipped_models(), str(conformance_dir / "apogee_small"), str(conformance_dir / "boss_small")]
    loaded = {name: load_model(name) for name in names}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("describe_model must not load weights")

    monkeypatch.setattr(torch, "load", refuse)
    for name, model in loaded.items():
        summary = describe_model(name)
        assert (summary.name, summary.family, summary.grid, summary.outputs, summary.needs_photometry,
                summary.weights_sha256, summary.domain) == (
            model.name, model.family, model.grid, tuple(model.outputs), model.needs_photometry,
            model.weights_sha256, model.info.domain), name
        if summary.family != "photometric":  # its keys are its bands and the parallax, checked below
            assert summary.photometry_keys == tuple(getattr(model, "photometry_keys", ()))
    photometric = describe_model("sos-photometric-demo")
    assert photometric.photometry_keys == (*loaded["sos-photometric-demo"].config.bands, "parallax")


def test_checksum_is_cached_and_follows_new_weights(conformance_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    joined_chunks: Callable[[Path], bytes]) -> None:
    model_dir = Path(shutil.copytree(conformance_dir / "apogee_small", tmp_path / "model"))
    first = describe_model(model_dir).weights_sha256
    opened = []
    monkeypatch.setattr(weight_files, "open", lambda *args, **kwargs: opened.append(args) or open(*args, **kwargs),
                        raising=False)
    assert describe_model(model_dir).weights_sha256 == first
    assert not opened, "unchanged files are not read again"
    state_dict, loaded = weights.load_state_dict(model_dir)
    assert loaded == first == hashlib.sha256(joined_chunks(model_dir)).hexdigest()
    state_dict["linear_sequential.2.bias"] += 1.0  # same size, rewritten at once
    new = weights.save_state_dict(state_dict, model_dir)
    assert describe_model(model_dir).weights_sha256 == new != first


def test_missing_or_foreign_models_are_clear_errors(tmp_path: Path, conformance_dir: Path) -> None:
    from catalogbuilder.photometric.stage import describe_photometric_model

    with pytest.raises(FileNotFoundError, match="no model directory"):
        describe_model(tmp_path / "nowhere")
    model_dir = Path(shutil.copytree(conformance_dir / "apogee_small", tmp_path / "no_weights"))
    (model_dir / "model_chunk_3").unlink()
    with pytest.raises(weights.WeightsError, match="missing"):
        describe_model(model_dir)
    with pytest.raises(ValueError, match="is a 'bossnet' model, not a 'photometric' one"):
        describe_photometric_model(conformance_dir / "apogee_small")


def test_concatenated_files_read_as_one_file(tmp_path: Path) -> None:
    parts = [b"", b"abcde", b"f", b"ghijklmnop"]
    paths = []
    for index, part in enumerate(parts):
        paths.append(tmp_path / f"part{index}")
        paths[-1].write_bytes(part)
    joined = b"".join(parts)
    with weight_files.ConcatenatedFiles(paths) as reader:
        assert reader.read() == joined and reader.tell() == len(joined) == reader.size
        reader.seek(3)
        buffer = bytearray(9)
        assert reader.readinto(buffer) == 9 and bytes(buffer) == joined[3:12]  # across two file boundaries
        assert reader.seek(-2, io.SEEK_END) == len(joined) - 2 and reader.read(10) == joined[-2:]
        assert reader.read(1) == b""
        with pytest.raises(ValueError, match="negative seek"):
            reader.seek(-1)


def test_a_background_hash_is_awaited_not_repeated(conformance_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   joined_chunks: Callable[[Path], bytes]) -> None:
    model_dir = Path(shutil.copytree(conformance_dir / "apogee_small", tmp_path / "model"))
    opened, release = [], threading.Event()

    def slow_open(*args: object, **kwargs: object) -> object:
        opened.append(threading.current_thread().name)
        release.wait(timeout=30)
        return open(*args, **kwargs)

    monkeypatch.setattr(weight_files, "open", slow_open, raising=False)
    weight_files.hash_in_background(model_dir)
    while not opened:
        time.sleep(0.01)
    result = []
    asking = threading.Thread(target=lambda: result.append(weight_files.weights_sha256(model_dir)))
    asking.start()
    time.sleep(0.2)
    assert result == []  # waiting for the background hash
    release.set()
    asking.join(timeout=30)
    assert result == [hashlib.sha256(joined_chunks(model_dir)).hexdigest()]
    assert set(opened) == {"catalogbuilder-weights-sha256"} and len(opened) == weight_files.N_CHUNKS  # read once


def test_weights_changing_while_loaded_are_read_again(conformance_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      joined_chunks: Callable[[Path], bytes]) -> None:
    model_dir = Path(shutil.copytree(conformance_dir / "apogee_small", tmp_path / "model"))
    state_dict, _ = weights.load_state_dict(model_dir)
    state_dict["linear_sequential.2.bias"] += 1.0
    torch_load, rewrites = torch.load, []

    def load_while_rewritten(*args: object, **kwargs: object) -> object:
        loaded = torch_load(*args, **kwargs)
        if len(rewrites) < rewrites_wanted:
            rewrites.append(weights.save_state_dict(state_dict, model_dir))  # a trainer saving meanwhile
        return loaded

    monkeypatch.setattr(torch, "load", load_while_rewritten)
    rewrites_wanted = 1
    loaded, checksum = weights.load_state_dict(model_dir)
    assert checksum == rewrites[0] == hashlib.sha256(joined_chunks(model_dir)).hexdigest()
    assert torch.equal(loaded["linear_sequential.2.bias"], state_dict["linear_sequential.2.bias"])
    rewrites_wanted = 1 + weights.LOAD_ATTEMPTS
    with pytest.raises(weights.WeightsError, match="kept changing"):
        weights.load_state_dict(model_dir)

    def fail_while_rewritten(*args: object, **kwargs: object) -> object:  # a read that met the rewrite half-way
        if not failed:
            failed.append(weights.save_state_dict(original, model_dir))
            raise RuntimeError("PytorchStreamReader failed reading file data/3: invalid header or archive is corrupted")
        return torch_load(*args, **kwargs)

    original, failed = weights.load_state_dict(model_dir)[0], []
    monkeypatch.setattr(torch, "load", fail_while_rewritten)
    loaded, checksum = weights.load_state_dict(model_dir)
    assert checksum == failed[0] == hashlib.sha256(joined_chunks(model_dir)).hexdigest()
    assert all(torch.equal(loaded[key], value) for key, value in original.items())
