"""Inference stage: the results store (atomic parts, rerun keys, release view) and the Dask graph end to end on the
real apStar files of ../shared/data with the conformance ``apogee_small`` weights."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catalogbuilder.inference.results import (
    METADATA_COLUMNS,
    STATUS_NO_RESULT,
    STATUS_OK,
    ResultsStore,
    value_columns,
)

OUTPUTS = ("logg", "teff", "fe_h")


def result_rows(ids: list[str], weights: str, created: str, status: str = STATUS_OK, teff: float = 5000.0) -> pd.DataFrame:
    """Rows as a task writes them (provenance + values) for a model called ``m``."""
    frame = pd.DataFrame({
        "spectrum_id": ids, "model_name": "m", "weights_sha256": weights, "software_version": "0.1.0",
        "created": created, "n_draws": 20, "seed": 0, "status": status,
        "reason": "" if status == STATUS_OK else "non-finite prediction: teff",
    })
    for column in value_columns(OUTPUTS):
        frame[column] = np.nan
    frame["teff"] = teff
    return frame


WEIGHTS_A = hashlib.sha256(b"a").hexdigest()
WEIGHTS_B = hashlib.sha256(b"b").hexdigest()


def test_value_columns_add_logteff_for_teff_models() -> None:
    assert value_columns(("teff", "logg")) == ["teff", "raw_e_teff", "logg", "raw_e_logg", "logteff", "raw_e_logteff"]
    assert value_columns(("logg",)) == ["logg", "raw_e_logg"]


def test_parts_are_written_atomically_under_model_and_weights(tmp_path: Path) -> None:
    results = ResultsStore.for_store(tmp_path)
    part = results.write_part(result_rows(["s1", "s2"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    assert part is not None and part.parent == tmp_path / "results" / "m" / WEIGHTS_A[:16]
    assert part.name.startswith("part-") and part.suffix == ".parquet"
    assert [p.name for p in part.parent.iterdir()] == [part.name], "no temporary file may be left behind"
    frame = results.read("m")
    assert list(frame.columns[: len(METADATA_COLUMNS)]) == list(METADATA_COLUMNS)
    assert frame["spectrum_id"].tolist() == ["s1", "s2"] and frame["teff"].tolist() == [5000.0, 5000.0]
    assert results.write_part(result_rows([], WEIGHTS_A, "x")) is None


def test_a_half_written_temporary_file_is_ignored(tmp_path: Path) -> None:
    results = ResultsStore.for_store(tmp_path)
    part = results.write_part(result_rows(["s1"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    (part.parent / ".tmp-killed-writer.parquet").write_bytes(b"PAR1 truncated")
    assert results.read("m")["spectrum_id"].tolist() == ["s1"]
    assert results.completed_ids("m", WEIGHTS_A) == {"s1"}


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    results = ResultsStore.for_store(tmp_path)
    mixed = pd.concat([result_rows(["s1"], WEIGHTS_A, "t"), result_rows(["s2"], WEIGHTS_B, "t")])
    with pytest.raises(ValueError, match="one model and one weights"):
        results.write_part(mixed)
    with pytest.raises(ValueError, match="unknown status"):
        results.write_part(result_rows(["s1"], WEIGHTS_A, "t", status="maybe"))
    with pytest.raises(ValueError, match="twice"):
        results.write_part(result_rows(["s1", "s1"], WEIGHTS_A, "t"))
    with pytest.raises(ValueError, match="lack the columns"):
        results.write_part(result_rows(["s1"], WEIGHTS_A, "t").drop(columns="seed"))
    with pytest.raises(ValueError, match="64 lower-case hex"):
        results.part_dir("m", "abc")
    with pytest.raises(ValueError, match="cannot name a results folder"):
        results.part_dir("../escape", WEIGHTS_A)


def test_rerun_keys_and_release_view(tmp_path: Path) -> None:
    results = ResultsStore.for_store(tmp_path)
    results.write_part(result_rows(["s1", "s2"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    results.write_part(result_rows(["s3"], WEIGHTS_A, "2026-01-01T00:00:01.000000+00:00", status=STATUS_NO_RESULT))
    # only ok rows count as done: the failed spectrum is tried again by a rerun
    assert results.completed_ids("m", WEIGHTS_A) == {"s1", "s2"}
    assert results.completed_ids("m", WEIGHTS_B) == set()
    # the retry of s3 succeeds; the release view keeps its ok row, the history keeps both
    results.write_part(result_rows(["s3"], WEIGHTS_A, "2026-01-02T00:00:00.000000+00:00", teff=6000.0))
    latest = results.read("m")
    assert latest["spectrum_id"].tolist() == ["s1", "s2", "s3"]
    assert (latest["status"] == STATUS_OK).all() and latest["teff"].tolist() == [5000.0, 5000.0, 6000.0]
    assert len(results.read("m", latest_only=False)) == 4
    # an ok row written by a task whose worker then died is not displaced by the no_result row of its retry
    results.write_part(result_rows(["s1"], WEIGHTS_A, "2026-01-03T00:00:00.000000+00:00", status=STATUS_NO_RESULT))
    assert results.read("m").set_index("spectrum_id").loc["s1", "status"] == STATUS_OK
    # new weights: nothing is done for them, and once computed they are the release view
    results.write_part(result_rows(["s1"], WEIGHTS_B, "2026-02-01T00:00:00.000000+00:00", teff=4000.0))
    latest = results.read()
    assert latest["weights_sha256"].unique().tolist() == [WEIGHTS_B] and latest["teff"].tolist() == [4000.0]
    assert set(results.read(latest_only=False)["weights_sha256"]) == {WEIGHTS_A, WEIGHTS_B}
    assert results.model_names() == ["m"]


def test_reading_an_empty_store_gives_the_columns(tmp_path: Path) -> None:
    frame = ResultsStore.for_store(tmp_path).read()
    assert frame.empty and list(frame.columns) == list(METADATA_COLUMNS)
