"""The results store: per-spectrum model predictions as Parquet parts, one folder per model and weights version.

Layout (docs/ARCHITECTURE.md): ``<store>/results/<model_name>/<weights_sha256[:16]>/part-<time>-<uid>.parquet``.
Every part is written to a hidden temporary file and renamed into place, so a reader never sees half a part and a
killed writer leaves no partial part behind. Rows are keyed by ``spectrum_id`` + ``model_name`` + ``weights_sha256``.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

RESULTS_DIRNAME = "results"
STATUS_OK = "ok"
STATUS_NO_RESULT = "no_result"
STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_NO_RESULT)
OUTSIDE_DOMAIN = "outside_domain"  # 1.0 where a prediction lies outside the model's training domain (catalogbuilder.yaml)
WEIGHTS_DIR_CHARS = 16  # the weights folder is named by the first 16 hex digits of the weights sha256

# Provenance columns of every row, in order, with their Arrow types; every other column is a float64 value.
METADATA_SCHEMA = pa.schema(
    [
        ("spectrum_id", pa.string()),
        ("model_name", pa.string()),
        ("weights_sha256", pa.string()),
        ("software_version", pa.string()),
        ("created", pa.string()),  # ISO 8601 UTC time the row was computed
        ("n_draws", pa.int64()),  # Monte-Carlo draws behind raw_e_* (0: no uncertainties)
        ("seed", pa.int64()),  # run seed; a spectrum's own seed is models.montecarlo.spectrum_seed(spectrum_id, seed)
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
    """Value columns of a model with these canonical outputs: each output and its ``raw_e_`` error, plus
    ``logteff``/``raw_e_logteff`` when the model predicts ``teff``."""
    names = list(outputs) + (["logteff"] if "teff" in outputs and "logteff" not in outputs else [])
    return [column for name in names for column in (name, f"raw_e_{name}")]


def results_schema(frame_columns: Iterable[str]) -> pa.Schema:
    """Arrow schema of a part: the provenance columns, then every other column as float64 in the given order."""
    values = [name for name in frame_columns if name not in METADATA_COLUMNS]
    return pa.schema(list(METADATA_SCHEMA) + [pa.field(name, pa.float64()) for name in values])


class ResultsStore:
    """Per-spectrum predictions of every model and weights version run on one spectrum store.

    ``root`` is the ``results`` folder itself; use :meth:`for_store` to get the one inside a spectrum store.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_store(cls, store_path: str | Path) -> ResultsStore:
        """The results store kept inside the spectrum store directory ``store_path``."""
        return cls(Path(store_path) / RESULTS_DIRNAME)

    def part_dir(self, model_name: str, weights_sha256: str) -> Path:
        """Folder holding the parts of one model and weights version."""
        if not _SAFE_NAME.match(model_name):
            raise ValueError(f"model name {model_name!r} cannot name a results folder (letters, digits, . _ + - only)")
        if not re.fullmatch(r"[0-9a-f]{64}", weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, got {weights_sha256!r}")
        return self.root / model_name / weights_sha256[:WEIGHTS_DIR_CHARS]

    def write_part(self, frame: pd.DataFrame) -> Path | None:
        """Write the rows of one model and weights version atomically as a new part; returns its path
        (``None`` for an empty frame). Raises ``ValueError`` on missing provenance columns, mixed models or
        weights, or an unknown status."""
        if frame.empty:
            return None
        missing = [name for name in METADATA_COLUMNS if name not in frame.columns]
        if missing:
            raise ValueError(f"results rows lack the columns {missing}")
        models = frame["model_name"].unique()
        weights = frame["weights_sha256"].unique()
        if len(models) != 1 or len(weights) != 1:
            raise ValueError("a results part holds one model and one weights version")
        unknown = set(frame["status"].unique()) - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown status values {sorted(unknown)}; expected {STATUSES}")
        if frame["spectrum_id"].duplicated().any():
            raise ValueError("a results part lists a spectrum_id twice")
        target_dir = self.part_dir(str(models[0]), str(weights[0]))
        target_dir.mkdir(parents=True, exist_ok=True)
        schema = results_schema(frame.columns)
        ordered = frame[schema.names].copy()
        ordered["reason"] = ordered["reason"].fillna("").astype(str)
        table = pa.Table.from_pandas(ordered, schema=schema, preserve_index=False)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        unique = uuid.uuid4().hex[:12]
        final = target_dir / f"part-{stamp}-{unique}.parquet"
        temporary = target_dir / f".tmp-{stamp}-{unique}.parquet"  # hidden: dataset readers skip dot files
        try:
            pq.write_table(table, temporary)
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        return final

    def model_names(self) -> list[str]:
        """Names of the models with results, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir() if path.is_dir() and not path.name.startswith("."))

    def _version_dirs(self, model_name: str) -> list[Path]:
        model_dir = self.root / model_name
        if not model_dir.is_dir():
            return []
        return sorted(p for p in model_dir.iterdir() if p.is_dir() and any(p.glob("part-*.parquet")))

    @staticmethod
    def _read_dir(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """All parts of one weights folder (hidden temporary files excluded) as a DataFrame; a column missing from
        some parts (e.g. written by an older version) is null there rather than dropped."""
        dataset = pads.dataset(path, format="parquet", ignore_prefixes=[".", "_"])
        schema = pa.unify_schemas([fragment.physical_schema for fragment in dataset.get_fragments()])
        dataset = pads.dataset(path, format="parquet", ignore_prefixes=[".", "_"], schema=schema)
        return dataset.to_table(columns=list(columns) if columns else None).to_pandas()

    def completed_ids(self, model_name: str, weights_sha256: str) -> set[str]:
        """Spectrum ids with an ``ok`` row for this model and weights: what a rerun skips. Spectra recorded
        as ``no_result`` (a failed task, a non-finite output) are not in the set, so a rerun tries them again."""
        path = self.part_dir(model_name, weights_sha256)
        if not path.is_dir() or not any(path.glob("part-*.parquet")):
            return set()
        frame = self._read_dir(path, ["spectrum_id", "status"])
        return set(frame.loc[frame["status"] == STATUS_OK, "spectrum_id"])

    def read(self, model_name: str | None = None, latest_only: bool = True) -> pd.DataFrame:
        """Results as one DataFrame.

        ``latest_only=True`` (the release view): for each model only its most recently computed weights version,
        and one row per spectrum — the newest ``ok`` row, else the newest ``no_result`` row.
        ``latest_only=False``: every row ever written, all weights versions (the history).
        """
        names = [model_name] if model_name is not None else self.model_names()
        frames = []
        for name in names:
            versions = [self._read_dir(path) for path in self._version_dirs(name)]
            if not versions:
                continue
            if latest_only:
                newest = max(versions, key=lambda frame: frame["created"].max())
                frames.append(_one_row_per_spectrum(newest))
            else:
                frames.extend(versions)
        if not frames:
            return pd.DataFrame({name: pd.Series(dtype=object if pa.types.is_string(field.type) else np.int64)
                                 for name, field in zip(METADATA_COLUMNS, METADATA_SCHEMA)})
        return pd.concat(frames, ignore_index=True, sort=False)


def _one_row_per_spectrum(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one row per spectrum_id: the newest ``ok`` row, or the newest row when none is ``ok``
    (a retried task can have written a part before its worker died)."""
    ranked = frame.assign(_ok=(frame["status"] == STATUS_OK).astype(int))
    ranked = ranked.sort_values(["_ok", "created"], kind="stable")
    kept = ranked.drop_duplicates("spectrum_id", keep="last").drop(columns="_ok")
    return kept.sort_values("spectrum_id", kind="stable").reset_index(drop=True)
