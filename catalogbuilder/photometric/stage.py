"""The photometric stage: a table of sources with photometry (no spectrum) → a release table of Teff, log g, [Fe/H].

Rows are processed in partitions mapped over a Dask cluster (``dask.dataframe.map_partitions``); each worker loads
the model once. Every input row gives one output row: a row without any of the model's bands and without a parallax
gets ``status = no_result`` (NO_RESULT, values NaN), a row with some inputs missing gets a result and
MISSING_PHOTOMETRY (a warning). Flags come from :mod:`catalogbuilder.calibrate.flags` (same bits and masks as the
spectral tables). Recommended errors: ``e_X = sqrt(raw_e_X² + σ_X²)`` with σ_X the model's scatter on its held-out
test split (``catalogbuilder.yaml`` ``training.targets.X.test.std``): the Monte-Carlo scatter from photometric errors
alone misses the model's own error, and the DR19 relations were derived for APOGEE Net spectra, not for this model.

Output: ``<out>/photometric/<model>/allStar-<model>-photometric.{fits.gz,parquet}``.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd

from catalogbuilder import __version__
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags
from catalogbuilder.constants import DEFAULT_DRAWS, NOISELESS_PREFIX
from catalogbuilder.models.montecarlo import spectrum_seed
from catalogbuilder.models.photometric import FAMILY, PARALLAX, TARGETS, PhotometricModel
from catalogbuilder.models.registry import ModelSummary, describe_model
from catalogbuilder.release.schema import PHOTOMETRIC_COLUMNS, PRIMARY_KEYS, flag_cards, table_meta, to_table
from catalogbuilder.release.writer import Card, ReleaseTransaction, write_table

log = logging.getLogger(__name__)

SURVEY = "photometric"
VALUE_COLUMNS: tuple[str, ...] = tuple(
    name for target in TARGETS for name in (target, f"e_{target}", f"raw_e_{target}", f"{NOISELESS_PREFIX}{target}")
) + ("logteff", "raw_e_logteff")
OUTPUT_COLUMNS: tuple[str, ...] = tuple(spec.name for spec in PHOTOMETRIC_COLUMNS)


@functools.lru_cache(maxsize=4)
def _cached_model(model_dir: str) -> PhotometricModel:
    """One loaded model per worker process and directory."""
    return PhotometricModel.load(model_dir)


def predict_partition(partition: pd.DataFrame, model_dir: str, draws: int, seed: int, created: str) -> pd.DataFrame:
    """Results of one partition of canonical input rows (see :data:`OUTPUT_COLUMNS`), flagged and calibrated.
    The weights are loaded (once per process) only for a partition with rows: the empty partition Dask computes on
    the client for the output's column types needs only the model's summary."""
    summary = describe_model(model_dir)
    rows = partition.reset_index(drop=True)
    inputs = list(summary.photometry_keys)  # the bands, then the parallax
    present = np.stack([np.isfinite(pd.to_numeric(rows[c], errors="coerce").to_numpy(float)) if c in rows.columns
                        else np.zeros(len(rows), bool) for c in inputs], axis=1) if len(rows) else np.zeros((0, len(inputs)), bool)
    out = pd.DataFrame({
        "object_id": rows["object_id"].astype(str) if "object_id" in rows.columns else pd.Series([""] * len(rows)),
        "ra": pd.to_numeric(rows.get("ra", pd.Series(np.nan, index=rows.index)), errors="coerce").astype(float),
        "dec": pd.to_numeric(rows.get("dec", pd.Series(np.nan, index=rows.index)), errors="coerce").astype(float),
    })
    seeds = [spectrum_seed(object_id, seed) for object_id in out["object_id"]]
    model = _cached_model(model_dir) if len(rows) else None
    result = model.predict(None, None, draws=draws, seeds=seeds, photometry=rows) if model is not None else {}
    for name in ("logteff", "raw_e_logteff", *(n for t in TARGETS for n in (t, f"raw_e_{t}", f"{NOISELESS_PREFIX}{t}"))):
        out[name] = np.asarray(result.get(name, np.full(len(rows), np.nan)), dtype=float)
    for target in TARGETS:
        model_scatter = _test_scatter(model, target) if model is not None else 0.0
        raw = out[f"raw_e_{target}"].to_numpy(float)
        out[f"e_{target}"] = np.sqrt(np.where(np.isfinite(raw), raw, 0.0) ** 2 + model_scatter**2)
        out.loc[~np.isfinite(raw), f"e_{target}"] = np.nan
    out["n_inputs"] = present.sum(axis=1)
    out["missing_bands"] = [",".join(name for name, ok in zip(inputs, row) if not ok) for row in present]
    usable = out["n_inputs"] > 0
    out["status"] = np.where(usable, "ok", "no_result")
    out["reason"] = np.where(usable, "", "no usable photometry: none of " + ",".join(inputs))
    out["gaia_matched"] = present[:, inputs.index(PARALLAX)] if len(rows) else np.zeros(0, bool)
    flagged = apply_flags(out, list(VALUE_COLUMNS))
    flagged["n_draws"] = int(draws)
    flagged["seed"] = np.asarray(seeds, dtype=np.uint64).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    flagged["model_name"] = summary.name
    flagged["weights_sha256"] = summary.weights_sha256
    flagged["software_version"] = __version__
    flagged["created"] = created
    return flagged[list(OUTPUT_COLUMNS)]


def _test_scatter(model: PhotometricModel, target: str) -> float:
    """σ of the model on its held-out test split (0 when the model directory does not record it)."""
    try:
        return float(model.config.training["targets"][target]["test"]["std"])
    except (KeyError, TypeError):
        return 0.0


def run_photometric(frame: pd.DataFrame, model: str | Path, draws: int = DEFAULT_DRAWS, seed: int = 0,
                    partition_rows: int = 50_000, client=None) -> pd.DataFrame:  # noqa: ANN001 - distributed.Client
    """Predict every row of a canonical input table with Dask (``client`` or the current/local scheduler)."""
    model_dir = str(describe_photometric_model(model).directory)  # fail early, in the caller, on a bad directory
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = predict_partition(frame.iloc[:0], model_dir, draws, seed, created)
    partitions = dd.from_pandas(frame.reset_index(drop=True), chunksize=max(1, partition_rows), sort=False)
    graph = partitions.map_partitions(predict_partition, model_dir, draws, seed, created, meta=meta)
    result = graph.compute() if client is None else client.compute(graph).result()
    return result.reset_index(drop=True)


def describe_photometric_model(model: str | Path) -> ModelSummary:
    """The summary of a photometric model (files read, weights not loaded); ``ValueError`` for a model of another
    family, ``FileNotFoundError`` for a missing model or model file."""
    summary = describe_model(model)
    if summary.family != FAMILY:
        raise ValueError(f"model {summary.name!r} is a {summary.family!r} model, not a {FAMILY!r} one")
    return summary


def _header_cards(rows: pd.DataFrame, thresholds: FlagThresholds, inputs: Sequence[str]) -> list[Card]:
    weights = sorted(set(rows["weights_sha256"]))
    return [
        ("SOFTVER", __version__, "catalogbuilder version that wrote the table"),
        ("SURVEY", SURVEY, "sources with photometry only"),
        ("LEVEL", "allStar", "one row per input source"),
        ("MODEL", str(rows["model_name"].iloc[0]) if len(rows) else "", "model name"),
        ("WEIGHTS", ",".join(weights), "SHA-256 of the model weights"),
        ("CREATED", str(rows["created"].iloc[0]) if len(rows) else "", "UTC time the rows were computed"),
        ("NROWS", len(rows), "rows, one per input source"),
        ("ECALIB", "e_X = sqrt(raw_e_X**2 + test_std_X**2)", "recommended errors"),
        *flag_cards(thresholds, inputs),
    ]


def write_photometric_release(rows: pd.DataFrame, out_dir: str | Path, inputs: Sequence[str] = (),
                              thresholds: FlagThresholds = FlagThresholds(),
                              provenance: dict[str, object] | None = None) -> tuple[Path, Path]:
    """Publish the release table as gzipped FITS and Parquet (same rows and columns) in ``out_dir`` atomically
    (:class:`~catalogbuilder.release.writer.ReleaseTransaction`, ``provenance`` recorded in its manifest); returns
    both paths.

    ``inputs``: the model's input columns, named in the MISSING_PHOTOMETRY description of the header."""
    model_name = str(rows["model_name"].iloc[0]) if len(rows) else "unknown"
    table = to_table(rows, PHOTOMETRIC_COLUMNS, table_meta(_header_cards(rows, thresholds, inputs)))
    with ReleaseTransaction(out_dir) as release:
        paths = write_table(table, release, f"{SURVEY}/{model_name}/allStar-{model_name}-{SURVEY}", "ALLSTAR", PRIMARY_KEYS)
        release.commit({"stage": "photometric", "model": model_name, **(provenance or {})})
    log.info("wrote %d rows to %s and %s", len(rows), *paths)
    return paths


def photometric_release(input_table: str | Path, model: str | Path, out_dir: str | Path, draws: int = DEFAULT_DRAWS,
                        seed: int = 0, partition_rows: int = 50_000, client=None,  # noqa: ANN001 - distributed.Client
                        gaia: str | Path | None = None, radius_arcsec: float = 1.0) -> tuple[pd.DataFrame, Path, Path]:
    """The whole photometric stage: read the input table (docs/other_models.md), optionally fill parallax and Gaia
    photometry by position from ``gaia``, predict over Dask partitions, write the release table. Returns (rows, FITS
    path, Parquet path). Raises ``tables.TableError``/``OSError`` for unreadable inputs, ``ValueError`` or
    ``FileNotFoundError`` for a bad model."""
    from catalogbuilder.photometric.table import join_by_position, read_photometric_table, read_reference_catalog

    frame = read_photometric_table(input_table)
    if gaia:
        columns = ["parallax", "parallax_error", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"]
        frame = join_by_position(frame, read_reference_catalog(gaia), columns, radius_arcsec)
    rows = run_photometric(frame, model, draws, seed, partition_rows, client)
    inputs = describe_photometric_model(model).photometry_keys  # the bands, then the parallax
    fits_path, parquet_path = write_photometric_release(rows, out_dir, inputs, provenance={"input": str(input_table)})
    return rows, fits_path, parquet_path


__all__ = ["OUTPUT_COLUMNS", "photometric_release", "predict_partition", "run_photometric", "write_photometric_release"]
