"""Per-release summary: row counts per survey/level/model, how often each flag bit is set, and a Kiel diagram per model.

Counts are kept per release partition (release/build.py) and summed, so an increment only counts its new partitions;
the Kiel diagram streams three columns out of a model's allStar tables, in bounded memory: a scatter plot up to
:data:`SCATTER_MAX_POINTS` stars, a density map of the Teff–log g plane above.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from catalogbuilder.constants import FLAG_SPECS, ResultFlag

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCATTER_MAX_POINTS = 20_000
TEFF_RANGE, LOGG_RANGE = (2500.0, 12000.0), (-1.0, 6.0)  # K, dex: the axes of a density Kiel diagram
KIEL_BINS = 200
COUNT_KEYS: tuple[str, ...] = ("rows", "with_result", "flag_warn", "flag_bad")


def table_counts(rows: pd.DataFrame) -> dict[str, Any]:
    """Counts of some rows of a table: rows, with a result, flag_warn, flag_bad, and rows per flag bit (by name)."""
    flags = rows["result_flags"].to_numpy(np.int64)
    return {
        "rows": len(rows),
        "with_result": int(((flags & int(ResultFlag.NO_RESULT)) == 0).sum()),
        "flag_warn": int(rows["flag_warn"].sum()),
        "flag_bad": int(rows["flag_bad"].sum()),
        "bits": {spec.name: int(((flags & int(spec.flag)) != 0).sum()) for spec in FLAG_SPECS},
    }


def add_counts(counts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several :func:`table_counts`."""
    total: dict[str, Any] = {key: 0 for key in COUNT_KEYS} | {"bits": {spec.name: 0 for spec in FLAG_SPECS}}
    for part in counts:
        for key in COUNT_KEYS:
            total[key] += int(part[key])
        for name, value in part["bits"].items():
            total["bits"][name] += int(value)
    return total


def summary_records(tables: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per table (``{"survey", "level", "model", "counts"}`` values of ``tables``), in name order."""
    return [{"survey": t["survey"], "level": t["level"], "model": t["model"], **t["counts"]}
            for _, t in sorted(tables.items())]


def summary_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per table (survey, level, model, counts) with one column per flag bit."""
    return pd.DataFrame.from_records([{k: v for k, v in record.items() if k != "bits"} | dict(record["bits"])
                                      for record in records])


def write_summary(records: Sequence[Mapping[str, Any]], csv_path: Path, json_path: Path) -> None:
    """``summary.csv`` and ``summary.json`` of the tables."""
    summary_frame(records).to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(list(records), indent=2) + "\n")


def kiel_figure(files: Sequence[str | Path], title: str) -> Figure:
    """Teff–log g diagram of the rows in Parquet ``files`` (both axes inverted, as astronomers plot them): good rows
    coloured by [Fe/H] on a fixed −2…0.5 dex scale and flag_bad rows grey when there are few, a density map (log
    counts) when there are many; rows without values left out. Reads four columns batch by batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    counts = np.zeros((KIEL_BINS, KIEL_BINS), dtype=np.int64)
    points: list[pd.DataFrame] = []
    n_points = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(columns=["teff", "logg", "fe_h", "flag_bad"]):
            rows = batch.to_pandas()
            rows = rows.loc[np.isfinite(rows["teff"]) & np.isfinite(rows["logg"])]
            counts += np.histogram2d(rows["teff"], rows["logg"], bins=KIEL_BINS, range=(TEFF_RANGE, LOGG_RANGE))[0].astype(
                np.int64)
            n_points += len(rows)
            if n_points <= SCATTER_MAX_POINTS:
                points.append(rows)
    figure, axes = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    if n_points > SCATTER_MAX_POINTS:
        image = axes.pcolormesh(np.linspace(*TEFF_RANGE, KIEL_BINS + 1), np.linspace(*LOGG_RANGE, KIEL_BINS + 1),
                                np.ma.masked_equal(counts.T, 0), norm=LogNorm(), cmap="viridis")
        figure.colorbar(image, ax=axes, label="stars per bin")
        axes.set_title(f"{title} ({n_points} with values)")
    else:
        rows = pd.concat(points, ignore_index=True) if points else pd.DataFrame(columns=["teff", "logg", "fe_h", "flag_bad"])
        good, bad = rows.loc[~rows["flag_bad"].astype(bool)], rows.loc[rows["flag_bad"].astype(bool)]
        axes.scatter(bad["teff"], bad["logg"], s=8, c="0.75", label=f"flag_bad ({len(bad)})", zorder=1)
        scatter = axes.scatter(good["teff"], good["logg"], s=10, c=good["fe_h"], cmap="viridis", vmin=-2.0, vmax=0.5,
                               label=f"good ({len(good)})", zorder=2)
        figure.colorbar(scatter, ax=axes, label="[Fe/H] (dex)")
        axes.legend(loc="upper left", fontsize="small")
        axes.set_title(title)
        if rows.empty:  # nothing to plot: a typical stellar range, so the empty frame still reads right
            axes.set_xlim(3000, 8000)
            axes.set_ylim(0, 5.5)
    axes.set_xlabel("Teff (K)")
    axes.set_ylabel("log g (dex)")
    axes.invert_xaxis()
    axes.invert_yaxis()
    figure.tight_layout()
    return figure


def kiel_diagram(files: Sequence[str | Path], path: str | Path, title: str) -> Path:
    """Save :func:`kiel_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    figure = kiel_figure(files, title)
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
