"""Memory and time of one gzipped FITS allStar table streamed from a partitioned Parquet table
(``writer.write_fits_from_parquet``), at N and 10 N rows.

Writes 10 N synthetic allStar rows of the spectral release schema (every column, realistic string lengths: 70-character
paths, 64-character checksums, non-ASCII reasons in 1 % of rows) as parts of ``--part-rows`` rows, then streams the
first N rows' parts and all parts into one FITS file each, every run in a fresh subprocess so that its peak RSS
(``VmHWM`` of /proc/self/status: unlike ``ru_maxrss`` it does not inherit the parent's size at fork) is its own. Memory must not grow with the rows: the final line prints the 10 N / N ratio of the peak RSS
(and of the time per row). Run: ``nice -n 10 python bench/release_fits_memory.py --rows 200000``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def synthetic_rows(start: int, n: int) -> pd.DataFrame:
    """``n`` allStar rows numbered from ``start`` with values of realistic size and type."""
    rng = np.random.default_rng(start)
    index = np.arange(start, start + n)
    return pd.DataFrame({
        "spectrum_id": [f"apogee-{i:016x}-0" for i in index],
        "source_id": [f"2M{i % 10**8:08d}+{i % 10**7:07d}" for i in index],
        "survey": "apogee", "kind": "combined",
        "file": [f"/data/sdss/dr19/apogee/spectro/redux/apStar-dr19-2M{i % 10**8:08d}+{i % 10**7:07d}.fits" for i in index],
        "file_sha256": [f"{i:064x}" for i in index], "row": 0, "visit": 0,
        "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n), "snr": rng.uniform(3, 500, n), "mjd": rng.uniform(55000, 60500, n),
        "good_pixel_fraction": rng.uniform(0.5, 1, n), "flux_constant": False,
        "gaia_source_id": pd.array(np.where(index % 10 == 0, None, 10**18 + index), dtype="Int64"),
        "gaia_sep_arcsec": rng.uniform(0, 1, n), "xmatch_catalog": "gaia_dr3",
        **{name: rng.uniform(5, 18, n) for name in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "tmass_j", "tmass_h", "tmass_k")},
        **{name: rng.uniform(0, 0.1, n) for name in ("e_tmass_j", "e_tmass_h", "e_tmass_k", "parallax_error")},
        "parallax": rng.uniform(-1, 10, n), "n_bands": 7, "missing_bands": np.where(index % 5 == 0, "phot_bp_mean_mag", ""),
        **{name: rng.uniform(0, 5000, n) for name in ("teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h", "raw_e_teff", "raw_e_logg", "raw_e_fe_h")},
        "result_flags": rng.integers(0, 4096, n), "flag_warn": index % 2 == 0, "flag_bad": index % 3 == 0, "status": "ok",
        "reason": np.where(index % 100 == 0, "6500 Å arm: zero inverse variance", ""), "n_draws": 20, "model_name": "apogeenet3",
        "weights_sha256": "5" * 64, "software_version": "0.1.0", "created": "2026-11-23T13:00:00+00:00",
    })


def write_parts(folder: Path, total: int, part_rows: int) -> None:
    from catalogbuilder.release.schema import spectral_columns, to_table
    from catalogbuilder.release.writer import part_name, write_parquet

    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, total, part_rows):
        table = to_table(synthetic_rows(start, min(part_rows, total - start)), spectral_columns(False), {"MODEL": "apogeenet3"})
        write_parquet(table, folder / part_name(f"{start // part_rows:05d}"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (Linux VmHWM; ru_maxrss elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(parts: list[str], out: str) -> dict[str, float]:
    """Run in a fresh process: stream ``parts`` into ``out``; peak RSS (MB), RSS after imports, seconds, file MB."""
    import psutil

    from catalogbuilder.release.writer import write_fits_from_parquet

    baseline = psutil.Process().memory_info().rss / 2**20
    began = time.perf_counter()
    rows = write_fits_from_parquet(parts, out, "ALLSTAR")
    return {"rows": rows, "seconds": time.perf_counter() - began, "baseline_mb": baseline,
            "peak_mb": peak_rss_mb(), "file_mb": Path(out).stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="N (the large run streams 10 N rows)")
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--measure", nargs=2, metavar=("PARTS_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure[0]), args.measure[1])))
        return
    with tempfile.TemporaryDirectory(prefix="release-fits-") as scratch:
        folder = Path(scratch) / "allStar"
        began = time.perf_counter()
        write_parts(folder, 10 * args.rows, args.part_rows)
        print(f"wrote {10 * args.rows} rows in {len(list(folder.iterdir()))} parts in {time.perf_counter() - began:.0f} s")
        parts = sorted(str(path) for path in folder.iterdir())
        results = {}
        for label, rows in (("N", args.rows), ("10N", 10 * args.rows)):
            chosen = parts[: -(-rows // args.part_rows)]
            output = subprocess.run([sys.executable, __file__, "--measure", json.dumps(chosen), str(Path(scratch) / f"{label}.fits.gz")],
                                    capture_output=True, text=True, check=True).stdout
            results[label] = json.loads(output.strip().splitlines()[-1])
            r = results[label]
            print(f"{r['rows']:>9} rows: peak RSS {r['peak_mb']:.0f} MB (after imports {r['baseline_mb']:.0f} MB), "
                  f"{r['seconds']:.1f} s, {r['file_mb']:.0f} MB gzipped FITS")
        small, large = results["N"], results["10N"]
        print(f"release_fits_memory N={args.rows} peak_ratio={large['peak_mb'] / small['peak_mb']:.2f} "
              f"time_per_row_ratio={(large['seconds'] / large['rows']) / (small['seconds'] / small['rows']):.2f}")


if __name__ == "__main__":
    main()
