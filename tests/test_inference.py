"""Inference stage: the results store (atomic parts, rerun keys, release view) and the Dask graph end to end on the
real apStar files of ../shared/data with the conformance ``apogee_small`` weights."""
from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster

from catalogbuilder.cli import main as catalogbuilder_main
from catalogbuilder.inference import graph
from catalogbuilder.inference.graph import InferenceReport, chunk_ranges
from catalogbuilder.store import SpectrumStore, StoreError, StoreRef
from catalogbuilder.store.results import (
    METADATA_COLUMNS,
    STATUS_NO_RESULT,
    STATUS_OK,
    ResultsStore,
    value_columns,
)

OUTPUTS = ("logg", "teff", "fe_h")


def result_rows(ids: list[str], weights: str, created: str, status: str = STATUS_OK, teff: float = 5000.0,
                positions: list[int] | None = None) -> pd.DataFrame:
    """Rows as a task writes them (provenance + values) for a model called ``m`` on the apogee grid."""
    frame = pd.DataFrame({
        "spectrum_id": ids, "grid": "apogee", "position": positions or [int(i[1:]) for i in ids], "model_name": "m",
        "weights_sha256": weights, "software_version": "0.1.0", "created": created, "n_draws": 20, "seed": 0,
        "precision": "float32",
        "status": status, "reason": "" if status == STATUS_OK else "non-finite prediction: teff",
    })
    for column in value_columns(OUTPUTS):
        frame[column] = np.nan
    frame["teff"] = teff
    return frame


WEIGHTS_A = hashlib.sha256(b"a").hexdigest()
WEIGHTS_B = hashlib.sha256(b"b").hexdigest()


def test_value_columns_add_logteff_for_teff_models() -> None:
    assert value_columns(("teff", "logg")) == ["teff", "raw_e_teff", "noiseless_teff", "logg", "raw_e_logg",
                                               "noiseless_logg", "logteff", "raw_e_logteff", "noiseless_logteff"]
    assert value_columns(("logg",)) == ["logg", "raw_e_logg", "noiseless_logg"]


def test_parts_are_written_atomically_and_compacted_by_position(tmp_path: Path) -> None:
    results = ResultsStore(tmp_path / "results")
    part = results.write_part(result_rows(["s1", "s2"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    folder = tmp_path / "results" / "m" / WEIGHTS_A[:16]
    assert part is not None and part.parent == folder / "incoming"
    assert part.name.startswith("part-") and part.suffix == ".parquet"
    assert [p.name for p in part.parent.iterdir()] == [part.name], "no temporary file may be left behind"
    assert results.rows(folder)["spectrum_id"].tolist() == ["s1", "s2"]  # incoming parts are read before compaction
    assert results.compact("m", WEIGHTS_A) == [0]
    assert list((folder / "incoming").iterdir()) == [] and (folder / "compact" / "range-000000.parquet").is_file()
    frame = results.read("m")
    assert list(frame.columns[: len(METADATA_COLUMNS)]) == list(METADATA_COLUMNS)
    assert frame["spectrum_id"].tolist() == ["s1", "s2"] and frame["teff"].tolist() == [5000.0, 5000.0]
    assert results.state(folder)["grid"] == "apogee" and results.write_part(result_rows([], WEIGHTS_A, "x")) is None
    # a row far away lands in its own range file; a read of a position range opens only the files it overlaps
    results.write_part(result_rows(["s40000"], WEIGHTS_A, "2026-01-01T00:00:01.000000+00:00"))
    assert results.compact("m", WEIGHTS_A) == [2]
    assert results.rows(folder, 30000, 50000)["spectrum_id"].tolist() == ["s40000"]


def test_a_half_written_temporary_file_is_ignored(tmp_path: Path) -> None:
    results = ResultsStore(tmp_path / "results")
    part = results.write_part(result_rows(["s1"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    (part.parent / ".tmp-killed-writer.parquet").write_bytes(b"PAR1 truncated")
    results.compact("m", WEIGHTS_A)
    assert results.read("m")["spectrum_id"].tolist() == ["s1"]
    assert results.done_positions("m", WEIGHTS_A, 3).tolist() == [False, True, False]


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    results = ResultsStore(tmp_path / "results")
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
        results.version_dir("m", "abc")
    with pytest.raises(ValueError, match="cannot name a results folder"):
        results.version_dir("../escape", WEIGHTS_A)


def test_rerun_keys_and_release_view(tmp_path: Path) -> None:
    results = ResultsStore(tmp_path / "results")
    results.write_part(result_rows(["s1", "s2"], WEIGHTS_A, "2026-01-01T00:00:00.000000+00:00"))
    results.write_part(result_rows(["s3"], WEIGHTS_A, "2026-01-01T00:00:01.000000+00:00", status=STATUS_NO_RESULT))
    results.compact("m", WEIGHTS_A)
    # only ok rows count as done: the failed spectrum is tried again by a rerun
    assert np.flatnonzero(results.done_positions("m", WEIGHTS_A, 4)).tolist() == [1, 2]
    assert not results.done_positions("m", WEIGHTS_B, 4).any()
    # the retry of s3 succeeds; the release view keeps its ok row
    results.write_part(result_rows(["s3"], WEIGHTS_A, "2026-01-02T00:00:00.000000+00:00", teff=6000.0))
    results.compact("m", WEIGHTS_A)
    latest = results.read("m")
    assert latest["spectrum_id"].tolist() == ["s1", "s2", "s3"]
    assert (latest["status"] == STATUS_OK).all() and latest["teff"].tolist() == [5000.0, 5000.0, 6000.0]
    # an ok row written by a task whose worker then died is not displaced by the no_result row of its retry
    results.write_part(result_rows(["s1"], WEIGHTS_A, "2026-01-03T00:00:00.000000+00:00", status=STATUS_NO_RESULT))
    results.compact_all()
    assert results.read("m").set_index("spectrum_id").loc["s1", "status"] == STATUS_OK
    # new weights: nothing is done for them, and once computed they are the release view
    results.write_part(result_rows(["s1"], WEIGHTS_B, "2026-02-01T00:00:00.000000+00:00", teff=4000.0))
    results.compact("m", WEIGHTS_B)
    latest = results.read()
    assert latest["weights_sha256"].unique().tolist() == [WEIGHTS_B] and latest["teff"].tolist() == [4000.0]
    assert results.model_names() == ["m"] and results.latest_version("m").name == WEIGHTS_B[:16]


def test_reading_an_empty_store_gives_the_columns(tmp_path: Path) -> None:
    frame = ResultsStore(tmp_path / "results").read()
    assert frame.empty and list(frame.columns) == list(METADATA_COLUMNS)


# --- the Dask graph, end to end on real spectra ------------------------------------------------------------------
MODEL_OUTPUT_COLUMNS = value_columns(("teff", "logg", "fe_h"))
PREDICTION_TOLERANCE = 1e-4  # conformance README: predictions within 1e-4 x max(1, |ref|)


def local_client(workers: int) -> Iterator[Client]:
    """An in-process cluster of single-threaded workers (fast to start; tasks share this process)."""
    with (LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
          Client(cluster) as client):
        yield client


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    torch.set_num_threads(1)
    yield from local_client(1)


@pytest.fixture(scope="module")
def small_model(conformance_dir: Path) -> Path:
    """The conformance ``apogee_small`` model (official format, random weights, reference outputs known)."""
    return conformance_dir / "apogee_small"


def run_inference(client: Client, store_path: Path, model: Path, **options: object) -> InferenceReport:
    """The stage function on the store at ``store_path``."""
    return graph.run_inference(client, SpectrumStore.open(store_path), model, **options)


def results_of(store_path: Path) -> ResultsStore:
    return SpectrumStore.open(store_path).results


def store_rows(store_path: Path, shared_data: Path, grid: str) -> pd.DataFrame:
    """spectrum_id → conformance input name (``<survey folder>/<file>[row]``) of every spectrum of a grid."""
    columns = SpectrumStore.open(store_path).columns(grid, ("spectrum_id", "file_path", "row"))
    return pd.DataFrame({
        "spectrum_id": columns["spectrum_id"].astype(str),
        "name": [f"{Path(path).relative_to(shared_data)}[{row}]" for path, row in zip(columns["file_path"], columns["row"])],
    })


def result_files(store_path: Path) -> list[tuple[Path, int]]:
    """Every results file with its modification time."""
    return sorted((path, path.stat().st_mtime_ns) for path in (store_path / "results").rglob("*.parquet"))


def test_chunk_ranges() -> None:
    assert chunk_ranges(7, None) == [(0, 7)]
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError):
        chunk_ranges(7, 0)


@pytest.mark.parametrize("config", ["apogee_small", "boss_small"])
def test_inference_reproduces_the_reference_and_a_rerun_does_nothing(
    client: Client, config: str, shared_data: Path, conformance_dir: Path, tmp_path: Path
) -> None:
    """Ingest the reference inputs of a conformance config, infer without draws: the reference predictions."""
    from catalogbuilder.store import SpectrumStore

    model_dir = conformance_dir / config
    vectors = np.load(model_dir / "vectors.npz")
    names = [str(name) for name in vectors["names"]]
    files = sorted({shared_data / name.rsplit("[", 1)[0] for name in names})
    store = tmp_path / "store"
    SpectrumStore.open(store, create=True).ingest(files, progress=False)

    report = run_inference(client, store, model_dir, draws=0, progress=False)
    assert (report.n_skipped, report.n_ok, report.n_no_result) == (0, report.n_spectra, 0)
    assert not report.failed_chunks

    results = results_of(store).read(config)
    results = results.merge(store_rows(store, shared_data, report.grid), on="spectrum_id")
    assert len(results) == report.n_spectra and results["spectrum_id"].is_unique
    reference = pd.DataFrame(vectors["predictions"], columns=[f"ref_{n}" for n in vectors["param_names"]])
    reference["name"] = names
    reference["degenerate"] = vectors["degenerate"]
    joined = results.merge(reference, on="name", validate="one_to_one")
    # every reference input is predicted but apStar row 1 (combined-alt: stored, never predicted nor released)
    apstar_row_1 = [name.startswith("apogee/apStar") and name.endswith("[1]") for name in names]
    assert sorted(joined["name"]) == sorted(name for name, alt in zip(names, apstar_row_1) if not alt)
    assert report.n_degenerate == int(joined["degenerate"].sum())
    canonical = {"logg": "logg", "logTeff": "logteff", "FeH": "fe_h", "rv": "rv"}
    for label in (str(n) for n in vectors["param_names"]):
        ours, theirs = joined[canonical[label]], joined[f"ref_{label}"]
        deviation = np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))
        assert deviation.max() <= PREDICTION_TOLERANCE, f"{label} deviates by {deviation.max():.2e}"
    np.testing.assert_allclose(joined["teff"], 10 ** joined["logteff"], rtol=1e-12)
    assert (joined["status"] == STATUS_OK).all()
    assert ((joined["reason"] != "") == joined["degenerate"]).all(), "only constant inputs are flagged degenerate"
    assert joined[[c for c in joined.columns if c.startswith("raw_e_")]].isna().all().all(), "no draws: no errors"
    for name in (*canonical.values(), "teff"):
        if name in joined:  # with no draws the value is the noiseless prediction
            np.testing.assert_array_equal(joined[f"noiseless_{name}"], joined[name])
    assert (joined["n_draws"] == 0).all() and (joined["seed"] == 0).all()
    weights = hashlib.sha256(b"".join((model_dir / f"model_chunk_{i}").read_bytes() for i in range(10))).hexdigest()
    assert (joined["weights_sha256"] == weights).all()

    files = result_files(store)
    again = run_inference(client, store, model_dir, draws=0, progress=False)
    assert (again.n_skipped, again.n_computed, len(again.chunks)) == (report.n_spectra, 0, 0)
    assert result_files(store) == files, "a rerun writes nothing"


def test_predictions_outside_the_model_domain_are_marked(client: Client, store: Path, small_model: Path,
                                                         tmp_path: Path) -> None:
    """A model whose catalogbuilder.yaml gives a training domain marks each result outside it (outside_domain = 1),
    which the release turns into RESULT_UNRELIABLE; without a domain the column is absent."""
    model_dir = Path(shutil.copytree(small_model, tmp_path / "with_domain"))
    reference = run_inference(client, store, small_model, draws=0, progress=False)
    plain = results_of(store).read(reference.model_name)
    assert "outside_domain" not in plain.columns
    median_teff = float(plain["teff"].median())
    (model_dir / "catalogbuilder.yaml").write_text(f"name: with_domain\ndomain:\n  teff: [0, {median_teff}]\n")
    run_inference(client, store, model_dir, draws=0, progress=False)
    marked = results_of(store).read("with_domain").merge(plain[["spectrum_id", "teff"]], on="spectrum_id",
                                                                     suffixes=("", "_plain"))
    np.testing.assert_array_equal(marked["teff"], marked["teff_plain"])
    np.testing.assert_array_equal(marked["outside_domain"], (marked["teff"] > median_teff).astype(float))
    assert 0 < marked["outside_domain"].sum() < len(marked)


def test_new_weights_recompute_every_row(client: Client, store: Path, small_model: Path, tmp_path: Path) -> None:
    from catalogbuilder.models.weights import load_state_dict, save_state_dict

    run_inference(client, store, small_model, draws=0, progress=False)
    retrained = tmp_path / "apogee_small"
    shutil.copytree(small_model, retrained)
    state_dict, old_sha = load_state_dict(retrained)
    state_dict["linear_sequential.2.bias"] += 0.1  # last Linear: shifts every z-score
    new_sha = save_state_dict(state_dict, retrained)
    assert new_sha != old_sha

    report = run_inference(client, store, retrained, draws=0, progress=False)
    assert (report.n_skipped, report.n_ok) == (0, 5)
    results = results_of(store)
    latest = results.read("apogee_small")
    assert len(latest) == 5 and (latest["weights_sha256"] == new_sha).all()
    old = results.rows(results.version_dir("apogee_small", old_sha)).set_index("spectrum_id")
    assert len(old) == 5  # the old weights' rows stay, as history
    new = latest.set_index("spectrum_id").loc[old.index]
    assert (np.abs(new["logg"] - old["logg"]) > 1e-3).all(), "the new weights really were used"


def held_models(dask_worker: object) -> list[int]:
    """Identities of the models a worker's plugins hold (``client.run`` passes the worker)."""
    return [id(plugin.model) for plugin in dask_worker.plugins.values() if getattr(plugin, "model", None) is not None]


def test_results_do_not_depend_on_chunking_or_worker_count(client: Client, store: Path, small_model: Path,
                                                            tmp_path: Path) -> None:
    one_chunk = run_inference(client, store, small_model, draws=4, seed=7, progress=False)
    assert len(one_chunk.chunks) == 1
    reference = results_of(store).read().set_index("spectrum_id")

    other = Path(shutil.copytree(store, tmp_path / "other"))
    shutil.rmtree(other / "results")
    for two_workers in local_client(2):
        split = run_inference(two_workers, other, small_model, draws=4, seed=7, spectra_per_task=2, batch_size=1,
                              progress=False)
        held = two_workers.run(held_models)
        assert len(held) == 2 and len({model for models in held.values() for model in models}) == 1, (
            "the in-process workers share one copy of the model")
    assert len(split.chunks) == 3 and len({chunk.worker for chunk in split.chunks}) == 2
    rerun = results_of(other).read().set_index("spectrum_id").loc[reference.index]
    assert (reference["status"] == STATUS_OK).all(), reference["reason"].tolist()
    for column in MODEL_OUTPUT_COLUMNS:
        np.testing.assert_array_equal(rerun[column].to_numpy(), reference[column].to_numpy(), err_msg=column)
    assert (reference["raw_e_teff"].drop(index=reference.index[reference["reason"] != ""]) > 0).all()

    reseeded = Path(shutil.copytree(other, tmp_path / "reseeded"))
    shutil.rmtree(reseeded / "results")
    run_inference(client, reseeded, small_model, draws=4, seed=8, progress=False)
    changed = results_of(reseeded).read().set_index("spectrum_id").loc[reference.index]
    assert not np.array_equal(changed["teff"].to_numpy(), reference["teff"].to_numpy()), "the seed matters"


def test_tasks_follow_the_store_chunks(client: Client, small_model: Path, shared_data: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from catalogbuilder.store import layout, writer

    monkeypatch.setattr(writer, "SPECTRUM_CHUNK", 2)  # data chunks of 2 spectra, coordinates in one chunk
    monkeypatch.setattr(layout, "SPECTRUM_CHUNK", 2)
    monkeypatch.setattr(graph, "SPECTRUM_CHUNK", 2)
    store = tmp_path / "store"
    SpectrumStore.open(store, create=True).ingest(sorted((shared_data / "apogee").glob("apStar-*.fits")), progress=False)
    assert SpectrumStore.open(store).dataset("apogee")["flux"].encoding["chunks"][0] == 2
    report = run_inference(client, store, small_model, draws=0, progress=False)
    # positions 1 and 6 are apStar rows 1 (not predicted); no task crosses a 2-spectrum chunk
    assert [(chunk.start, chunk.stop) for chunk in report.chunks] == [(0, 1), (2, 4), (4, 6)]
    assert report.n_ok == 5


def test_failed_tasks_become_no_result_rows_and_are_retried_by_a_rerun(
    client: Client, store: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean = Path(shutil.copytree(store, tmp_path / "clean"))
    run_inference(client, clean, small_model, draws=3, seed=5, progress=False)
    uninterrupted = results_of(clean).read().set_index("spectrum_id")

    attempts: dict[int, int] = {}
    lock = threading.Lock()
    real_predict_chunk = graph.predict_chunk

    def flaky(task: graph.ChunkTask, model: object) -> pd.DataFrame:
        """Task [2, 4) always fails; task [4, 6) fails once (a transient error) and then succeeds."""
        start = task.positions[0]
        with lock:
            attempts[start] = attempts.get(start, 0) + 1
        if start == 2 or (start == 4 and attempts[start] == 1):
            raise OSError(f"simulated storage error reading spectra {task.positions}")
        return real_predict_chunk(task, model)

    monkeypatch.setattr(graph, "predict_chunk", flaky)
    report = run_inference(client, store, small_model, draws=3, seed=5, spectra_per_task=2, retries=1, progress=False)
    assert attempts == {0: 1, 2: 2, 4: 2}  # positions 1 and 6 are apStar rows 1, never predicted
    assert [(start, stop) for start, stop, _ in report.failed_chunks] == [(2, 4)]
    assert "simulated storage error" in report.failed_chunks[0][2]
    assert (report.n_ok, report.n_no_result) == (3, 2)
    rows = results_of(store).read()
    assert len(rows) == 5 and rows["spectrum_id"].is_unique, "every spectrum has exactly one row"
    failed = rows[rows["status"] == STATUS_NO_RESULT]
    assert len(failed) == 2 and failed["reason"].str.contains("task failed after retries: OSError").all()
    assert failed[MODEL_OUTPUT_COLUMNS].isna().all().all()

    monkeypatch.setattr(graph, "predict_chunk", real_predict_chunk)
    retry = run_inference(client, store, small_model, draws=3, seed=5, spectra_per_task=2, progress=False)
    assert (retry.n_skipped, retry.n_ok, retry.n_no_result) == (3, 2, 0)
    final = results_of(store).read().set_index("spectrum_id").loc[uninterrupted.index]
    assert len(final) == 5 and (final["status"] == STATUS_OK).all()
    # retried tasks and the rerun give exactly the values of an uninterrupted run
    for column in MODEL_OUTPUT_COLUMNS:
        np.testing.assert_array_equal(final[column].to_numpy(), uninterrupted[column].to_numpy(), err_msg=column)


def test_non_finite_predictions_are_no_result_rows(client: Client, store: Path, small_model: Path,
                                                   tmp_path: Path) -> None:
    from catalogbuilder.models.weights import load_state_dict, save_state_dict

    broken = tmp_path / "apogee_small"
    shutil.copytree(small_model, broken)
    state_dict, _ = load_state_dict(broken)
    state_dict["linear_sequential.2.bias"][0] = float("nan")  # the logg output becomes NaN
    save_state_dict(state_dict, broken)
    report = run_inference(client, store, broken, draws=0, progress=False)
    assert (report.n_ok, report.n_no_result) == (0, 5)
    rows = results_of(store).read()
    assert (rows["status"] == STATUS_NO_RESULT).all()
    assert (rows["reason"] == "non-finite prediction: logg").all()
    assert np.isfinite(rows["teff"]).all(), "the finite outputs are kept for inspection"


def test_a_worker_that_does_not_see_the_store_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="shared filesystem"):
        StoreRef(str(tmp_path / "unmounted" / "store"), "S2SK50P9CW9JW0P4V280").open()
    assert not (tmp_path / "unmounted").exists()


def test_missing_store_is_a_clear_error(client: Client, small_model: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StoreError, match="no spectrum store"):
        run_inference(client, tmp_path / "nowhere", small_model, progress=False)
    argv = ["infer", "--store", str(tmp_path / "nowhere"), "--model", str(small_model), "--no-progress"]
    assert catalogbuilder_main(argv) == 2 and "no spectrum store" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_infer_command_on_a_running_scheduler(client: Client, store: Path, small_model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["infer", "--store", str(store), "--model", str(small_model), "--draws", "2", "--seed", "3",
            "--address", client.scheduler.address, "--no-progress"]
    assert catalogbuilder_main(argv) == 0
    assert "5 ok (0 degenerate input), 0 no_result" in capsys.readouterr().out
    rows = results_of(store).read()
    assert len(rows) == 5 and (rows["n_draws"] == 2).all() and (rows["seed"] == 3).all()
    assert catalogbuilder_main(argv) == 0
    assert "5 already done, 0 ok" in capsys.readouterr().out


def test_report_summary_counts() -> None:
    report = InferenceReport("m", WEIGHTS_A, "apogee", None, n_spectra=3, n_skipped=1, n_ok=1, n_no_result=1,
                             seconds=2.0)
    assert report.n_computed == 2 and report.spectra_per_second == 1.0
    assert "3 spectra, 1 already done, 1 ok" in report.summary()
