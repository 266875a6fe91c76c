"""Lineage at release level, on real apStar files: a re-reduced file (same path, new content) or a newer reduction of
the same star at another path leaves exactly one allStar row with the new values; a retired file leaves the release;
a multi-visit apStar gives one allStar row and its visits in allVisit; and a release updated by any sequence of
increments equals a release built from scratch over the same current inputs."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits
from distributed import Client, LocalCluster

from catalogbuilder.cli import main
from catalogbuilder.inference.graph import run_inference
from catalogbuilder.release.build import ReleaseOptions, build_release, read_table
from catalogbuilder.store import SpectrumStore

DWARF = "apogee/apStar-dr17-2M19485057+5005279.fits"  # one visit
GIANT = "apogee/apStar-dr17-2M17335483-2753043.fits"  # three visits
STARS = "apogee/apogee_small/allStar-apogee_small-apogee"
VISITS = "apogee/apogee_small/allVisit-apogee_small-apogee"
TIMESTAMPS = ["created"]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    torch.set_num_threads(1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as dask_client:
        yield dask_client


def rereduced(source: Path, target: Path, scale: float, date: str | None = None) -> Path:
    """A new reduction of a real apStar file: its flux scaled (the spectra change), optionally a creation date."""
    with fits.open(source) as hdul:
        hdul[1].data = hdul[1].data * scale
        if date:
            hdul[0].header["DATE"] = date
        hdul.writeto(target, overwrite=True)
    return target


def release(client: Client, store_path: Path, inputs: list[Path], model: Path, out: Path, **ingest: object) -> None:
    """Ingest (create the store if needed), infer what is new, release into ``out``."""
    store = SpectrumStore.open(store_path, create=True)
    if inputs:
        store.ingest(inputs, progress=False, **ingest)
    run_inference(client, store, model, draws=2, seed=1, progress=False)
    build_release(store, out, ReleaseOptions(fits=False))


def stars(out: Path) -> pd.DataFrame:
    return read_table(out, STARS).set_index("source_id")


def test_a_multi_visit_apstar_gives_one_star_row_and_its_visits(client: Client, conformance_dir: Path,
                                                                 shared_data: Path, tmp_path: Path) -> None:
    release(client, tmp_path / "store", [shared_data / GIANT, shared_data / DWARF], conformance_dir / "apogee_small",
            tmp_path / "out")
    star_rows = stars(tmp_path / "out")
    assert sorted(star_rows.index) == ["2M17335483-2753043", "2M19485057+5005279"]
    assert (star_rows["row"] == 0).all()  # apStar row 0, never the second combined row
    visits = read_table(tmp_path / "out", VISITS)
    assert sorted(visits["visit"]) == [1, 2, 3] and set(visits["source_id"]) == {"2M17335483-2753043"}


def test_rereduced_files_supersede_and_retired_files_leave(client: Client, conformance_dir: Path, shared_data: Path,
                                                           tmp_path: Path) -> None:
    model = conformance_dir / "apogee_small"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    giant, dwarf = Path(shutil.copy(shared_data / GIANT, inputs / "giant.fits")), inputs / "dwarf.fits"
    shutil.copy(shared_data / DWARF, dwarf)
    store_path, out = tmp_path / "store", tmp_path / "out"
    release(client, store_path, [giant, dwarf], model, out)
    first = stars(out)

    # the same path, new content: the dwarf's flux doubled by a re-reduction
    rereduced(shared_data / DWARF, dwarf, 2.0)
    release(client, store_path, [dwarf], model, out)
    second = stars(out)
    assert len(second) == 2 and second.loc["2M19485057+5005279", "file_sha256"] != first.loc["2M19485057+5005279",
                                                                                               "file_sha256"]
    assert second.loc["2M19485057+5005279", "teff"] != first.loc["2M19485057+5005279", "teff"]
    store = SpectrumStore.open(store_path)
    files = store.files()
    assert sorted(files["status_name"]) == ["active", "active", "superseded"]
    assert store.check() == []

    # a newer reduction of the giant at another path (a later header creation date): it replaces the old file
    newer = rereduced(shared_data / GIANT, tmp_path / "elsewhere.fits", 0.5, date="2030-01-01")
    release(client, store_path, [newer], model, out)
    third = stars(out)
    assert len(third) == 2 and third.loc["2M17335483-2753043", "file"] == str(newer)
    visits = read_table(out, VISITS)
    assert len(visits) == 3 and (visits["file"] == str(newer)).all()  # the old visits are gone too
    reasons = dict(zip(SpectrumStore.open(store_path).files()["file_path"], SpectrumStore.open(store_path).files()["status_reason"]))
    assert reasons[str(giant)] == f"superseded by the newer reduction {newer}"

    # the old bytes given again change nothing: they are an older reduction than the active one
    again = SpectrumStore.open(store_path).ingest([giant], progress=False)
    assert again.snapshot_id is None
    # retired: the giant leaves allStar and allVisit; its spectra stay in the store's history
    assert main(["store", "retire", str(store_path), str(newer)]) == 0
    release(client, store_path, [], model, out)
    assert list(stars(out).index) == ["2M19485057+5005279"]
    assert not (out / VISITS).exists() or read_table(out, VISITS).empty
    retired_store = SpectrumStore.open(store_path)
    assert retired_store.info()["total_spectra"] == 14 and retired_store.check() == []  # nothing deleted


def test_increments_equal_a_release_from_scratch(client: Client, conformance_dir: Path, shared_data: Path,
                                                 tmp_path: Path) -> None:
    """Three increments (a star, a second star, a re-reduction of the first at its path, a retirement) against one
    release of the final inputs from scratch: the same tables, row for row, except the computation times."""
    model = conformance_dir / "apogee_small"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    giant, dwarf = Path(shutil.copy(shared_data / GIANT, inputs / "giant.fits")), inputs / "dwarf.fits"
    boss = Path(shutil.copy(shared_data / "boss/spec-3586-55181-0500.fits", inputs / "spec.fits"))
    shutil.copy(shared_data / DWARF, dwarf)
    store_path, out = tmp_path / "store", tmp_path / "out"
    release(client, store_path, [dwarf], model, out)
    release(client, store_path, [giant, boss], model, out)
    rereduced(shared_data / DWARF, dwarf, 3.0)
    release(client, store_path, [dwarf], model, out)
    assert main(["store", "retire", str(store_path), str(boss)]) == 0
    release(client, store_path, [], model, out)

    scratch_out = tmp_path / "scratch-out"
    release(client, tmp_path / "scratch-store", [dwarf, giant], model, scratch_out)
    for stem in (STARS, VISITS):
        incremental, scratch = read_table(out, stem), read_table(scratch_out, stem)
        key = incremental["spectrum_id"].argsort()
        pd.testing.assert_frame_equal(incremental.iloc[key].reset_index(drop=True).drop(columns=TIMESTAMPS),
                                      scratch.iloc[scratch["spectrum_id"].argsort()].reset_index(drop=True).drop(
                                          columns=TIMESTAMPS), obj=stem)
    assert np.isfinite(read_table(out, STARS)["teff"]).all()
