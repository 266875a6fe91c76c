"""Shared fixtures: the development data in ../shared (skipped when absent, an error when
``CATALOGBUILDER_REQUIRE_SHARED=1`` as in CI), the shipped sample, and a tmpfs for full-disk tests. Tests that use
../shared get the ``shared`` marker automatically (``-m "not shared"`` selects the others)."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CATALOGBUILDER_SHARED", REPO_ROOT.parent / "shared")).resolve()
REQUIRE_SHARED = os.environ.get("CATALOGBUILDER_REQUIRE_SHARED", "") == "1"  # set by .ci/run: CI must not skip them


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs ../shared (through any fixture depending on ``shared_dir``) as ``shared``."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="session", autouse=True)
def private_measurements(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Speed measurements shared by the processes of this test session only (catalogbuilder.models.measurements):
    nothing read from, or left in, the user's cache; worker processes started by the tests inherit the variable."""
    from catalogbuilder.models.measurements import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("measurements"))
    yield Path(os.environ[CACHE_ENV])
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (SPEC, data, conformance); tests using it skip cleanly when it is absent, and fail when
    ``CATALOGBUILDER_REQUIRE_SHARED=1``."""
    if not (SHARED_DIR / "data").is_dir():
        if REQUIRE_SHARED:
            pytest.fail(f"../shared not found at {SHARED_DIR} and CATALOGBUILDER_REQUIRE_SHARED=1", pytrace=False)
        pytest.skip(f"../shared not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_data(shared_dir: Path) -> Path:
    """../shared/data: real public survey files (see its PROVENANCE.md)."""
    return shared_dir / "data"


@pytest.fixture(scope="session")
def conformance_dir(shared_dir: Path) -> Path:
    """../shared/conformance: reference vectors of the BossNet family."""
    return shared_dir / "conformance"


@pytest.fixture(scope="session")
def ingested_store(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A spectrum store holding the 7 spectra of the two real apStar files of ../shared (one row entirely zero)."""
    from catalogbuilder.store import SpectrumStore

    path = tmp_path_factory.mktemp("ingested") / "store"
    report = SpectrumStore.open(path, create=True).ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    assert report.added["apogee"] == 7
    return path


@pytest.fixture
def store(ingested_store: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`ingested_store` (inference writes its results inside the store)."""
    return Path(shutil.copytree(ingested_store, tmp_path / "store"))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)`` mounts a tmpfs of ``size`` (e.g. ``"600k"``) under ``tmp_path`` and returns its folder, to fill
    a disk for real; unmounted afterwards. Skips where mounting is not permitted (e.g. without root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"tmpfs-{len(mounted)}"
        mount_point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                              capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # also when a failed test left a file open


@pytest.fixture(scope="session")
def joined_chunks() -> Callable[[Path], bytes]:
    """A chunked model directory's ``model_chunk_0..9`` bytes concatenated in order (the serialised state_dict whose
    SHA-256 is its ``weights_sha256``), read with plain file reads, independently of the code under test."""
    return lambda directory: b"".join((Path(directory) / f"model_chunk_{index}").read_bytes() for index in range(10))
