"""SpectrumStore and ingest on real files: layout, values, idempotency, rejects, Dask parity, conflicts, CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from catalogbuilder.cli import main
from catalogbuilder.constants import APOGEE_NPIX, OPTICAL_NPIX, grid_wavelength
from catalogbuilder.readers import read_spectra
from catalogbuilder.store import SpectrumStore, StoreConflictError, StoreError, expand_inputs
from catalogbuilder.store.resample import to_model_grid

APSTAR_3VISITS = "apogee/apStar-dr17-2M17335483-2753043.fits"
APSTAR_1VISIT = "apogee/apStar-dr17-2M19485057+5005279.fits"
BOSS_FILES = ("boss/spec-3586-55181-0500.fits", "boss/spec-0266-51602-0031.fits")
LAMOST_DR7 = "lamost/laspec/spec-58397-EG014118N254444M01_sp03-031.fits"
LAMOST_DR6 = "lamost/laspec/spec-57287-KP193637N444141V03_sp10-161.fits.gz"
LAMOST_DR1 = tuple(
    f"lamost/dr1_learninglamost/spec-55862-B6212_sp06-{n}.fits" for n in ("072", "129", "107", "117", "055", "011")
)
INITIAL = (APSTAR_3VISITS, APSTAR_1VISIT, *BOSS_FILES, LAMOST_DR7, LAMOST_DR6, *LAMOST_DR1[:4])


def distinct_copy(source: Path, target: Path) -> Path:
    """A valid copy of a FITS file with different bytes (one extra primary-header card)."""
    with fits.open(source) as hdul:
        hdul[0].header["CBCOPY"] = (target.name, "test copy with distinct bytes")
        hdul.writeto(target)
    return target


def column(dataset, name: str) -> list:
    return [str(v) if isinstance(v, (str, np.str_)) else v for v in dataset[name].values.tolist()]


def rows_of(dataset, name: str, value: object):
    """The spectra of ``dataset`` whose coordinate ``name`` equals ``value``, loaded."""
    return dataset.isel(spectrum=[i for i, v in enumerate(column(dataset, name)) if v == value]).load()


@pytest.fixture(scope="module")
def ingested(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SpectrumStore, object]:
    """A store holding INITIAL (serial ingest) and its report."""
    store = SpectrumStore.open(tmp_path_factory.mktemp("store") / "spectra", create=True)
    report = store.ingest([shared_data / name for name in INITIAL], progress=False)
    return store, report


def test_layout_counts_and_grids(ingested, shared_data: Path) -> None:
    store, report = ingested
    visits = [fits.getheader(shared_data / name)["NVISITS"] for name in (APSTAR_3VISITS, APSTAR_1VISIT)]
    assert visits == [3, 1]
    apogee, optical = store.dataset("apogee"), store.dataset("optical")
    # apStar: two combined rows per file (the NVISITS=1 file keeps its all-zero second row), then one row per visit
    # when there is more than one visit
    assert apogee.sizes == {"spectrum": 2 * 2 + sum(n for n in visits if n > 1), "pixel": APOGEE_NPIX}
    assert optical.sizes == {"spectrum": len(INITIAL) - 2, "pixel": OPTICAL_NPIX}
    assert report.added == {"apogee": 7, "optical": 8} and report.rejected == [] and report.files_added == len(INITIAL)
    info = store.info()
    assert info["grids"]["apogee"]["by_survey_kind"] == {"apogee/combined": 2, "apogee/combined-alt": 2,
                                                         "apogee/visit": 3}
    assert info["grids"]["optical"]["by_survey_kind"] == {"boss/combined": 2, "lamost/combined": 6}
    assert info["total_spectra"] == info["active_spectra"] == 15
    assert info["files"] == {"active": len(INITIAL)} and info["snapshots"] == 2
    np.testing.assert_array_equal(apogee["wavelength"].values, grid_wavelength("apogee"))
    np.testing.assert_array_equal(optical["wavelength"].values, grid_wavelength("optical").astype(np.float64))
    assert apogee["flux"].dtype == apogee["error"].dtype == np.float32
    assert apogee["mask"].dtype == np.uint16 and optical["mask"].dtype == np.uint32  # narrowest type for the bits
    assert apogee["flux"].encoding["chunks"] == (256, APOGEE_NPIX) and apogee["ra"].encoding["chunks"] == (4096,)
    assert store.check() == []


def test_coordinates_come_from_headers(ingested, shared_data: Path) -> None:
    store, _ = ingested
    apogee, optical = store.dataset("apogee"), store.dataset("optical")
    header = fits.getheader(shared_data / APSTAR_3VISITS)
    rows = rows_of(apogee, "source_id", header["OBJID"])
    assert column(rows, "row") == [0, 1, 2, 3, 4] and column(rows, "visit") == [0, 0, 1, 2, 3]
    assert column(rows, "kind") == ["combined", "combined-alt"] + ["visit"] * 3
    np.testing.assert_allclose(rows["ra"].values, header["RA"]) and np.testing.assert_allclose(
        rows["dec"].values, header["DEC"]
    )
    np.testing.assert_allclose(rows["tmass_j"].values, header["J"]) and np.testing.assert_allclose(
        rows["e_tmass_h"].values, header["H_ERR"]
    )
    sha = rows["file_sha256"].values[0]
    assert column(rows, "spectrum_id") == [f"apogee-{sha[:16]}-{row}" for row in range(5)]
    assert column(rows, "file_path") == [str(shared_data / APSTAR_3VISITS)] * 5
    lamost_header = fits.getheader(shared_data / LAMOST_DR7)
    lamost = rows_of(optical, "file_path", str(shared_data / LAMOST_DR7))
    np.testing.assert_allclose(lamost["ra"].values, [lamost_header["RA"]])
    np.testing.assert_allclose(lamost["dec"].values, [lamost_header["DEC"]])
    assert np.isnan(lamost["tmass_k"].values).all()  # no 2MASS in LAMOST headers: NaN, not a fake value
    assert len(set(column(optical, "ingest_time"))) == 1


def test_stored_flux_is_the_resampled_reader_output(ingested, shared_data: Path) -> None:
    store, _ = ingested
    optical = store.dataset("optical")
    for name in (BOSS_FILES[1], LAMOST_DR1[0]):
        (spectrum,) = read_spectra(shared_data / name)
        flux, error, mask = to_model_grid(spectrum)
        stored = rows_of(optical, "file_path", str(shared_data / name))
        np.testing.assert_array_equal(stored["flux"].values[0], flux)
        np.testing.assert_array_equal(stored["error"].values[0], error)
        np.testing.assert_array_equal(stored["mask"].values[0].astype(np.int64), mask)


def test_stored_flux_reproduces_the_conformance_model_input(ingested, shared_data: Path, conformance_dir: Path) -> None:
    from catalogbuilder.models.preprocess import log_scale_flux

    store, _ = ingested
    for grid, config in (("apogee", "apogee_small"), ("optical", "boss_small")):
        vectors = np.load(conformance_dir / config / "vectors.npz")
        dataset = store.dataset(grid)
        paths, rows = column(dataset, "file_path"), column(dataset, "row")
        names = [f"{Path(path).relative_to(shared_data)}[{row}]" for path, row in zip(paths, rows)]
        checked = 0
        for reference, model_input in zip(vectors["names"], vectors["model_input"]):
            if str(reference) in names:
                stored = dataset["flux"].values[names.index(str(reference))]
                np.testing.assert_allclose(log_scale_flux(stored[None]).numpy()[0], model_input, rtol=0, atol=1e-6)
                checked += 1
        assert checked == (7 if grid == "apogee" else 8)


def test_reingest_is_idempotent_and_new_files_add_only_their_rows(ingested, shared_data: Path, tmp_path: Path) -> None:
    store, _ = ingested
    before = store.snapshot_id
    again = store.ingest([shared_data / name for name in INITIAL], progress=False)
    assert again.spectra_added == 0 and again.snapshot_id is None and store.snapshot_id == before
    assert len(again.skipped) == len(INITIAL) and again.spectra_skipped == 15
    # same bytes under another path: skipped and reported
    moved = shutil.copy(shared_data / LAMOST_DR1[0], tmp_path / "renamed.fits")
    report = store.ingest([moved, shared_data / LAMOST_DR1[4]], progress=False)
    assert report.same_bytes_other_path == [(str(moved), str(shared_data / LAMOST_DR1[0]))]
    assert report.added == {"apogee": 0, "optical": 1} and report.files_added == 1
    optical = store.dataset("optical")
    assert optical.sizes["spectrum"] == 9 and column(optical, "file_path")[-1] == str(shared_data / LAMOST_DR1[4])
    assert store.at(before).dataset("optical").sizes["spectrum"] == 8  # time travel to the earlier commit
    assert store.check() == []


def broken_inputs(shared_data: Path, folder: Path) -> dict[str, Path]:
    """Broken files built from real ones: truncated, garbage, all-NaN flux, and a missing path."""
    raw = (shared_data / BOSS_FILES[0]).read_bytes()
    truncated = folder / "truncated.fits"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = folder / "garbage.fits"
    garbage.write_bytes(np.random.default_rng(7).bytes(50_000))
    all_nan = folder / "all_nan.fits"
    with fits.open(shared_data / LAMOST_DR1[5]) as hdul:
        hdul[0].data[0] = np.nan
        hdul.writeto(all_nan)
    zero_ivar = folder / "zero_ivar.fits"
    with fits.open(shared_data / LAMOST_DR1[5]) as hdul:
        hdul[0].data[1] = 0.0  # DR1 row 1 is the inverse variance
        hdul.writeto(zero_ivar)
    return {
        "truncated": truncated,
        "garbage": garbage,
        "all_nan": all_nan,
        "zero_ivar": zero_ivar,
        "missing": folder / "missing.fits",
    }


def test_bad_files_are_rejected_and_the_run_goes_on(shared_data: Path, tmp_path: Path) -> None:
    broken = broken_inputs(shared_data, tmp_path)
    good = shared_data / LAMOST_DR1[5]
    originals = {name: path.read_bytes() for name, path in broken.items() if path.exists()}
    store = SpectrumStore.open(tmp_path / "store", create=True)
    report = store.ingest(
        [broken["truncated"], good, broken["garbage"], broken["all_nan"], broken["zero_ivar"], broken["missing"]],
        progress=False,
    )
    assert report.added == {"apogee": 0, "optical": 1}
    reasons = dict(report.rejected)
    assert set(reasons) == {str(path) for path in broken.values()}
    assert "truncated" in reasons[str(broken["truncated"])].lower()
    assert "cannot read file" in reasons[str(broken["missing"])]
    assert all(reason for reason in reasons.values())
    rejects = store.rejects()
    assert len(rejects) == 5 and set(rejects["status_name"]) == {"current"}
    assert set(rejects.loc[rejects["file_path"] != str(broken["missing"]), "file_sha256"].str.len()) == {64}
    assert dict(zip(rejects["file_path"], rejects["survey"]))[str(broken["zero_ivar"])] == "lamost"  # as recognised
    assert {name: broken[name].read_bytes() for name in originals} == originals  # inputs never modified
    # a file of another survey than asked for is rejected too
    wrong = store.ingest([shared_data / BOSS_FILES[0]], survey="lamost", progress=False)
    assert wrong.spectra_added == 0 and "not lamost" in dict(wrong.rejected)[str(shared_data / BOSS_FILES[0])]
    # ... but that reject was the caller's choice: with the right survey (or auto) the file is read and ingested
    right = store.ingest([shared_data / BOSS_FILES[0]], progress=False)
    assert right.added["optical"] == 1 and str(shared_data / BOSS_FILES[0]) not in set(store.rejects()["file_path"])
    # the same broken bytes again are not re-read; a file fixed later (new bytes, same path) is ingested
    again = store.ingest([broken["garbage"]], progress=False)
    assert again.previously_rejected and again.snapshot_id is None
    broken["garbage"].unlink()
    distinct_copy(shared_data / LAMOST_DR1[3], broken["garbage"])
    fixed = store.ingest([broken["garbage"]], progress=False)
    assert fixed.added["optical"] == 1 and fixed.rejected == []
    assert store.check() == []


def test_dask_ingest_equals_serial_ingest(shared_data: Path, tmp_path: Path) -> None:
    """Worker processes (results pickled back), two ingests under the active client (the second one reads the ledger
    and rejects of an existing store while the client is the default scheduler), same store as a serial run."""
    from distributed import Client, LocalCluster

    files = [shared_data / name for name in INITIAL] + [tmp_path / "garbage.fits"]
    files[-1].write_bytes(b"SIMPLE  = not really a FITS file")
    later = [shared_data / LAMOST_DR1[5], files[0]]
    serial = SpectrumStore.open(tmp_path / "serial", create=True)
    serial.ingest(files, progress=False)
    serial.ingest(later, progress=False)
    parallel = SpectrumStore.open(tmp_path / "dask", create=True)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        report = parallel.ingest(files, client=client, progress=False, batch_size=3)
        again = parallel.ingest(later, client=client, progress=False, batch_size=3)
        info = parallel.info()
    assert report.added == {"apogee": 7, "optical": 8} and len(report.rejected) == 1
    assert again.added == {"apogee": 0, "optical": 1} and again.skipped == [(str(files[0]), str(files[0]))]
    assert info["total_spectra"] == 16
    for grid in ("apogee", "optical"):
        a, b = serial.dataset(grid).load(), parallel.dataset(grid).load()
        assert a.drop_vars("ingest_time").identical(b.drop_vars("ingest_time"))
    assert list(serial.rejects()["reason"]) == list(parallel.rejects()["reason"])


def test_concurrent_commit_is_redone_or_fails_cleanly(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A is overtaken by writer B between its writes and its commit: A's commit conflicts, A redoes its ingest
    on top of B (both sets present); with one attempt only A fails with StoreConflictError and B's state is intact."""
    path = tmp_path / "store"
    SpectrumStore.open(path, create=True).ingest([shared_data / LAMOST_DR1[0]], progress=False)
    a_files, b_files = [shared_data / LAMOST_DR1[1]], [shared_data / LAMOST_DR1[2]]
    from catalogbuilder.store import writer as writer_module

    writer_a = SpectrumStore.open(path)
    original_lock = writer_module.commit_lock
    overtaken: list[str] = []

    def lock_after_b_commits(store_path: Path):
        if not overtaken:  # writer A is about to commit: B commits first (its own commit takes the lock normally)
            overtaken.append("")
            overtaken[0] = SpectrumStore.open(path).ingest(b_files, progress=False).snapshot_id
        return original_lock(store_path)

    monkeypatch.setattr(writer_module, "commit_lock", lock_after_b_commits)
    report = writer_a.ingest(a_files, progress=False)
    assert report.attempts == 2 and report.added["optical"] == 1
    assert [snapshot.parent_id for snapshot in writer_a.snapshots()[:1]] == overtaken
    assert sorted(writer_a.files()["file_path"]) == sorted(
        str(p) for p in [shared_data / LAMOST_DR1[0], *a_files, *b_files]
    )
    assert writer_a.check() == []

    overtaken.clear()
    b_files = [shared_data / LAMOST_DR1[3]]
    with pytest.raises(StoreConflictError, match="nothing from this run was committed"):
        writer_a.ingest([shared_data / LAMOST_DR1[4]], progress=False, max_attempts=1)
    assert writer_a.snapshot_id == overtaken[0] and writer_a.check() == []
    assert str(shared_data / LAMOST_DR1[4]) not in set(writer_a.files()["file_path"])


def test_expand_inputs_lists_and_directories(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# nightly\n{shared_data / BOSS_FILES[0]}\n\n{shared_data / 'lamost/laspec'}\n")
    monkeypatch.chdir(shared_data)
    inputs = expand_inputs([f"@{listing}", BOSS_FILES[0], "lamost/laspec"])
    laspec = sorted(str(p) for p in (shared_data / "lamost/laspec").iterdir() if p.name.endswith((".fits", ".fits.gz")))
    assert inputs.paths == [str(shared_data / BOSS_FILES[0]), *laspec] and inputs.subfolders == []


def test_open_refuses_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a spectrum store"):
        SpectrumStore.open(tmp_path, create=True)
    with pytest.raises(StoreError, match="no spectrum store"):  # only the ingest creates stores
        SpectrumStore.open(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(StoreError, match="is a file"):
        SpectrumStore.open(tmp_path / "data.txt")
    assert SpectrumStore.open(tmp_path / "new", create=True).dataset("apogee") is None


def test_cli_ingest_and_info(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "files.txt"
    garbage = tmp_path / "bad.fits"
    garbage.write_bytes(b"\0" * 2880)
    listing.write_text("\n".join([str(shared_data / APSTAR_1VISIT), str(garbage)]))
    store = tmp_path / "store"
    assert main(["ingest", "--store", str(store), "--no-progress", f"@{listing}", str(shared_data / LAMOST_DR7)]) == 0
    out = capsys.readouterr().out
    assert "added 3 spectra (apogee 2, optical 1) from 2 files" in out and f"{garbage}:" in out
    assert main(["ingest", "--store", str(store), "--no-progress", str(shared_data / LAMOST_DR7)]) == 0
    assert "skipped 1 files (1 spectra) already present" in capsys.readouterr().out
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "apogee/combined" in out and "3 spectra (3 active); files: 2 active; 1 current rejects" in out
    assert main(["store", "check", str(store)]) == 0 and "consistent" in capsys.readouterr().out
    assert main(["store", "gc", str(store), "--hours", "0", "--dry-run"]) == 0
    assert "would delete 0 chunks" in capsys.readouterr().out  # both ingests committed: nothing is garbage
    assert main(["ingest", "--store", str(tmp_path / "bad.fits"), "--no-progress", str(shared_data / LAMOST_DR7)]) == 2
    assert "is a file, not a spectrum store folder" in capsys.readouterr().err


def test_a_store_that_cannot_be_written_fails_cleanly(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import icechunk

    path = tmp_path / "store"
    SpectrumStore.open(path, create=True).ingest([shared_data / LAMOST_DR1[0]], progress=False)
    before = SpectrumStore.open(path).snapshot_id

    def disk_full(self, *args, **kwargs):
        raise icechunk.IcechunkError("No space left on device")

    monkeypatch.setattr(icechunk.Session, "commit", disk_full)
    assert main(["ingest", "--store", str(path), "--no-progress", str(shared_data / LAMOST_DR1[1])]) == 1
    assert capsys.readouterr().err.strip().endswith(": No space left on device; nothing was committed")
    assert SpectrumStore.open(path).snapshot_id == before and SpectrumStore.open(path).check() == []


def test_appends_are_chunk_aligned_across_batches_and_ingests(
    ingested, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4-spectrum chunks, two ingests (the second one completing the first one's partial last chunk) store
    exactly what one ingest with the default chunking stored, and every write but the last of an ingest is whole
    chunks."""
    from catalogbuilder.store import layout, writer

    reference, first_ingest = ingested
    monkeypatch.setattr(writer, "SPECTRUM_CHUNK", 4)
    monkeypatch.setattr(layout, "SPECTRUM_CHUNK", 4)
    writes: list[tuple[str, int, int]] = []
    write = writer._GridAppender._write

    def recording_write(self, block):
        writes.append((self.grid, self.written, len(block)))
        write(self, block)

    monkeypatch.setattr(writer._GridAppender, "_write", recording_write)
    store = SpectrumStore.open(tmp_path / "store", create=True)
    store.ingest([shared_data / name for name in INITIAL[:5]], progress=False)
    store.ingest([shared_data / name for name in INITIAL[5:]], progress=False)
    assert store.dataset("optical")["flux"].encoding["chunks"] == (4, OPTICAL_NPIX)
    optical_writes = [(start, n) for grid, start, n in writes if grid == "optical"]
    assert optical_writes == [(0, 3), (3, 1), (4, 4)]  # ingest 1: flush 3; ingest 2: fill the chunk, then a whole one
    for grid in ("apogee", "optical"):
        expected, got = reference.at(first_ingest.snapshot_id).dataset(grid).load(), store.dataset(grid).load()
        assert expected.drop_vars("ingest_time").identical(got.drop_vars("ingest_time"))
    assert store.check() == []


def test_a_file_rewritten_between_hashing_and_reading_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    from catalogbuilder.store.ingest import hash_file, load_file

    path = Path(shutil.copy(shared_data / LAMOST_DR1[0], tmp_path / "moving.fits"))
    hashed = hash_file(str(path))
    assert load_file(hashed.path, hashed.sha256, hashed.signature, "auto", "now").reason is None
    os.utime(path, ns=(hashed.signature[1], hashed.signature[1] + 1_000_000_000))  # rewritten one second later
    result = load_file(hashed.path, hashed.sha256, hashed.signature, "auto", "now")
    assert result.blocks == [] and "changed while being ingested" in result.reason


def test_cli_uses_dask_when_asked_or_for_large_inputs() -> None:
    from catalogbuilder.cli import build_parser
    from catalogbuilder.store.cli import SERIAL_MAX_FILES, _wants_cluster

    parser = build_parser()
    plain = parser.parse_args(["ingest", "--store", "s", "a.fits"])
    assert not _wants_cluster(plain, SERIAL_MAX_FILES) and _wants_cluster(plain, SERIAL_MAX_FILES + 1)
    assert _wants_cluster(parser.parse_args(["ingest", "--store", "s", "--workers", "2", "a.fits"]), 1)
    assert _wants_cluster(parser.parse_args(["ingest", "--store", "s", "--address", "tcp://h:8786", "a.fits"]), 1)
    assert not _wants_cluster(
        parser.parse_args(["ingest", "--store", "s", "--serial", "a.fits"]), 10 * SERIAL_MAX_FILES
    )


def test_ingest_of_the_shipped_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs in any clone (no ../shared): every shipped sample file is ingested, apVisit included."""
    import catalogbuilder

    sample = Path(catalogbuilder.__file__).parent / "data" / "sample"
    folders = [str(sample / sub) for sub in ("apogee", "boss", "lamost/dr6_dr7", "lamost/dr1")]
    store = tmp_path / "store"
    assert main(["ingest", "--store", str(store), "--no-progress", *folders]) == 0
    assert "rejected 0 files" in capsys.readouterr().out
    info = SpectrumStore.open(store).info()
    assert info["grids"]["apogee"]["by_survey_kind"] == {"apogee/combined": 1, "apogee/combined-alt": 1,
                                                         "apogee/visit": 1}
    assert info["grids"]["optical"]["by_survey_kind"] == {"boss/combined": 2, "lamost/combined": 10}
    assert info["files"] == {"active": 14} and SpectrumStore.open(store).check() == []
    assert main(["ingest", "--store", str(store), "--no-progress", *folders]) == 0
    assert "added 0 spectra" in capsys.readouterr().out and SpectrumStore.open(store).info()["snapshots"] == 2
