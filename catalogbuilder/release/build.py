"""Build a release from a spectrum store: streaming, partitioned, incremental and atomic.

The store is cut into partitions of :data:`~catalogbuilder.store.ranged.RANGE_SPECTRA` positions per grid. For each
partition and model the release reads only that range — store columns (never flux: quality was computed at ingest),
the model's compacted results and the cached cross-match — and writes one Parquet part per table it has rows for
(``<survey>/<model>/<level>-<model>-<survey>/part-<grid>-<k>.parquet``). A partition whose inputs did not change
since the previous release (same fingerprint: configuration, weights, results and cross-match range files, the
range's active and allStar flags) keeps its parts, so an increment rewrites only the partitions it touched. Memory
holds one partition plus a few bytes per spectrum for the one-row-per-star choice (``star_rows``). The single FITS
file of a table is streamed from its parts (release/writer.py). Everything is published at once by a
:class:`~catalogbuilder.release.writer.ReleaseTransaction`, with ``release_state.json`` (fingerprints, counts) in it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from catalogbuilder import __version__
from catalogbuilder.calibrate.flags import FlagThresholds
from catalogbuilder.constants import GRIDS, KIND_COMBINED, PREDICTED_KINDS, SURVEY_GRID
from catalogbuilder.crossmatch.cache import MatchCache, MatchConfig
from catalogbuilder.release import assemble, summary
from catalogbuilder.release.schema import spectral_columns, table_meta, to_table
from catalogbuilder.release.writer import ReleaseTransaction, read_manifest, write_fits_from_parquet, write_partitions
from catalogbuilder.store import SpectrumStore
from catalogbuilder.store.ranged import RANGE_SPECTRA
from catalogbuilder.store.results import COMPACT, ResultsStore

log = logging.getLogger(__name__)

STATE_FILE = "release_state.json"
STATE_VERSION = 1
REJECTS_KEY = "rejects"
INDEX_COLUMNS: tuple[str, ...] = ("star_key", "kind", "active", "snr")


@dataclasses.dataclass(frozen=True)
class ReleaseOptions:
    """How a release is built: the cross-match, the flag thresholds, and whether the single FITS files are written
    (a data release) or only the partitioned Parquet tables (a nightly increment)."""

    match: MatchConfig = MatchConfig()
    thresholds: FlagThresholds = FlagThresholds()
    fits: bool = True

    def key(self) -> str:
        """Hash of everything in the options that changes released values."""
        text = json.dumps({"match": self.match.key(), "thresholds": dataclasses.asdict(self.thresholds),
                           "version": __version__, "state": STATE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelResults:
    """The results of one model the release shows: its newest weights folder, grid and whether it predicts RV."""

    name: str
    folder: Path
    weights_sha256: str
    grid: str
    has_rv: bool


@dataclasses.dataclass(frozen=True)
class Table:
    """One release table of a model: its survey and level, and where its parts and FITS file live."""

    survey: str
    model: str
    level: str

    @property
    def stem(self) -> str:
        return f"{self.survey}/{self.model}/{self.level}-{self.model}-{self.survey}"


@dataclasses.dataclass
class ReleaseReport:
    """What a release build did: the tables (name → survey, level, model, counts), partitions written and kept,
    FITS files written, the new manifest, and the seconds it took."""

    out_dir: Path
    tables: dict[str, dict[str, Any]]
    partitions_written: int = 0
    partitions_kept: int = 0
    fits_written: list[str] = dataclasses.field(default_factory=list)
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> pd.DataFrame:
        """One row per table with its counts (see :func:`catalogbuilder.release.summary.summary_frame`)."""
        return summary.summary_frame(summary.summary_records(self.tables))


def release_models(results: ResultsStore, store: SpectrumStore) -> list[ModelResults]:
    """Every model with results, at its newest weights version; ``grid`` is the ingest grid holding its spectra (the
    base grid of a model's own grid)."""
    models = []
    for name in results.model_names():
        folder = results.latest_version(name)
        if folder is None:
            continue
        state = results.state(folder)
        grid = state["grid"] if state["grid"] in GRIDS else store.base_grid(state["grid"])
        models.append(ModelResults(name, folder, state["weights_sha256"], grid, "rv" in state["columns"]))
    return models


def _file_stamp(path: Path) -> list[int]:
    """Size and modification time of a file (0, 0 when absent): changes whenever the file is rewritten."""
    if not path.exists():
        return [0, 0]
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _fingerprint(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def build_release(store: SpectrumStore, out_dir: str | Path, options: ReleaseOptions = ReleaseOptions(),
                  progress: bool = False) -> ReleaseReport:
    """Release every model with results in ``store`` (at its pinned or latest snapshot) into ``out_dir``: cross-match
    new positions, then per partition assemble, calibrate, flag and write the parts that changed, the summary, the
    Kiel diagrams and (with ``options.fits``) the single FITS files; publish all at once. Raises ``ValueError`` when
    the store holds no results."""
    began = time.perf_counter()
    store = store.at(store.snapshot_id)
    store.results.compact_all()
    models = release_models(store.results, store)
    if not models:
        raise ValueError(f"{store.path} holds no results: run inference before the release")
    cache = MatchCache(store, options.match)
    cache.update()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    provenance = {"created": created, "store": str(store.path), "snapshot": store.snapshot_id,
                  "radius_arcsec": str(options.match.radius_arcsec),
                  "catalogs": ",".join(Path(c).name for c in options.match.catalogs),
                  "epoch": "as given" if options.match.epoch is None else f"{options.match.epoch:g}"}
    out_dir = Path(out_dir)
    with ReleaseTransaction(out_dir) as release:
        builder = _Builder(store, cache, options, models, provenance, release, _previous_state(out_dir, options))
        builder.run(progress)
        report = builder.report
        report.manifest = release.commit({key: provenance[key] for key in ("store", "snapshot", "created")})
    report.seconds = time.perf_counter() - began
    return report


def _previous_state(out_dir: Path, options: ReleaseOptions) -> dict[str, Any]:
    """The state of the release in ``out_dir`` when it was built with the same options (else nothing is reused)."""
    path = out_dir / STATE_FILE
    if read_manifest(out_dir) is None or not path.exists():
        return {}
    state = json.loads(path.read_text())
    return state if state.get("options") == options.key() else {"partitions": {}, "tables": state.get("tables", {})}


class _Builder:
    """One release build inside an open transaction."""

    def __init__(self, store: SpectrumStore, cache: MatchCache, options: ReleaseOptions, models: list[ModelResults],
                 provenance: dict[str, str], release: ReleaseTransaction, previous: dict[str, Any]) -> None:
        self.store, self.cache, self.options, self.models = store, cache, options, models
        self.provenance, self.release = provenance, release
        self.previous_partitions: dict[str, Any] = previous.get("partitions", {})
        self.previous_tables: dict[str, Any] = previous.get("tables", {})
        self.partitions: dict[str, Any] = {}
        self.report = ReleaseReport(release.out_dir, {})
        self.changed_tables: set[str] = set()

    def run(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        grids = [grid for grid in GRIDS if any(model.grid == grid for model in self.models)]
        work = [(grid, k) for grid in grids for k in range(-(-self.store.length(grid) // RANGE_SPECTRA))]
        stars = {grid: self._star_rows(grid) for grid in grids}
        for grid, k in tqdm(work, desc="release", unit="partition", disable=not progress):
            self._partition(grid, k, stars[grid])
        self._rejects()
        self._finish()

    def _star_rows(self, grid: str) -> tuple[np.ndarray, np.ndarray]:
        """(active & predicted, allStar row) flags over a grid's positions, read in ranges (a few bytes per spectrum)."""
        n = self.store.length(grid)
        active, star_key, combined, snr = (np.zeros(n, bool), np.zeros(n, np.uint64), np.zeros(n, bool),
                                           np.zeros(n, np.float32))
        for start in range(0, n, 4 * RANGE_SPECTRA):
            stop = min(n, start + 4 * RANGE_SPECTRA)
            block = self.store.columns(grid, INDEX_COLUMNS, start, stop)
            kind = block["kind"].to_numpy(dtype=object)
            active[start:stop] = block["active"].to_numpy(bool) & np.isin(kind, PREDICTED_KINDS)
            star_key[start:stop] = block["star_key"].to_numpy(np.uint64)
            combined[start:stop] = kind == KIND_COMBINED
            snr[start:stop] = block["snr"].to_numpy(np.float32)
        return active, assemble.star_rows(star_key, combined, active, snr)

    def _partition(self, grid: str, k: int, flags: tuple[np.ndarray, np.ndarray]) -> None:
        start, stop = k * RANGE_SPECTRA, min((k + 1) * RANGE_SPECTRA, len(flags[0]))
        active, stars = flags[0][start:stop], flags[1][start:stop]
        spectra = matches = None
        for model in (m for m in self.models if m.grid == grid):
            key = f"{model.name}/{grid}/{k:06d}"
            results_file = model.folder / COMPACT / f"range-{k:06d}.parquet"
            fingerprint = _fingerprint(self.options.key(), model.weights_sha256, _file_stamp(results_file),
                                       _file_stamp(self.cache.table(grid).path(k)), stop - start, active, stars)
            previous = self.previous_partitions.get(key)
            if previous is not None and previous["fingerprint"] == fingerprint:
                self.partitions[key] = previous
                self.report.partitions_kept += 1
                continue
            if spectra is None:  # read once for every model of the grid
                spectra = self.store.columns(grid, None, start, stop).loc[active]
                matches = self.cache.read(grid, start, stop)
            results = self.store.results.rows(model.folder, start, stop)
            rows = assemble.model_rows(model.name, model.weights_sha256, spectra, results, matches,
                                       self.provenance["created"], self.options.thresholds)
            levels = assemble.table_levels(rows, stars[spectra.index.to_numpy() - start])
            self.partitions[key] = self._write(model, f"{grid}-{k:06d}", rows, levels, fingerprint, previous)
            self.report.partitions_written += 1

    def _write(self, model: ModelResults, part: str, rows: pd.DataFrame, levels: dict[str, np.ndarray],
               fingerprint: str, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Write one partition's parts of a model's tables; delete the parts it wrote before that it no longer has."""
        written: dict[str, Any] = {}
        for level, where in levels.items():
            for survey, group in rows.loc[where].groupby("survey", sort=True):
                table = Table(str(survey), model.name, level)
                meta = table_meta(assemble.header_cards(table.survey, model.name, level, model.weights_sha256,
                                                        self.provenance, self.options.thresholds))
                ordered = group.sort_values("spectrum_id", kind="stable")
                write_partitions(self.release, table.stem, {part: to_table(ordered, spectral_columns(model.has_rv), meta)})
                written[table.stem] = {"survey": table.survey, "level": level, "model": model.name,
                                       "counts": summary.table_counts(ordered)}
                self.changed_tables.add(table.stem)
        for stem in set((previous or {}).get("tables", {})) - set(written):
            write_partitions(self.release, stem, {}, delete=[part])
            self.changed_tables.add(stem)
        return {"fingerprint": fingerprint, "part": part, "tables": written}

    def _rejects(self) -> None:
        """The rejected inputs of each model's surveys (or of surveys no model covers) as a ``rejects`` part."""
        rejects = assemble.reject_rows(self.store.rejects())
        covered = {survey for model in self.models for survey, grid in SURVEY_GRID.items() if grid == model.grid}
        for model in self.models:
            surveys = {survey for survey, grid in SURVEY_GRID.items() if grid == model.grid}
            mine = rejects.loc[rejects["survey"].isin(surveys) | ~rejects["survey"].isin(covered)]
            key = f"{model.name}/{REJECTS_KEY}"
            fingerprint = _fingerprint(self.options.key(), model.weights_sha256, mine.to_dict("list"))
            previous = self.previous_partitions.get(key)
            if previous is not None and previous["fingerprint"] == fingerprint:
                self.partitions[key] = previous
                continue
            rows = assemble.model_rows(model.name, model.weights_sha256, mine, pd.DataFrame(columns=["spectrum_id"]),
                                       pd.DataFrame(columns=["spectrum_id"]), self.provenance["created"],
                                       self.options.thresholds)
            levels = {assemble.LEVEL_STAR: np.ones(len(rows), bool)}
            self.partitions[key] = self._write(model, REJECTS_KEY, rows, levels, fingerprint, previous)

    def _finish(self) -> None:
        """Tables of vanished models removed, FITS files and Kiel diagrams of changed tables, summary, state."""
        tables: dict[str, dict[str, Any]] = {}
        for partition in self.partitions.values():
            for stem, entry in partition["tables"].items():
                tables.setdefault(stem, {**{k: entry[k] for k in ("survey", "level", "model")}, "parts": []})
                tables[stem]["parts"].append(entry["counts"])
        for stem in set(self.previous_tables) - set(tables):  # a model or survey with no rows any more
            for part in self.release.partitions(stem):
                self.release.delete(f"{stem}/{part.name}")
            if (self.release.out_dir / f"{stem}.fits.gz").exists():
                self.release.delete(f"{stem}.fits.gz")
        for stem, table in tables.items():
            table["counts"] = summary.add_counts(table.pop("parts"))
            fits_name = f"{stem}.fits.gz"
            stale = stem in self.changed_tables or not (self.release.out_dir / fits_name).exists()
            if self.options.fits and stale:
                write_fits_from_parquet(self.release.partitions(stem), self.release.path(fits_name),
                                        table["level"].upper(), primary_keys=assemble.PRIMARY_KEYS)
                self.report.fits_written.append(fits_name)
            elif not self.options.fits and stem in self.changed_tables and (self.release.out_dir / fits_name).exists():
                self.release.delete(fits_name)  # a FITS file that no longer matches its parts is withdrawn
        self.report.tables = tables
        records = summary.summary_records(tables)
        summary.write_summary(records, self.release.path("summary.csv"), self.release.path("summary.json"))
        changed_models = {tables[stem]["model"] for stem in self.changed_tables if stem in tables}
        for model in sorted({t["model"] for t in tables.values()}):
            png = f"kiel-{model}.png"
            if model in changed_models or not (self.release.out_dir / png).exists():
                parts = [part for stem, t in sorted(tables.items()) if t["model"] == model
                         and t["level"] == assemble.LEVEL_STAR for part in self.release.partitions(stem)]
                stars = sum(t["counts"]["rows"] for t in tables.values()
                            if t["model"] == model and t["level"] == assemble.LEVEL_STAR)
                summary.kiel_diagram(parts, self.release.path(png), f"{model}: {stars} stars")
        state = {"options": self.options.key(), "partitions": self.partitions, "tables": tables}
        self.release.path(STATE_FILE).write_text(json.dumps(state) + "\n")


def table_parts(out_dir: str | Path, stem: str) -> list[Path]:
    """The Parquet parts of a published table, in order (read them with ``pandas.read_parquet(folder)`` too)."""
    return sorted((Path(out_dir) / stem).glob("part-*.parquet"))


def read_table(out_dir: str | Path, stem: str) -> pd.DataFrame:
    """A whole published table as one DataFrame (O(rows): for inspection and tests)."""
    parts = table_parts(out_dir, stem)
    return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True) if parts else pd.DataFrame()
