"""kill -9 of an ingest in the middle of appending, and two ingest processes at once: the store is never half-written.

Each test runs the ingest in a subprocess. The first test wraps the store's chunk writer so the child reports every
append on stdout and then blocks, letting the test kill it at a known point (data chunks on disk, no commit); the
second kills it after a random delay; the third runs two writers at the same time.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from catalogbuilder.store import SpectrumStore
from catalogbuilder.store.writer import commit_lock

N_BEFORE, N_CRASH = 3, 48  # LAMOST DR1 files in the store before, and in the ingest that is killed

CHILD = """
import sys, time
import catalogbuilder.store.writer as writer
from catalogbuilder.store import SpectrumStore
store_path, kill_after, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if kill_after:
    writer.SPECTRUM_CHUNK = 4  # append every 4 spectra, so the kill lands between many partial-chunk rewrites
    write = writer._GridAppender._write
    appended = []

    def reporting_write(self, block):
        write(self, block)
        appended.append(len(block))
        print(f"APPENDED {len(appended)}", flush=True)
        if len(appended) == kill_after:
            time.sleep(600)  # the parent kills us here

    writer._GridAppender._write = reporting_write
commit_lock = writer.commit_lock

def announced_lock(path):
    print("COMMITTING", flush=True)
    return commit_lock(path)

writer.commit_lock = announced_lock
report = SpectrumStore.open(store_path, create=True).ingest(files, progress=False)
print("COMMITTED", report.snapshot_id, report.attempts, flush=True)
"""


def start_child(store: Path, files: list[Path], kill_after: int = 0) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CHILD, str(store), str(kill_after), *map(str, files)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def snapshot_state(store: SpectrumStore) -> dict[str, object]:
    """Everything a reader of the store sees: ids, flux, ledger and rejects of the latest commit."""
    state: dict[str, object] = {"snapshot": store.snapshot_id, "files": store.files().astype(str).to_dict("list")}
    dataset = store.dataset("optical")
    state["ids"] = dataset["spectrum_id"].values.tolist()
    state["flux"] = dataset["flux"].values
    state["rejects"] = len(store.rejects())
    return state


def assert_same_state(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["snapshot"] == b["snapshot"] and a["ids"] == b["ids"] and a["files"] == b["files"]
    assert a["rejects"] == b["rejects"]
    np.testing.assert_array_equal(a["flux"], b["flux"])


def chunk_objects(path: Path) -> int:
    """Chunk objects on disk (committed or not)."""
    return sum(1 for _ in (path / "chunks").iterdir())


@pytest.fixture()
def files(shared_data: Path) -> tuple[list[Path], list[Path]]:
    """(files already in the store, files of the ingest that gets killed): real LAMOST DR1 spectra."""
    found = sorted((shared_data / "lamost/dr1_learninglamost").glob("spec-*.fits"))
    assert len(found) >= N_BEFORE + N_CRASH
    return found[:N_BEFORE], found[N_BEFORE : N_BEFORE + N_CRASH]


@pytest.fixture()
def before(files: tuple[list[Path], list[Path]], tmp_path: Path) -> tuple[SpectrumStore, dict[str, object]]:
    """A store holding the first set of files, and its state."""
    store = SpectrumStore.open(tmp_path / "store", create=True)
    store.ingest(files[0], progress=False)
    return store, snapshot_state(store)


def resume_and_check(store: SpectrumStore, files: tuple[list[Path], list[Path]]) -> None:
    """A normal ingest after the crash completes and leaves exactly both file sets, consistent."""
    report = SpectrumStore.open(store.path, create=True).ingest(files[1], progress=False)
    assert report.rejected == []
    assert store.check() == []
    ids = store.dataset("optical")["spectrum_id"].values.tolist()
    assert len(ids) == N_BEFORE + N_CRASH == len(set(ids))
    assert sorted(store.files()["file_path"]) == sorted(str(path) for path in files[0] + files[1])


def test_kill_mid_append_leaves_the_store_as_before(before, files) -> None:
    store, state = before
    objects_before = chunk_objects(store.path)
    child = start_child(store.path, files[1], kill_after=5)
    try:
        lines = []
        while "APPENDED 5" not in lines:
            line = child.stdout.readline()
            assert line, f"child ended early: {child.stderr.read()}"
            lines.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert chunk_objects(store.path) > objects_before  # the child really wrote data chunks before it died
    reopened = SpectrumStore.open(store.path)
    assert reopened.check() == []
    assert_same_state(snapshot_state(reopened), state)
    # what the killed ingest wrote is garbage no snapshot refers to: gc removes exactly that
    removed = reopened.garbage_collect(older_than=datetime.timedelta(0))
    assert removed["chunks_deleted"] > 0 and chunk_objects(store.path) == objects_before
    assert reopened.check() == []
    assert_same_state(snapshot_state(reopened), state)
    resume_and_check(reopened, files)


def test_kill_at_a_random_time_leaves_before_or_complete(before, files) -> None:
    store, state = before
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(1.0, 8.0)
    child = start_child(store.path, files[1])
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    reopened = SpectrumStore.open(store.path)
    assert reopened.check() == [], f"seed {seed}, delay {delay:.2f}s"
    after = snapshot_state(reopened)
    if after["snapshot"] == state["snapshot"]:
        assert_same_state(after, state)
    else:  # the kill came after the commit: the whole ingest is there
        assert after["ids"][:N_BEFORE] == state["ids"] and len(after["ids"]) == N_BEFORE + N_CRASH, f"seed {seed}"
    resume_and_check(reopened, files)


def test_two_ingest_processes_at_once_both_land(before, files) -> None:
    """Two writer processes append to the same arrays at once and reach their commit together (the test holds the
    commit lock until both wait on it): one commits, the other's commit conflicts and it redoes its ingest on top of
    the first. Both file sets end up in the store exactly once; nothing is lost or mixed."""
    store, _ = before
    halves = files[1][: N_CRASH // 2], files[1][N_CRASH // 2 :]
    with commit_lock(store.path):
        children = [start_child(store.path, half) for half in halves]
        for child in children:
            line = child.stdout.readline()
            assert line.strip() == "COMMITTING", child.stderr.read()
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    attempts = sorted(int(out.split()[-1]) for out, _ in outputs)
    assert attempts == [1, 2]  # the second committer redid its ingest once
    reopened = SpectrumStore.open(store.path)
    assert reopened.check() == []
    ids = reopened.dataset("optical")["spectrum_id"].values.tolist()
    assert len(ids) == len(set(ids)) == N_BEFORE + N_CRASH
    assert len(reopened.snapshots()) == 4  # creation, BEFORE, one commit per writer
