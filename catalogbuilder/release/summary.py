"""Per-release summary: row counts per survey/level/model, how often each flag bit is set, and a Kiel diagram per model."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from catalogbuilder.constants import ResultFlag
from catalogbuilder.release.tables import ReleaseTable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def table_summary(table: ReleaseTable) -> dict[str, object]:
    """Counts of one table: rows, results, NO_RESULT, flag_warn, flag_bad, and rows per flag bit (by name)."""
    rows = table.rows
    flags = rows["result_flags"].to_numpy(np.int64)
    return {
        "survey": table.survey,
        "level": table.level,
        "model": table.model_name,
        "rows": len(rows),
        "with_result": int(((flags & int(ResultFlag.NO_RESULT)) == 0).sum()),
        "flag_warn": int(rows["flag_warn"].sum()),
        "flag_bad": int(rows["flag_bad"].sum()),
        "bits": {bit.name: int(((flags & int(bit)) != 0).sum()) for bit in ResultFlag},
    }


def summarize(tables: Sequence[ReleaseTable]) -> pd.DataFrame:
    """One row per table (survey, level, model, counts) with one column per flag bit."""
    records = []
    for table in tables:
        summary = table_summary(table)
        bits = summary.pop("bits")
        records.append(summary | bits)
    return pd.DataFrame.from_records(records)


def kiel_figure(tables: Sequence[ReleaseTable], title: str) -> Figure:
    """Teff–log g diagram of the given tables (both axes inverted, as astronomers plot them), coloured by [Fe/H]
    on a fixed -2…0.5 dex scale (the DR19 reliable range); flag_bad rows grey, rows without values left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pd.concat([table.rows for table in tables], ignore_index=True)
    finite = np.isfinite(rows["teff"]) & np.isfinite(rows["logg"])
    good = rows.loc[finite & ~rows["flag_bad"]]
    bad = rows.loc[finite & rows["flag_bad"]]
    figure, axes = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    axes.scatter(bad["teff"], bad["logg"], s=8, c="0.75", label=f"flag_bad ({len(bad)})", zorder=1)
    points = axes.scatter(good["teff"], good["logg"], s=10, c=good["fe_h"], cmap="viridis", vmin=-2.0, vmax=0.5,
                          label=f"good ({len(good)})", zorder=2)
    figure.colorbar(points, ax=axes, label="[Fe/H] (dex)")
    axes.set_xlabel("Teff (K)")
    axes.set_ylabel("log g (dex)")
    if not len(good) + len(bad):  # nothing to plot: a typical stellar range, so the empty frame still reads right
        axes.set_xlim(3000, 8000)
        axes.set_ylim(0, 5.5)
    axes.invert_xaxis()
    axes.invert_yaxis()
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    return figure


def kiel_diagram(tables: Sequence[ReleaseTable], path: str | Path, title: str) -> Path:
    """Save :func:`kiel_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    figure = kiel_figure(tables, title)
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_summary(tables: Sequence[ReleaseTable], out_dir: str | Path) -> list[Path]:
    """Write ``summary.json``, ``summary.csv`` and ``kiel-<model>.png`` (all surveys and levels of a model) into ``out_dir``."""
    out_dir = Path(out_dir)
    frame = summarize(tables)
    written = [out_dir / "summary.csv", out_dir / "summary.json"]
    frame.to_csv(written[0], index=False)
    written[1].write_text(json.dumps([table_summary(table) for table in tables], indent=2) + "\n")
    for model in sorted({table.model_name for table in tables}):
        own = [table for table in tables if table.model_name == model]
        written.append(kiel_diagram(own, out_dir / f"kiel-{model}.png", f"{model}: {sum(len(t.rows) for t in own)} spectra"))
    return written
