"""Release at survey scale: a full release of N APOGEE spectra, then the nightly increment of 1 % new spectra.

    python bench/release_scale.py --spectra 100000 [--workdir DIR] [--draws 2] [--keep]

1. **A store of N spectra** with their metadata and model results at realistic values, built without their flux (the
   release must not read flux; the flux chunks stay unwritten): stars of 1–6 visits (apStar-like: row 0, row 1 and
   one row per visit), positions, S/N, 2MASS and quality drawn from the distributions of real APOGEE headers, one
   apStar "file" per star in the files ledger, and results of the ``apogee_small`` conformance model drawn around a
   realistic Teff–log g–[Fe/H] population. A Gaia-like catalog (Parquet) holds a counterpart for 90 % of the stars.
   The catalog is a HATS catalog by default (the engine for Gaia-scale catalogs, matched partition by partition);
   ``--catalog-format parquet`` uses one Parquet file, which astropy reads and indexes whole.
2. **Full release** (``catalogbuilder release``, a data release: partitioned Parquet + the single FITS files) in its
   own process: wall time and peak memory (VmHWM).
3. **Increment** of 1 % new spectra, each step in its own process: ``catalogbuilder ingest`` of real apStar files
   (copies of ../shared/data's 3-visit giant with their own APOGEE_ID, so each is a new star), ``catalogbuilder infer``
   with the ``apogee_small`` conformance weights, ``catalogbuilder release --no-fits`` (a nightly release).

The full run of N spectra is the full release plus ingest and inference of N spectra at the per-spectrum rates the
increment measured (the flux of N spectra is not actually written here). Prints a table and the final line
``release_scale N=<N> full_s=<s> full_peak_mb=<MB> increment_s=<s> ratio=<increment / full run>``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from astropy.io import fits

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GIANT = SHARED / "data/apogee/apStar-dr17-2M17335483-2753043.fits"
MODEL = SHARED / "conformance/apogee_small"
BATCH = 65536  # spectra written per append while building the store
PEAK_PROBE = "import atexit, re\natexit.register(lambda: print('VMHWM_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)))\n"


def run_step(name: str, argv: list[str], cwd: Path) -> dict[str, float]:
    """Run ``catalogbuilder <argv>`` in a fresh process; its wall time and peak resident memory (MB)."""
    code = PEAK_PROBE + "import sys\nfrom catalogbuilder.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("VMHWM_KB")) / 1024
    return {"seconds": seconds, "peak_mb": peak}


def population(n_spectra: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-spectrum columns of ``n_spectra`` apStar-like spectra: stars with 1–6 visits, rows 0, 1 and the visits."""
    from catalogbuilder.store.layout import sha_key, stable_key, star_key

    header = fits.getheader(GIANT)
    n_visits = rng.integers(1, 7, size=n_spectra // 4 + 1)
    rows_per_star = 2 + n_visits
    n_stars = int(np.searchsorted(np.cumsum(rows_per_star), n_spectra)) + 1
    rows_per_star, n_visits = rows_per_star[:n_stars], n_visits[:n_stars]
    star = np.repeat(np.arange(n_stars), rows_per_star)[:n_spectra]
    row = np.concatenate([np.arange(k) for k in rows_per_star])[:n_spectra]
    star_ra, star_dec = rng.uniform(0, 360, n_stars), np.degrees(np.arcsin(rng.uniform(-1, 1, n_stars)))
    sha = np.array([f"{(s * 2654435761) % 2**64:016x}" * 4 for s in range(n_stars)])
    ids = np.array([f"2M{s:08d}+{s % 9973:07d}" for s in range(n_stars)])
    kind = np.where(row == 0, "combined", np.where(row == 1, "combined-alt", "visit"))
    snr = rng.lognormal(np.log(80), 0.7, n_spectra)
    frame = pd.DataFrame({
        "spectrum_id": [f"apogee-{sha[s][:16]}-{r}" for s, r in zip(star, row)],
        "source_id": ids[star], "survey": "apogee", "kind": kind,
        "file_path": [f"/data/apogee/apStar-{ids[s]}.fits" for s in star], "file_sha256": sha[star],
        "reader_version": "1", "ingest_time": "2026-12-01T00:00:00+00:00", "row": row,
        "visit": np.maximum(row - 1, 0), "ra": star_ra[star], "dec": star_dec[star], "snr": snr,
        "mjd": np.where(row >= 2, rng.uniform(56000, 59000, n_spectra), np.nan),
        "tmass_j": header["J"] + rng.normal(0, 1, n_spectra), "tmass_h": header["H"] + rng.normal(0, 1, n_spectra),
        "tmass_k": header["K"] + rng.normal(0, 1, n_spectra), "e_tmass_j": header["J_ERR"],
        "e_tmass_h": header["H_ERR"], "e_tmass_k": header["K_ERR"],
        "star_key": [star_key("apogee", i) for i in ids[star]],
        "good_pixel_fraction": np.where(kind == "combined-alt", 0.0, rng.uniform(0.85, 0.99, n_spectra)).astype(np.float32),
        "flux_constant": kind == "combined-alt", "active": True,
    })
    files = pd.DataFrame({"file_path": [f"/data/apogee/apStar-{i}.fits" for i in ids], "file_sha256": sha,
                          "n_spectra": np.bincount(star, minlength=n_stars)})
    files["first_position"] = np.concatenate([[0], np.cumsum(files["n_spectra"])[:-1]])
    files["product_key"] = [f"apStar|{i}|bench" for i in ids]
    files["sha_key"] = [sha_key(s) for s in sha]
    files["path_key"] = [stable_key(p) for p in files["file_path"]]
    files["product_hash"] = [stable_key(p) for p in files["product_key"]]
    return frame, files


def build_store(path: Path, n_spectra: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A store of ``n_spectra`` spectra's metadata (flux chunks unwritten) in one commit; returns (ra, dec) of the
    combined spectra."""
    from catalogbuilder.constants import GRID_SPECS
    from catalogbuilder.store import SpectrumStore
    from catalogbuilder.store.layout import (FILE_COLUMNS, FILE_DIM, FILES_GROUP, PIXEL_DIM, SPECTRUM_CHUNK,
                                             SPECTRUM_COLUMNS, SPECTRUM_DIM, chunk_encoding, column_array)

    spectra, files = population(n_spectra, rng)
    store = SpectrumStore.open(path, create=True)
    writer = store.writer()
    grid = GRID_SPECS["apogee"]
    for start in range(0, n_spectra, BATCH):
        block = spectra.iloc[start:start + BATCH]
        n = len(block)
        shape, chunks = (n, grid.pixels), (SPECTRUM_CHUNK, grid.pixels)
        data = {name: ((SPECTRUM_DIM, PIXEL_DIM), da.zeros(shape, chunks=chunks, dtype=dtype))
                for name, dtype in (("flux", np.float32), ("error", np.float32), ("mask", grid.mask_dtype))}
        coords = {name: (SPECTRUM_DIM, column_array(block[name].to_numpy(), kind)) for name, kind in SPECTRUM_COLUMNS.items()}
        dataset = xr.Dataset(data, coords=coords)
        if start == 0:
            dataset = dataset.assign_coords(wavelength=(PIXEL_DIM, grid.wavelength().astype(np.float64)))
            dataset.to_zarr(writer.session_store, group="apogee", mode="w-", encoding=chunk_encoding(dataset),
                            consolidated=False, compute=False)
        else:
            dataset.to_zarr(writer.session_store, group="apogee", append_dim=SPECTRUM_DIM, consolidated=False,
                            compute=False)
    ledger = [{**row, "grid": "apogee", "survey": "apogee", "reader_version": "1", "ingest_time": "2026-12-01",
               "reduction": "", "reduction_date": "", "status": 0, "status_time": "", "status_reason": ""}
              for row in files.to_dict("records")]
    for start in range(0, len(ledger), BATCH):
        writer.append_rows(FILES_GROUP, ledger[start:start + BATCH], FILE_COLUMNS, FILE_DIM)
    writer.commit(f"bench store of {n_spectra} spectra (metadata only)", {})
    combined = spectra["kind"].to_numpy() == "combined"
    return spectra.loc[combined, "ra"].to_numpy(), spectra.loc[combined, "dec"].to_numpy()


def write_results(store_path: Path, rng: np.random.Generator) -> None:
    """Results of the ``apogee_small`` model for every predicted spectrum, range by range (as inference writes
    them): Teff, log g, [Fe/H] drawn around a giant/dwarf population, raw errors of a 20-draw Monte-Carlo."""
    from catalogbuilder.models.registry import load_model
    from catalogbuilder.store import SpectrumStore
    from catalogbuilder.store.ranged import RANGE_SPECTRA

    store = SpectrumStore.open(store_path)
    model = load_model(MODEL)
    n = store.length("apogee")
    for start in range(0, n, RANGE_SPECTRA):
        columns = store.columns("apogee", ("spectrum_id", "kind"), start, min(n, start + RANGE_SPECTRA))
        columns = columns.loc[columns["kind"] != "combined-alt"]
        m = len(columns)
        giant = rng.random(m) < 0.7
        teff = np.where(giant, rng.normal(4700, 350, m), rng.normal(5600, 600, m))
        frame = pd.DataFrame({
            "spectrum_id": columns["spectrum_id"].to_numpy(), "grid": "apogee", "position": columns.index.to_numpy(),
            "model_name": model.name, "weights_sha256": model.weights_sha256, "software_version": "bench",
            "created": "2026-12-01T00:00:00.000000+00:00", "n_draws": 20, "seed": 0, "precision": "float32", "status": "ok",
            "reason": "",
            "logg": np.where(giant, rng.normal(2.4, 0.6, m), rng.normal(4.4, 0.2, m)), "raw_e_logg": rng.gamma(2, 0.02, m),
            "teff": teff, "raw_e_teff": rng.gamma(2, 15, m), "fe_h": rng.normal(-0.2, 0.3, m),
            "raw_e_fe_h": rng.gamma(2, 0.015, m),
        })
        frame["logteff"] = np.log10(frame["teff"])
        frame["raw_e_logteff"] = frame["raw_e_teff"] / (frame["teff"] * np.log(10))
        store.results.write_part(frame)
        store.results.compact(model.name, model.weights_sha256)


def write_catalog(path: Path, ra: np.ndarray, dec: np.ndarray, rng: np.random.Generator, hats: bool) -> Path:
    """A Gaia-like catalog: a counterpart 0.05″ from 90 % of the stars, with G, BP, RP and parallax; as a HATS
    catalog with a 5″ margin (lsdb: how Gaia-scale catalogs are matched) or, without ``hats``, one Parquet file."""
    keep = rng.random(len(ra)) < 0.9
    n = int(keep.sum())
    offset = 0.05 / 3600
    frame = pd.DataFrame({
        "source_id": np.arange(n, dtype=np.int64) + 4_000_000_000_000_000_000 // 4,
        "ra": ra[keep] + offset / np.maximum(np.cos(np.radians(dec[keep])), 1e-3), "dec": dec[keep],
        "phot_g_mean_mag": rng.uniform(9, 16, n), "phot_bp_mean_mag": rng.uniform(9.5, 17, n),
        "phot_rp_mean_mag": rng.uniform(8.5, 15, n), "parallax": rng.lognormal(-0.5, 0.8, n),
        "parallax_error": rng.uniform(0.01, 0.1, n),
    })
    if not hats:
        frame.to_parquet(path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    import lsdb

    lsdb.from_dataframe(frame, ra_column="ra", dec_column="dec", partition_rows=100_000,
                        margin_threshold=5.0).write_catalog(path)
    return path


def new_apstar_files(folder: Path, n_spectra: int) -> list[Path]:
    """Real apStar files for ``n_spectra`` new spectra: copies of the 3-visit giant, each a new star (its own
    OBJID), so the increment adds stars and visits as a night of new data does."""
    folder.mkdir(parents=True, exist_ok=True)
    with fits.open(GIANT) as hdul:
        rows = hdul[1].data.shape[0]
        paths = []
        for index in range(-(-n_spectra // rows)):
            hdul[0].header["OBJID"] = f"2M9{index:07d}+0000000"
            path = folder / f"apStar-bench-{index:06d}.fits"
            hdul.writeto(path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spectra", type=int, default=100_000, help="spectra in the store before the increment")
    parser.add_argument("--increment", type=float, default=0.01, help="new spectra, as a fraction of --spectra")
    parser.add_argument("--draws", type=int, default=2, help="Monte-Carlo draws of the increment's inference")
    parser.add_argument("--workers", type=int, default=2, help="local Dask workers of ingest and inference")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the store and release (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--catalog-format", choices=("hats", "parquet"), default="hats",
                        help="the Gaia-like catalog as HATS (lsdb, partitioned: the Gaia-scale path) or one Parquet "
                        "file (read and indexed whole by astropy: memory grows with the catalog)")
    args = parser.parse_args(argv)
    if not GIANT.is_file() or not MODEL.is_dir():
        raise SystemExit("needs ../shared (a real apStar file and the conformance apogee_small model)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="release-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    store, out = work / "store", work / "release"
    began = time.perf_counter()
    ra, dec = build_store(store, args.spectra, rng)
    write_results(store, rng)
    catalog = write_catalog(work / "gaia", ra, dec, rng, hats=args.catalog_format == "hats")
    print(f"built a store of {args.spectra} spectra in {time.perf_counter() - began:.0f} s", flush=True)

    cluster = ["--workers", str(args.workers)]
    full = run_step("full release", ["release", "--store", str(store), "--out", str(out), "--catalog", str(catalog),
                                     "--no-progress"], work)
    new_spectra = max(1, round(args.increment * args.spectra))
    files = new_apstar_files(work / "new", new_spectra)
    steps = {
        "ingest": run_step("ingest", ["ingest", "--store", str(store), "--no-progress", *cluster, str(work / "new")], work),
        "infer": run_step("infer", ["infer", "--store", str(store), "--model", str(MODEL), "--draws", str(args.draws),
                                    "--no-progress", *cluster], work),
        "release": run_step("increment release", ["release", "--store", str(store), "--out", str(out), "--catalog",
                                                 str(catalog), "--no-fits", "--no-progress"], work),
    }
    added = len(files) * fits.getdata(GIANT, 1).shape[0]
    increment = sum(step["seconds"] for step in steps.values())
    per_spectrum = (steps["ingest"]["seconds"] + steps["infer"]["seconds"]) / added
    full_run = full["seconds"] + per_spectrum * args.spectra
    state = json.loads((out / "release_state.json").read_text())
    rows = sum(table["counts"]["rows"] for table in state["tables"].values())
    print(f"{'step':22s} {'seconds':>9s} {'peak MB':>9s}")
    print(f"{'full release':22s} {full['seconds']:9.1f} {full['peak_mb']:9.0f}   ({rows} rows released)")
    for name, step in steps.items():
        print(f"{'increment ' + name:22s} {step['seconds']:9.1f} {step['peak_mb']:9.0f}")
    print(f"increment of {added} spectra: {increment:.1f} s; ingest + infer {per_spectrum * 1000:.1f} ms/spectrum; "
          f"increment release / full release = {steps['release']['seconds'] / full['seconds']:.3f}")
    print(f"full run (full release + ingest and inference of {args.spectra} spectra at those rates): {full_run:.0f} s")
    print(f"release_scale N={args.spectra} full_s={full['seconds']:.1f} full_peak_mb={full['peak_mb']:.0f} "
          f"increment_s={increment:.1f} ratio={increment / full_run:.4f}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
