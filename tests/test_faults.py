"""Fault injection on real files, as a user meets faults: ``kill -9`` of ``catalogbuilder release`` (a real process)
at several points, a full disk (a real tmpfs) during ingest, inference and release, unreadable inputs (a missing path,
symlink loops, dangling links, a permission error met by a second uid), wrong ``--survey`` choices and
``--retry-rejects``, apStar files with useless error arrays, and usage errors: every fault gets one clear line and a
documented exit status, and nothing published or committed before is lost (issue 12).

The points of issue 12 and where they are shown:

1. release killed or out of space: ``test_kill_9_during_release_*``, ``test_release_on_a_full_disk_*`` (the writer
   alone: tests/test_release_writer.py);
2. wrong ``--survey``, ``--retry-rejects``: ``test_a_wrong_survey_is_retried_and_retry_rejects_reads_again``;
3. and 4. unreadable inputs, folders with dangling/looping links and subfolders:
   ``test_unreadable_inputs_of_another_user_keep_one_row_each`` and the rejects of ``released``;
5. apStar errors all ∞, all 0, all 1e10, or useless in some rows: ``test_useless_apstar_errors_*``;
6. workflow YAML errors (missing ``models:``, ``draws: twenty``, ``radius_arcsec: abc``, ``inference.batch_size: 0``,
   ``seed: 1.5``, ``draws: true``, ``retries: -1``): tests/test_config.py (``BAD_WORKFLOW_LINES``,
   ``test_a_missing_models_key_runs_the_shipped_models_on_their_grids``, ``test_workflows_exit_2_with_the_problem_lines``);
7. usage errors and refused weights: ``test_usage_errors_are_one_line_and_exit_2``;
8. read-only commands create no store: ``test_read_only_commands_and_empty_ingests_create_no_store``;
9. a model named ``../../escape``: tests/test_config.py (``test_*_refuses_an_escaping_model_name*``);
10. a full disk during ``infer``: ``test_infer_on_a_full_disk_is_one_line_and_the_store_stays_consistent``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from distributed import Client, LocalCluster

from catalogbuilder.cli import main
from catalogbuilder.constants import ResultFlag
from catalogbuilder.inference.graph import run_inference
from catalogbuilder.config import SHIPPED_MODELS_DIR
from catalogbuilder.release import assemble
from catalogbuilder.release.build import ReleaseOptions, build_release, read_table
from catalogbuilder.release.writer import COMMIT_NAME, MANIFEST_NAME, STAGING_NAME, read_manifest, verify_release
from catalogbuilder.store import SpectrumStore

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "catalogbuilder/data/sample"
APSTAR = SAMPLE / "apogee/apStar-dr17-2M19485057+5005279.fits"
APVISIT = SAMPLE / "apogee/apVisit-r13-9518-57729-104.fits"
BOSS = SAMPLE / "boss/spec-0266-51602-0031.fits"
LAMOST = sorted((SAMPLE / "lamost/dr1").glob("spec-*.fits"))
MULTI_VISIT_APSTAR = "apogee/apStar-dr17-2M17335483-2753043.fits"  # in ../shared/data: 2 combined rows + 3 visits
MODEL = "anet3-cannon-demo"
STAR_TABLE = f"apogee/{MODEL}/allStar-{MODEL}-apogee"
VISIT_TABLE = f"apogee/{MODEL}/allVisit-{MODEL}-apogee"
USELESS_ERRORS = {"inf": np.inf, "zero": 0.0, "huge": 1e10}  # APOGEE marks bad pixels with errors of 1e10
NO_ERROR_REASON = "no pixel has a usable error"
NO_RESULT, RESULT_UNRELIABLE = int(ResultFlag.NO_RESULT), int(ResultFlag.RESULT_UNRELIABLE)
NOBODY = 65534  # the uid and gid of the second user


# --- helpers ---------------------------------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run ``catalogbuilder ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def cli_workflow(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``workflows/dr19.py ARGV`` run without a cluster (it fails before needing one)."""
    from catalogbuilder import pipeline

    parser = pipeline.build_parser("dr19", "", REPO / "workflows/dr19.yaml")
    capsys.readouterr()
    status = pipeline.main(None, [str(arg) for arg in ["--no-progress", *argv]], parser)  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    """The single line a failed command printed (asserting it is one line and no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file (delete it to free space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
    return filler


def visible_files(out: Path) -> set[str]:
    """Files a reader of the release folder sees (hidden staging and lock files excluded)."""
    return {str(path.relative_to(out)) for path in out.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts)}


def snapshot_of(out: Path) -> dict[str, bytes]:
    return {relative: (out / relative).read_bytes() for relative in visible_files(out)}


def assert_whole_release(out: Path) -> dict:
    """The folder holds exactly one complete release: its manifest (completing a committed publication first), every
    file it lists with its size and SHA-256 and readable as a table, nothing else visible, no committed staging left
    (an uncommitted one, hidden, is discarded by the next run). Returns the manifest."""
    manifest = read_manifest(out)
    assert manifest is not None and verify_release(out) == []
    assert visible_files(out) == set(manifest["files"]) | {MANIFEST_NAME}
    assert not (out / STAGING_NAME / COMMIT_NAME).exists()
    for relative, entry in manifest["files"].items():
        if relative.endswith(".parquet"):
            assert pq.read_table(out / relative).num_rows == entry["rows"]
        elif relative.endswith(".fits.gz"):
            assert len(Table.read(out / relative, hdu=1)) == entry["rows"]
    return manifest


def release_times(out: Path) -> set[str]:
    """The CREATED card (when the release was built) of every visible table, Parquet and FITS: one value unless two
    releases are mixed."""
    times = set()
    for relative in visible_files(out):
        if relative.endswith(".parquet"):
            times.add(json.loads(pq.read_schema(out / relative).metadata[b"catalogbuilder"])["CREATED"])
        elif relative.endswith(".fits.gz"):
            times.add(fits.getheader(out / relative, 1)["CREATED"])
    return times


def with_errors(source: Path, target: Path, rows: dict[int, float] | float) -> Path:
    """A copy of an apStar file whose error image (HDU 2) is ``rows`` everywhere, or ``rows[i]`` in the given rows."""
    with fits.open(source) as hdul:
        error = np.array(hdul[2].data)
        if isinstance(rows, dict):
            for row, value in rows.items():
                error[row] = value
        else:
            error[...] = rows
        hdul[2].data = error
        hdul.writeto(target)
    return target


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """An in-process scheduler with one worker thread (commands attach with ``--address``)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """The sample apStar, apVisit and a BOSS spectrum; apStar files whose errors are useless everywhere; a real
    multi-visit apStar with useless errors in its combined row 0 and its visit row 3 only; a missing path, a symlink
    loop and a dangling link."""
    folder = tmp_path_factory.mktemp("inputs")
    files = {"apstar": APSTAR, "apvisit": APVISIT, "boss": BOSS}
    for name, value in USELESS_ERRORS.items():
        files[name] = with_errors(APSTAR, folder / f"apStar-errors-{name}.fits", value)
    files["partial"] = with_errors(shared_data / MULTI_VISIT_APSTAR, folder / "apStar-partial.fits", {0: 1e10, 3: np.inf})
    files["missing"] = folder / "missing.fits"
    (folder / "loop-b.fits").symlink_to(folder / "loop-a.fits")
    (folder / "loop-a.fits").symlink_to(folder / "loop-b.fits")
    files["loop"] = folder / "loop-a.fits"
    (folder / "dangling.fits").symlink_to(folder / "gone.fits")
    files["dangling"] = folder / "dangling.fits"
    return files


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path], client: Client) -> tuple[Path, Path]:
    """(store, release): every input ingested, the apogee spectra predicted (2 draws), released."""
    root = tmp_path_factory.mktemp("released")
    store = SpectrumStore.open(root / "store", create=True)
    report = store.ingest(list(inputs.values()), progress=False)
    assert len(report.rejected) == 6 and report.added == {"apogee": 2 + 1 + 5, "optical": 1}
    run_inference(client, store, MODEL, draws=2, progress=False)
    build_release(store, root / "release", ReleaseOptions())
    return root / "store", root / "release"


# --- 5. apStar files with useless errors -------------------------------------------------------------------------------
def test_useless_apstar_errors_are_rejects_listed_as_no_result(inputs: dict[str, Path], released: tuple[Path, Path]
                                                               ) -> None:
    store, out = released
    rejects = SpectrumStore.open(store).rejects().set_index("file_path")
    stars = read_table(out, STAR_TABLE).set_index("file")
    for name in USELESS_ERRORS:
        path = str(inputs[name])
        assert rejects.loc[path, "reason"].startswith(NO_ERROR_REASON) and rejects.loc[path, "survey"] == "apogee"
        row = stars.loc[path]
        assert row["status"] == "no_result" and row["result_flags"] & NO_RESULT and row["flag_bad"]
        assert np.isnan(row["teff"]) and NO_ERROR_REASON in row["reason"]


def test_useless_apstar_errors_in_some_rows_make_those_rows_unreliable(inputs: dict[str, Path],
                                                                       released: tuple[Path, Path]) -> None:
    out = released[1]
    rows = pd.concat([read_table(out, STAR_TABLE), read_table(out, VISIT_TABLE)], ignore_index=True)
    rows = rows.loc[rows["file"] == str(inputs["partial"])].set_index("row").sort_index()
    assert list(rows.index) == [0, 2, 3, 4] and (rows["status"] == "ok").all()  # row 1 (combined-alt) is not released
    useless = rows.index.isin([0, 3])
    assert (rows.loc[useless, "good_pixel_fraction"] == 0).all() and (rows.loc[~useless, "good_pixel_fraction"] > 0.8).all()
    unreliable = (rows["result_flags"] & RESULT_UNRELIABLE) != 0
    assert unreliable[useless].all() and rows.loc[useless, "flag_bad"].all()
    assert not unreliable[~useless].any()  # the same file's rows with usable errors are not flagged for it


# --- 3. unreadable inputs: one row each ---------------------------------------------------------------------------------
def test_each_unreadable_input_is_its_own_release_row(inputs: dict[str, Path], released: tuple[Path, Path]) -> None:
    out = released[1]
    unreadable = {str(inputs[name]) for name in ("missing", "loop", "dangling")}
    rows = read_table(out, f"unknown/{MODEL}/allStar-{MODEL}-unknown")
    rows = rows.loc[rows["file"].isin(unreadable)]
    assert set(rows["file"]) == unreadable and rows["spectrum_id"].is_unique
    assert (rows["status"] == "no_result").all() and (rows["result_flags"] & NO_RESULT).all()
    assert any("Too many levels of symbolic links" in reason for reason in rows["reason"])


# --- 1. the release command killed or out of space -----------------------------------------------------------------------
def release_argv(store: Path, out: Path, *options: str) -> list[str]:
    """A second release of the same store that rewrites every file (another flag threshold, hence other values)."""
    return ["release", "--store", str(store), "--out", str(out), "--no-progress", "--threshold", "snr_min=5", *options]


def run_killed(kill_at: str, argv: list[str], out: Path) -> subprocess.CompletedProcess:
    """``catalogbuilder ARGV`` in a new process that SIGKILLs itself at ``kill_at`` (tests/release_writer_child.py):
    before the commit point: ``gzip`` inside the gzip stream of a FITS table, ``commit`` with every file staged; after
    it: ``move-2`` with one file moved into place, ``manifest`` with every file but ``manifest.json`` in place."""
    code = ("import sys; from pathlib import Path; import release_writer_child as child; from catalogbuilder.cli import "
            "main; child.arm(sys.argv[1], Path(sys.argv[2])); sys.exit(main(sys.argv[3:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, kill_at, str(out), *argv], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["gzip", "commit", "move-2", "manifest"])
def test_kill_9_during_release_leaves_one_whole_release(released: tuple[Path, Path], tmp_path: Path,
                                                        kill_at: str) -> None:
    store, first = released
    out = Path(shutil.copytree(first, tmp_path / "release"))
    before, old = snapshot_of(out), assert_whole_release(out)
    killed = run_killed(kill_at, release_argv(store, out), out)
    assert killed.returncode == -9, killed.stderr
    assert (out / STAGING_NAME).exists()  # the killed run got as far as staging
    if kill_at in ("gzip", "commit"):  # before the commit point: the previous release, byte for byte
        assert snapshot_of(out) == before and assert_whole_release(out) == old
    else:  # after it: a reader completes the publication first and sees the new release, whole
        assert assert_whole_release(out)["commit"] != old["commit"]
    assert len(release_times(out)) == 1  # never a mix of the two releases
    status = main(release_argv(store, out))  # the next run discards or has completed the interrupted one
    assert status == 0 and assert_whole_release(out)["commit"] != old["commit"] and len(release_times(out)) == 1
    assert not (out / STAGING_NAME).exists()


def test_release_on_a_full_disk_is_one_line_and_keeps_the_previous_release(
        released: tuple[Path, Path], tmpfs, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    disk = tmpfs("24m")
    store = Path(shutil.copytree(released[0], disk / "store"))
    out = Path(shutil.copytree(released[1], disk / "release"))
    before = snapshot_of(out)
    filler = fill(disk)
    # a new cross-match radius: the store's cross-match cache cannot be written
    status, _, err = cli(capsys, *release_argv(store, out, "--radius", "2"))
    assert status == 1 and "No space left on device" in one_line(err) and "nothing was published" in err
    # the same cross-match: the release's own files cannot be staged
    status, _, err = cli(capsys, *release_argv(store, out))
    assert status == 1 and "No space left on device" in one_line(err) and "previous release is unchanged" in err
    assert snapshot_of(out) == before and assert_whole_release(out)
    filler.unlink()
    status, _, err = cli(capsys, *release_argv(store, out, "--radius", "2"))
    assert status == 0, err
    assert snapshot_of(out) != before and assert_whole_release(out) and len(release_times(out)) == 1


# --- a full disk during ingest and inference -------------------------------------------------------------------------------
def test_ingest_on_a_full_disk_is_one_line_and_commits_nothing(tmpfs, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:  # noqa: ANN001
    disk = tmpfs("8m")
    store = disk / "store"
    assert cli(capsys, "ingest", "--store", store, "--no-progress", APVISIT)[0] == 0
    snapshot = SpectrumStore.open(store).snapshot_id
    filler = fill(disk)
    status, _, err = cli(capsys, "ingest", "--store", store, "--no-progress", APSTAR, BOSS)
    assert status == 1 and one_line(err).endswith("No space left on device (os error 28); nothing was committed")
    assert SpectrumStore.open(store).snapshot_id == snapshot
    assert cli(capsys, "store", "check", store)[0] == 0
    # the workflow says the same in one line (exit 1), after its models were checked
    status, _, err = cli_workflow(capsys, "--store", store, "--output", disk / "release", "--inputs", APSTAR)
    assert status == 1 and one_line(err).startswith("dr19: cannot write to spectrum store")
    filler.unlink()
    status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", APSTAR, BOSS)
    assert status == 0 and "added 3 spectra (apogee 2, optical 1)" in out
    assert cli(capsys, "store", "check", store)[0] == 0


def test_infer_on_a_full_disk_is_one_line_and_the_store_stays_consistent(
        released: tuple[Path, Path], client: Client, tmpfs, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    disk = tmpfs("24m")
    store = Path(shutil.copytree(released[0], disk / "store"))
    address = client.scheduler.address
    infer = ["infer", "--store", store, "--model", "bossnet-lamost-demo", "--draws", "2", "--retries", "0",
             "--no-progress", "--address", address]
    filler = fill(disk)
    status, _, err = cli(capsys, *infer)
    line = one_line(err)
    assert status == 1 and "cannot write results" in line and "No space left on device" in line
    assert cli(capsys, "store", "check", store)[0] == 0
    assert SpectrumStore.open(store).results.read("bossnet-lamost-demo").empty
    filler.unlink()
    status, out, err = cli(capsys, *infer)
    assert status == 0 and "1 ok" in out, err
    assert list(SpectrumStore.open(store).results.read("bossnet-lamost-demo")["status"]) == ["ok"]


# --- 2. a wrong --survey, --retry-rejects ---------------------------------------------------------------------------------
def test_a_wrong_survey_is_retried_and_retry_rejects_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", "--survey", "lamost", APVISIT)
    assert status == 0 and "rejected 1 files" in out and "not lamost" in out
    status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", "--survey", "apogee-visit", APVISIT)
    assert status == 0 and "added 1 spectra" in out  # the caller's choice did not stick
    assert SpectrumStore.open(store).rejects().empty
    # an I/O error while reading (e.g. a network file system) is recorded with the file's checksum, so it sticks ...
    from catalogbuilder.store import ingest

    def unreadable(path: str, survey: str = "auto") -> list:
        raise OSError(errno.EIO, "Input/output error", path)

    with monkeypatch.context() as patch:
        patch.setattr(ingest, "read_spectra", unreadable)
        status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", BOSS)
    assert status == 0 and "Input/output error" in out
    status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", BOSS)
    assert status == 0 and "skipped 1 files rejected before" in out and "no new snapshot" in out
    # ... until --retry-rejects reads it again
    status, out, _ = cli(capsys, "ingest", "--store", store, "--no-progress", "--retry-rejects", BOSS)
    assert status == 0 and "added 1 spectra (apogee 0, optical 1)" in out
    rejects = SpectrumStore.open(store).rejects(current_only=False)
    assert list(rejects["status_name"]) == ["resolved", "resolved"] and list(rejects["sticky"]) == [False, True]


# --- 3. and 4. unreadable inputs of another user, folders with bad links -------------------------------------------------
CHILD_AS_NOBODY = """
import json, os, sys, tempfile
from catalogbuilder.cli import main
store, inputs = sys.argv[1], sys.argv[2:]
with tempfile.TemporaryDirectory() as warm:  # import everything the ingest needs while this process may read /root
    main(["ingest", "--store", warm + "/store", "--no-progress", inputs[-1]])
if os.geteuid() == 0:
    os.setgroups([]); os.setgid({uid}); os.setuid({uid})
print(json.dumps([main(["ingest", "--store", store, "--no-progress", *inputs]) for _ in range(2)]))
"""


@pytest.mark.slow
def test_unreadable_inputs_of_another_user_keep_one_row_each() -> None:
    """As a second user (uid 65534; root reads any file): a folder holding a good file, a file it may not read, a
    dangling link, a link loop and a subfolder, plus a missing path and a loop given explicitly; ingested twice."""
    work = Path(tempfile.mkdtemp(prefix="catalogbuilder-faults-"))
    try:
        os.chmod(work, 0o755)
        folder = work / "night"
        (folder / "calibrations").mkdir(parents=True)
        shutil.copy(LAMOST[0], folder / "good.fits")
        shutil.copy(LAMOST[1], folder / "private.fits")
        os.chmod(folder / "private.fits", 0)
        (folder / "dangling.fits").symlink_to(work / "gone.fits")
        (folder / "loop.fits").symlink_to(folder / "loop.fits")
        (work / "store").mkdir(mode=0o777)
        os.chmod(work / "store", 0o777)
        given = [folder, work / "missing.fits", folder / "loop.fits", folder / "good.fits"]
        done = subprocess.run([sys.executable, "-c", CHILD_AS_NOBODY.format(uid=NOBODY), str(work / "store"),
                               *map(str, given)], capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0]
        first, second = done.stdout.split(f"store {work / 'store'}:")[1:]
        assert "1 subfolders of input folders not searched" in first and "rejected 4 files" in first
        assert "rejected 0 files" in second and "4 files still unreadable" in second and "no new snapshot" in second
        store = SpectrumStore.open(work / "store")
        assert len(store.snapshots()) == 2  # the empty repository and the first ingest: the rerun made none
        rejects = store.rejects(current_only=False)
        reasons = dict(zip(rejects["file_path"], rejects["reason"]))
        assert reasons == {
            str(folder / "dangling.fits"): "cannot read file: No such file or directory",
            str(folder / "loop.fits"): "cannot read file: Too many levels of symbolic links",
            str(folder / "private.fits"): "cannot read file: Permission denied",
            str(work / "missing.fits"): "cannot read file: No such file or directory",
        }
        assert assemble.reject_rows(store.rejects())["spectrum_id"].is_unique  # one release row each
        assert list(store.files()["file_path"]) == [str(folder / "good.fits")]
    finally:
        shutil.rmtree(work)


# --- 7. usage errors: one line, exit 2 ---------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this would run a shell command creating ``witness``."""

    def __init__(self, witness: Path) -> None:
        self.witness = witness

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.witness}",)


def pickled_payload_model(source: Path, folder: Path, weights: str, witness: Path) -> Path:
    """A copy of a shipped model whose weights file holds a pickled call (refused by ``torch.load(weights_only)``)."""
    import torch

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model_chunk_*", "weights.pt"))
    with open(folder / weights, "wb") as handle:
        torch.save({"payload": Exploit(witness)}, handle)
    return folder


def test_usage_errors_are_one_line_and_exit_2(released: tuple[Path, Path], client: Client, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store, release = released
    a_file, a_folder = tmp_path / "table.parquet", tmp_path / "folder"
    a_file.write_text("keep me")
    a_folder.mkdir()
    witness = tmp_path / "payload-ran"
    spectral = pickled_payload_model(SHIPPED_MODELS_DIR / MODEL, tmp_path / "spectral", "model.pt", witness)
    photometric = pickled_payload_model(SHIPPED_MODELS_DIR / "sos-photometric-demo", tmp_path / "photometric",
                                        "weights.pt", witness)
    results_before = sorted(str(path) for path in (store / "results").rglob("*"))
    sources = tmp_path / "sources.csv"
    pd.DataFrame({"object_id": ["a"], "ra": [10.0], "dec": [-5.0], "tmass_j": [10.9], "tmass_h": [10.4],
                  "tmass_k": [10.3], "phot_g_mean_mag": [12.3], "parallax": [0.5], "parallax_error": [0.03]}
                 ).to_csv(sources, index=False)
    cases = {
        ("release", "--store", store, "--out", a_file): f"{a_file.name} is a file, not a folder",
        ("release", "--store", a_file, "--out", tmp_path / "r"): "is a file, not a spectrum store folder",
        ("infer", "--store", a_file, "--model", MODEL): "is a file, not a spectrum store folder",
        ("infer", "--store", tmp_path / "typo", "--model", MODEL): "no spectrum store at",
        ("crossmatch", "--store", store, "--out", a_folder): "folder is a folder, not a file",
        ("infer", "--store", store, "--model", spectral, "--address", client.scheduler.address):
            "not a loadable torch state_dict (UnpicklingError: Trying to load unsupported GLOBAL posix.system",
        ("infer", "--store", store, "--model", tmp_path / "no-such-model", "--address", client.scheduler.address):
            "no model directory",
        ("photometric", "--input", sources, "--model", photometric, "--out", tmp_path / "p"):
            "not a loadable torch state_dict (UnpicklingError: Trying to load unsupported GLOBAL posix.system",
    }
    for argv, message in cases.items():
        status, _, err = cli(capsys, *argv)
        assert status == 2 and message in one_line(err), (argv, err)
    assert a_file.read_text() == "keep me" and list(a_folder.iterdir()) == [] and not witness.exists()
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists() and not (tmp_path / "typo").exists()
    assert sorted(str(path) for path in (store / "results").rglob("*")) == results_before
    assert assert_whole_release(release)


# --- 8. read-only commands and empty ingests create no store ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["release", "--store", "{typo}", "--out", "{tmp}/release"],
    ["crossmatch", "--store", "{typo}", "--out", "{tmp}/matches.parquet"],
    ["infer", "--store", "{typo}", "--model", MODEL],
    ["store", "info", "{typo}"], ["store", "check", "{typo}"], ["store", "gc", "{typo}"],
    ["store", "retire", "{typo}", str(APSTAR)],
    ["ingest", "--store", "{typo}", "{tmp}/empty"], ["ingest", "--store", "{typo}", "@{tmp}/empty.txt"],
])
def test_read_only_commands_and_empty_ingests_create_no_store(argv: list[str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# no files tonight\n")
    typo = tmp_path / "stroe"
    status, out, err = cli(capsys, *(arg.format(typo=typo, tmp=tmp_path) for arg in argv))
    assert status == 2 and out == "" and one_line(err)
    assert not typo.exists() and not (tmp_path / "release").exists() and not (tmp_path / "matches.parquet").exists()
