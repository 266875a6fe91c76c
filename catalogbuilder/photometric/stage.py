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
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from catalogbuilder import __version__
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags
from catalogbuilder.constants import DEFAULT_DRAWS, FLAG_BAD_MASK, FLAG_WARN_MASK
from catalogbuilder.models.montecarlo import spectrum_seed
from catalogbuilder.models.photometric import PARALLAX, TARGETS, TARGET_UNITS, PhotometricModel
from catalogbuilder.models.registry import resolve_model_dir
from catalogbuilder.release.tables import fits_ready

log = logging.getLogger(__name__)

SURVEY = "photometric"
VALUE_COLUMNS: tuple[str, ...] = tuple(
    name for target in TARGETS for name in (target, f"e_{target}", f"raw_e_{target}")
) + ("logteff", "raw_e_logteff")
OUTPUT_COLUMNS: tuple[str, ...] = (
    "object_id", "ra", "dec", *VALUE_COLUMNS, "n_inputs", "missing_bands", "result_flags", "flag_warn", "flag_bad",
    "status", "reason", "n_draws", "seed", "model_name", "weights_sha256", "software_version", "created",
)


@functools.lru_cache(maxsize=4)
def _cached_model(model_dir: str) -> PhotometricModel:
    """One loaded model per worker process and directory."""
    return PhotometricModel.load(model_dir)


def predict_partition(partition: pd.DataFrame, model_dir: str, draws: int, seed: int, created: str) -> pd.DataFrame:
    """Results of one partition of canonical input rows (see :data:`OUTPUT_COLUMNS`), flagged and calibrated."""
    model = _cached_model(model_dir)
    rows = partition.reset_index(drop=True)
    inputs = [*model.config.bands, PARALLAX]
    present = np.stack([np.isfinite(pd.to_numeric(rows[c], errors="coerce").to_numpy(float)) if c in rows.columns
                        else np.zeros(len(rows), bool) for c in inputs], axis=1) if len(rows) else np.zeros((0, len(inputs)), bool)
    out = pd.DataFrame({
        "object_id": rows["object_id"].astype(str) if "object_id" in rows.columns else pd.Series([""] * len(rows)),
        "ra": pd.to_numeric(rows.get("ra", pd.Series(np.nan, index=rows.index)), errors="coerce").astype(float),
        "dec": pd.to_numeric(rows.get("dec", pd.Series(np.nan, index=rows.index)), errors="coerce").astype(float),
    })
    seeds = [spectrum_seed(object_id, seed) for object_id in out["object_id"]]
    result = model.predict(None, None, draws=draws, seeds=seeds, photometry=rows) if len(rows) else {}
    for name in ("logteff", "raw_e_logteff", *(n for t in TARGETS for n in (t, f"raw_e_{t}"))):
        out[name] = np.asarray(result.get(name, np.full(len(rows), np.nan)), dtype=float)
    for target in TARGETS:
        model_scatter = _test_scatter(model, target)
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
    flagged["model_name"] = model.name
    flagged["weights_sha256"] = model.weights_sha256
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
    model_dir = str(resolve_model_dir(model))
    PhotometricModel.load(model_dir)  # fail early, in the caller, on a bad model directory
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = predict_partition(frame.iloc[:0], model_dir, draws, seed, created)
    partitions = dd.from_pandas(frame.reset_index(drop=True), chunksize=max(1, partition_rows), sort=False)
    graph = partitions.map_partitions(predict_partition, model_dir, draws, seed, created, meta=meta)
    result = graph.compute() if client is None else client.compute(graph).result()
    return result.reset_index(drop=True)


def _header_cards(rows: pd.DataFrame, thresholds: FlagThresholds, inputs: Sequence[str]) -> list[tuple[str, object, str]]:
    weights = sorted(set(rows["weights_sha256"]))
    cards: list[tuple[str, object, str]] = [
        ("SOFTVER", __version__, "catalogbuilder version that wrote the table"),
        ("SURVEY", SURVEY, "sources with photometry only"),
        ("LEVEL", "allStar", "one row per input source"),
        ("MODEL", str(rows["model_name"].iloc[0]) if len(rows) else "", "model name"),
        ("WEIGHTS", ",".join(weights), ""),  # a 64-character SHA-256 leaves no room for a comment
        ("CREATED", str(rows["created"].iloc[0]) if len(rows) else "", "UTC time the rows were computed"),
        ("NROWS", len(rows), "rows, one per input source"),
        ("ECALIB", "e_X = sqrt(raw_e_X**2 + test_std_X**2)", "recommended errors"),
    ]
    for bit, text in thresholds.describe(tuple(inputs)).items():
        cards.append((f"FLAG{bit.bit_length() - 1:02d}", f"{bit.name}: {text}", ""))
    cards.append(("FLAGWARN", int(FLAG_WARN_MASK), "flag_warn = result_flags & FLAGWARN != 0"))
    cards.append(("FLAGBAD", int(FLAG_BAD_MASK), "flag_bad = result_flags & FLAGBAD != 0"))
    return cards


def write_photometric_release(rows: pd.DataFrame, out_dir: str | Path, inputs: Sequence[str] = (),
                              thresholds: FlagThresholds = FlagThresholds()) -> tuple[Path, Path]:
    """Write the release table as gzipped FITS and Parquet (same rows and columns); returns both paths.

    ``inputs``: the model's input columns, named in the MISSING_PHOTOMETRY description of the header."""
    model_name = str(rows["model_name"].iloc[0]) if len(rows) else "unknown"
    folder = Path(out_dir) / SURVEY / model_name
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"allStar-{model_name}-{SURVEY}"
    cards = _header_cards(rows, thresholds, inputs)
    table = fits_ready(Table.from_pandas(rows))
    # FITS has no 'dex': log g and [Fe/H] columns stay unitless there (their units are in the docs and Parquet metadata)
    units = {"ra": "deg", "dec": "deg", **{f"{p}teff": "K" for p in ("", "e_", "raw_e_")}}
    for name, unit in units.items():
        table[name].unit = unit
    hdu = fits.BinTableHDU(table, name="ALLSTAR")
    for key, value, comment in cards:
        hdu.header[key] = (value, comment)
    fits_path = folder / f"{stem}.fits.gz"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(fits_path, overwrite=True)
    arrow = pa.Table.from_pandas(rows, preserve_index=False)
    metadata = {b"catalogbuilder": json.dumps({key: value for key, value, _ in cards}).encode(),
                b"units": json.dumps({f"{p}{t}": TARGET_UNITS[t] for t in TARGETS for p in ("", "e_", "raw_e_")}).encode()}
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **metadata})
    parquet_path = folder / f"{stem}.parquet"
    temporary = parquet_path.with_name(f".{parquet_path.name}.tmp")
    pq.write_table(arrow, temporary)
    temporary.replace(parquet_path)
    log.info("wrote %d rows to %s and %s", len(rows), fits_path, parquet_path)
    return fits_path, parquet_path


def photometric_release(input_table: str | Path, model: str | Path, out_dir: str | Path, draws: int = DEFAULT_DRAWS,
                        seed: int = 0, partition_rows: int = 50_000, client=None,  # noqa: ANN001 - distributed.Client
                        gaia: str | Path | None = None, radius_arcsec: float = 1.0) -> tuple[pd.DataFrame, Path, Path]:
    """The whole photometric stage: read the input table (docs/other_models.md), optionally fill parallax and Gaia
    photometry by position from ``gaia``, predict over Dask partitions, write the release table. Returns (rows, FITS
    path, Parquet path). Raises ``PhotometricTableError``/``OSError`` for unreadable inputs, ``ValueError`` or
    ``FileNotFoundError`` for a bad model."""
    from catalogbuilder.photometric.table import join_by_position, read_photometric_table, read_reference_catalog

    frame = read_photometric_table(input_table)
    if gaia:
        columns = ["parallax", "parallax_error", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"]
        frame = join_by_position(frame, read_reference_catalog(gaia), columns, radius_arcsec)
    rows = run_photometric(frame, model, draws, seed, partition_rows, client)
    bands = PhotometricModel.load(resolve_model_dir(model)).config.bands
    fits_path, parquet_path = write_photometric_release(rows, out_dir, [*bands, PARALLAX])
    return rows, fits_path, parquet_path


__all__ = ["OUTPUT_COLUMNS", "photometric_release", "predict_partition", "run_photometric", "write_photometric_release"]
