"""The results store: per-spectrum model predictions kept beside the spectrum store, one folder per model and weights.

Layout (docs/inference.md)::

    <store>/results/<model_name>/<weights_sha256[:16]>/
        incoming/part-<time>-<uid>.parquet    parts written by inference tasks (atomically: temporary file + rename)
        compact/range-<k>.parquet             one row per spectrum (its best row), sorted by grid position, one file
                                              per range of positions (store/ranged.py)
        state.json                            when the folder was last compacted (newest weights = release view)

Rows are keyed by ``spectrum_id`` (and the spectrum's ``position`` in its grid). :meth:`ResultsStore.compact` folds the
incoming parts into the range files — per spectrum the newest ``ok`` row, else the newest ``no_result`` row — and then
deletes them; it is idempotent, so a crash between the two steps only repeats work. Readers see the compacted rows and
any parts not compacted yet.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from catalogbuilder.constants import NOISELESS_PREFIX
from catalogbuilder.files import ExclusiveLock
from catalogbuilder.store.ranged import POSITION, RangeTable, unified_schema, write_atomically

STATUS_OK = "ok"
STATUS_NO_RESULT = "no_result"
STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_NO_RESULT)
OUTSIDE_DOMAIN = "outside_domain"  # 1.0 where a prediction lies outside the model's training domain (catalogbuilder.yaml)
WEIGHTS_DIR_CHARS = 16  # the weights folder is named by the first 16 hex digits of the weights sha256
INCOMING, COMPACT, STATE_FILE, LOCK_FILE = "incoming", "compact", "state.json", ".compact.lock"

# Provenance columns of every row, in order, with their Arrow types; every other column is a float64 value.
METADATA_SCHEMA = pa.schema(
    [
        ("spectrum_id", pa.string()),
        ("grid", pa.string()),  # the store grid the spectrum lies on (the model's grid)
        (POSITION, pa.int64()),  # the spectrum's position in that grid
        ("model_name", pa.string()),
        ("weights_sha256", pa.string()),
        ("software_version", pa.string()),
        ("created", pa.string()),  # ISO 8601 UTC time the row was computed
        ("n_draws", pa.int64()),  # Monte-Carlo draws behind raw_e_* (0: no uncertainties)
        ("seed", pa.int64()),  # run seed; a spectrum's own seed is models.montecarlo.spectrum_seed(spectrum_id, seed)
        ("precision", pa.string()),  # arithmetic of the forward passes: float32, tf32 or bf16 (constants.PRECISIONS)
        ("status", pa.string()),  # "ok" or "no_result"
        ("reason", pa.string()),  # why the row is not a plain result ("" when there is nothing to say)
    ]
)
METADATA_COLUMNS: tuple[str, ...] = tuple(METADATA_SCHEMA.names)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def utc_now_iso() -> str:
    """The current UTC time as an ISO 8601 string with microseconds (the ``created`` column; sorts as text)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def value_columns(outputs: Sequence[str]) -> list[str]:
    """Value columns of a model with these canonical outputs: each output (the median of the draws), its ``raw_e_``
    error and its ``noiseless_`` prediction, plus the same three for ``logteff`` when the model predicts ``teff``."""
    names = list(outputs) + (["logteff"] if "teff" in outputs and "logteff" not in outputs else [])
    return [column for name in names for column in (name, f"raw_e_{name}", f"{NOISELESS_PREFIX}{name}")]


def results_schema(frame_columns: Sequence[str]) -> pa.Schema:
    """Arrow schema of a part: the provenance columns, then every other column as float64 in the given order."""
    values = [name for name in frame_columns if name not in METADATA_COLUMNS]
    return pa.schema(list(METADATA_SCHEMA) + [pa.field(name, pa.float64()) for name in values])


def best_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per spectrum: the newest ``ok`` row, or the newest row when none is ``ok`` (a retried task can have
    written a part before its worker died)."""
    ranked = frame.assign(_ok=(frame["status"] == STATUS_OK).astype(int))
    ranked = ranked.sort_values(["_ok", "created"], kind="stable")
    return ranked.drop_duplicates("spectrum_id", keep="last").drop(columns="_ok")


class ResultsStore:
    """Per-spectrum predictions of every model and weights version run on one spectrum store (``root`` is the
    ``results`` folder; a store's is :attr:`SpectrumStore.results <catalogbuilder.store.SpectrumStore.results>`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def version_dir(self, model_name: str, weights_sha256: str) -> Path:
        """Folder of one model and weights version."""
        if not _SAFE_NAME.match(model_name):
            raise ValueError(f"model name {model_name!r} cannot name a results folder (letters, digits, . _ + - only)")
        if not re.fullmatch(r"[0-9a-f]{64}", weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, got {weights_sha256!r}")
        return self.root / model_name / weights_sha256[:WEIGHTS_DIR_CHARS]

    def write_part(self, frame: pd.DataFrame) -> Path | None:
        """Write the rows of one model and weights version atomically as a new incoming part; returns its path
        (``None`` for an empty frame). Raises ``ValueError`` on missing provenance columns, mixed models or
        weights, an unknown status or a spectrum listed twice."""
        if frame.empty:
            return None
        missing = [name for name in METADATA_COLUMNS if name not in frame.columns]
        if missing:
            raise ValueError(f"results rows lack the columns {missing}")
        models, weights = frame["model_name"].unique(), frame["weights_sha256"].unique()
        if len(models) != 1 or len(weights) != 1:
            raise ValueError("a results part holds one model and one weights version")
        unknown = set(frame["status"].unique()) - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown status values {sorted(unknown)}; expected {STATUSES}")
        if frame["spectrum_id"].duplicated().any():
            raise ValueError("a results part lists a spectrum_id twice")
        schema = results_schema(frame.columns)
        ordered = frame[schema.names].copy()
        ordered["reason"] = ordered["reason"].fillna("").astype(str)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.version_dir(str(models[0]), str(weights[0])) / INCOMING / f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        return write_atomically(pa.Table.from_pandas(ordered, schema=schema, preserve_index=False), path)

    # --- compaction ----------------------------------------------------------------------------------------------
    def compact(self, model_name: str, weights_sha256: str) -> list[int]:
        """Fold the incoming parts of one model and weights into the range files; returns the ranges rewritten."""
        folder = self.version_dir(model_name, weights_sha256)
        with ExclusiveLock(folder / LOCK_FILE):
            parts = sorted((folder / INCOMING).glob("part-*.parquet"))
            if not parts:
                return []
            incoming = _read_parts([str(p) for p in parts])
            touched = RangeTable(folder / COMPACT).merge(incoming, best_rows)
            state = {"compacted": utc_now_iso(), "weights_sha256": weights_sha256,
                     "grid": str(incoming["grid"].iloc[0]), "columns": list(incoming.columns)}
            temporary = folder / f".{STATE_FILE}.tmp"  # replaced whole: a full disk cannot leave half a state
            temporary.write_text(json.dumps(state))
            os.replace(temporary, folder / STATE_FILE)
            for part in parts:
                part.unlink()
        return touched

    def compact_all(self) -> None:
        """Compact every model and weights version that has incoming parts (e.g. left by a killed run)."""
        for folder in self.root.glob(f"*/*/{INCOMING}"):
            parts = list(folder.glob("part-*.parquet"))
            if parts:
                frame = pd.read_parquet(parts[0], columns=["model_name", "weights_sha256"])
                self.compact(str(frame["model_name"].iloc[0]), str(frame["weights_sha256"].iloc[0]))

    # --- reading -------------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Names of the models with results, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir() if path.is_dir() and not path.name.startswith("."))

    @staticmethod
    def state(folder: Path) -> dict[str, object]:
        """What the last compaction of a weights folder recorded: time, weights, grid, columns."""
        return json.loads((folder / STATE_FILE).read_text())

    def latest_version(self, model_name: str) -> Path | None:
        """The weights folder of a model compacted most recently (what the release shows; compact first), or None."""
        folders = [p for p in (self.root / model_name).glob("*") if p.is_dir() and (p / STATE_FILE).exists()]
        if not folders:
            return None
        return max(folders, key=_last_update)

    def done_positions(self, model_name: str, weights_sha256: str, n_positions: int) -> np.ndarray:
        """Boolean array over grid positions: True where this model and weights have an ``ok`` row (what a rerun
        skips). Reads the ``position`` and ``status`` columns only."""
        done = np.zeros(n_positions, dtype=bool)
        frame = self.rows(self.version_dir(model_name, weights_sha256), columns=[POSITION, "status", "created"])
        ok = frame.loc[frame["status"] == STATUS_OK, POSITION].to_numpy(np.int64)
        done[ok[ok < n_positions]] = True
        return done

    def rows(self, folder: Path, start: int = 0, stop: int | None = None,
             columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The best row per spectrum of one weights folder for positions [start, stop): compacted rows plus any
        incoming parts not compacted yet."""
        compact = RangeTable(folder / COMPACT).read(start, stop, None if columns is None else _with_keys(columns))
        parts = [str(p) for p in sorted((folder / INCOMING).glob("part-*.parquet"))]
        if not parts:
            return compact if columns is None else compact[list(columns)]
        incoming = _read_parts(parts)
        inside = incoming[POSITION] >= start
        if stop is not None:
            inside &= incoming[POSITION] < stop
        incoming = incoming.loc[inside]
        frames = [frame for frame in (compact, incoming) if len(frame)]
        merged = best_rows(pd.concat(frames, ignore_index=True)) if frames else compact
        merged = merged.sort_values(POSITION, kind="stable").reset_index(drop=True)
        return merged if columns is None else merged[list(columns)]

    def read(self, model_name: str | None = None) -> pd.DataFrame:
        """The release view of every model (or one) as one DataFrame: for each model its most recently computed
        weights version, one row per spectrum. O(results): for inspection and tests; the release reads by range."""
        names = [model_name] if model_name is not None else self.model_names()
        frames = [self.rows(folder) for name in names if (folder := self.latest_version(name)) is not None]
        frames = [frame for frame in frames if len(frame)]
        if not frames:
            return pd.DataFrame({name: pd.Series(dtype=object if pa.types.is_string(field.type) else np.int64)
                                 for name, field in zip(METADATA_COLUMNS, METADATA_SCHEMA)})
        return pd.concat(frames, ignore_index=True, sort=False)


def _with_keys(columns: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(["spectrum_id", POSITION, "status", "created", *columns]))


def _read_parts(paths: Sequence[str]) -> pd.DataFrame:
    """Parquet parts with possibly different columns as one frame (a column missing from a part is null there)."""
    dataset = pads.dataset(list(paths), format="parquet", schema=unified_schema(paths))
    return dataset.to_table().to_pandas()


def _last_update(folder: Path) -> str:
    """When a weights folder was last compacted."""
    return str(ResultsStore.state(folder)["compacted"])


__all__ = ["METADATA_COLUMNS", "OUTSIDE_DOMAIN", "ResultsStore", "STATUS_NO_RESULT", "STATUS_OK",
           "best_rows", "results_schema", "utc_now_iso", "value_columns"]
