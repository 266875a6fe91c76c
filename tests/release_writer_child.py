"""Child process of the crash tests in test_release_writer.py: publishes release VERSION (1 or 2) of a small release
into OUT, optionally killing itself with SIGKILL at KILL_AT, a point of the publication:

  gzip      inside the gzip stream of the streamed FITS table (before the commit point)
  commit    just before the commit record is written
  move-2    after the first file has been moved into place (after the commit point)
  delete    during the deletions of the roll-forward
  manifest  just before manifest.json is moved into place
  none      do not kill

Release 1: parts 000, 001, 002 of table ``t/parts``, ``t/all.fits.gz`` streamed from them, ``summary.json``.
Release 2: replaces part 001, adds 003, deletes 002 (000 stays from release 1), rewrites the FITS and the summary.
Every row and file carries the version that wrote it, so a mix of the two releases is visible.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from catalogbuilder.release import writer
from catalogbuilder.release.schema import ColumnSpec, to_table

ROWS_PER_PART = 2_000
BATCH_ROWS = 300
COLUMNS = (
    ColumnSpec("part", "str", "", "partition key"),
    ColumnSpec("index", "int64", "", "row index in the part"),
    ColumnSpec("version", "int64", "", "release that wrote the row"),
    ColumnSpec("teff", "float64", "K", "effective temperature"),
    ColumnSpec("logg", "float64", "dex", "surface gravity"),
    ColumnSpec("gaia_source_id", "Int64", "", "Gaia id or null"),
    ColumnSpec("note", "str", "", "free text, not always ASCII"),
)
PARTS = {1: (["000", "001", "002"], []), 2: (["001", "003"], ["002"])}  # version -> (parts written, parts deleted)


def part_table(key: str, version: int):
    """Rows of one part: deterministic values that depend on the part and the version."""
    rng = np.random.default_rng(int(key) * 10 + version)
    index = np.arange(ROWS_PER_PART)
    frame = pd.DataFrame({
        "part": key, "index": index, "version": version, "teff": rng.uniform(3000, 9000, ROWS_PER_PART),
        "logg": rng.uniform(0, 5, ROWS_PER_PART),
        "gaia_source_id": pd.array(np.where(index % 7 == 0, None, 4_000_000_000_000_000_000 + index), dtype="Int64"),
        "note": [f"v{version} Å row {i}" if i % 11 == 0 else f"v{version} row {i}" for i in index],
    })
    return to_table(frame, COLUMNS, {"RELVER": (version, "release version")})


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill_at: str, out: Path) -> None:
    """Patch the publication so that this process is killed at ``kill_at``."""
    if kill_at == "gzip":
        original_write = gzip.GzipFile.write
        calls = {"n": 0}

        def write(self, data):  # noqa: ANN001, ANN202
            calls["n"] += 1
            if calls["n"] == 8:
                kill_self()
            return original_write(self, data)

        gzip.GzipFile.write = write
    elif kill_at == "commit":
        original_durable = writer.write_durably

        def durable(path: Path, text: str) -> None:
            if path.name == writer.COMMIT_NAME:
                kill_self()
            original_durable(path, text)

        writer.write_durably = durable
    elif kill_at in ("move-2", "manifest"):
        original_replace = os.replace
        moves = {"n": 0}

        def replace(source, target):  # noqa: ANN001, ANN202
            committed = (out / writer.STAGING_NAME / writer.COMMIT_NAME).exists()
            if committed and Path(source).parent != Path(target).parent:  # a move out of the staging folder
                moves["n"] += 1
                if (kill_at == "move-2" and moves["n"] == 2) or (kill_at == "manifest" and Path(target).name == writer.MANIFEST_NAME):
                    kill_self()
            return original_replace(source, target)

        os.replace = replace
    elif kill_at == "delete":
        original_unlink = Path.unlink

        def unlink(self, missing_ok=False):  # noqa: ANN001, ANN202
            if self.name.startswith("part-") and writer.STAGING_NAME not in self.parts:
                kill_self()
            return original_unlink(self, missing_ok=missing_ok)

        Path.unlink = unlink


def publish(out: Path, version: int) -> None:
    written, deleted = PARTS[version]
    with writer.ReleaseTransaction(out) as release:
        writer.write_partitions(release, "t/parts", {key: part_table(key, version) for key in written}, delete=deleted)
        writer.write_fits_from_parquet(release.partitions("t/parts"), release.path("t/all.fits.gz"), "PARTS",
                                       meta={"RELVER": (version, "release version")}, batch_rows=BATCH_ROWS)
        release.path("summary.json").write_text(json.dumps({"version": version}))
        release.commit({"version": version})


if __name__ == "__main__":
    out_dir, release_version = Path(sys.argv[1]), int(sys.argv[2])
    arm(sys.argv[3] if len(sys.argv) > 3 else "none", out_dir)
    publish(out_dir, release_version)
