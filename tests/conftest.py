"""Shared fixtures: the development data in ../shared (skipped when absent) and the shipped sample."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CATALOGBUILDER_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (SPEC, data, conformance); tests using it skip cleanly when it is absent."""
    if not (SHARED_DIR / "data").is_dir():
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
    from catalogbuilder.store.spectra import SpectrumStore

    path = tmp_path_factory.mktemp("ingested") / "store"
    report = SpectrumStore.open(path).ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    assert report.added["apogee"] == 7
    return path


@pytest.fixture
def store(ingested_store: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`ingested_store` (inference writes its results inside the store)."""
    return Path(shutil.copytree(ingested_store, tmp_path / "store"))
