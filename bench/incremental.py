"""Cost of an incremental run (1 % new spectra) against a full run of the dr19 workflow.

    python bench/incremental.py [--replicas 10] [--new-fraction 0.01] [--draws 20] [--workers 2] [--keep DIR]

The real spectra of ../shared/data (136 LAMOST DR1, 2 BOSS and 2 apStar files) are replicated into many distinct
files (each copy gets one extra primary-header card, so its checksum and spectrum ids differ while the data are the
same). On one warm local cluster it times (1) a full run over all but ``new-fraction`` of the files into a fresh
store and (2) the incremental run that adds the remaining files, and prints both times and their ratio (goal: the
incremental run costs at most 3 % of the full one). Models and catalogs are those of workflows/dr19.yaml (or --config).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from astropy.io import fits
from distributed import Client, LocalCluster

from catalogbuilder.submit import import_workflow

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SOURCE_GLOBS = ("lamost/dr1_learninglamost/spec-*.fits", "boss/spec-*.fits", "apogee/apStar-*.fits")
GOAL_RATIO = 0.03


def source_files(data_dir: Path) -> list[Path]:
    """The real spectra that are replicated."""
    files = sorted(path for pattern in SOURCE_GLOBS for path in data_dir.glob(pattern))
    if not files:
        raise SystemExit(f"no spectra found under {data_dir} (needs ../shared/data)")
    return files


def replicate(sources: list[Path], replicas: int, folder: Path) -> list[str]:
    """``replicas`` distinct copies of every source file (header card CBREPLIC = copy number), interleaved so that
    any slice of the list mixes surveys."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for copy in range(replicas):
        for source in sources:
            target = folder / f"r{copy:04d}-{source.name}"
            with fits.open(source) as hdus:
                hdus[0].header["CBREPLIC"] = (copy, "catalogbuilder benchmark replica number")
                hdus.writeto(target, output_verify="silentfix")
            written.append(str(target))
    return written


def timed_run(dr19, client: Client, config, inputs: list[str]) -> tuple[float, object]:
    """Wall time (s) and result of one dr19 run over ``inputs``."""
    began = time.perf_counter()
    result = dr19.run_workflow(client, dataclasses.replace(config, inputs=tuple(inputs)))
    return time.perf_counter() - began, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=10, help="copies of each real file (default: %(default)s)")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="fraction of files added incrementally")
    parser.add_argument("--draws", type=int, default=20, help="Monte-Carlo draws per spectrum")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--config", type=Path, help="workflow YAML giving models and catalogs (default: workflows/dr19.yaml)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dr19 = import_workflow(REPO_ROOT / "workflows" / "dr19.py")
    work = args.keep or Path(tempfile.mkdtemp(prefix="catalogbuilder-bench-"))
    try:
        files = replicate(source_files(args.data), args.replicas, work / "files")
        n_new = max(1, round(len(files) * args.new_fraction))
        old, new = files[:-n_new], files[-n_new:]
        base = dr19.load_config(args.config or dr19.DEFAULT_CONFIG)
        config = dataclasses.replace(base, draws=args.draws, progress=False)
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            warm = dataclasses.replace(config, store=work / "warm" / "store", output=work / "warm" / "out")
            timed_run(dr19, client, warm, files[:4])  # start workers, import torch, load the models
            config = dataclasses.replace(config, store=work / "store", output=work / "out")
            full_seconds, full = timed_run(dr19, client, config, old)
            incremental_seconds, incremental = timed_run(dr19, client, config, new)
        full_spectra = full.ingest.spectra_added
        new_spectra = incremental.ingest.spectra_added
        print(f"full run:        {len(old):6d} files, {full_spectra:6d} spectra, {full_seconds:8.1f} s "
              f"({full_spectra / full_seconds:.1f} spectra/s; draws={args.draws}, workers={args.workers})")
        print(f"incremental run: {len(new):6d} files, {new_spectra:6d} spectra "
              f"({new_spectra / max(1, full_spectra):.2%} new), {incremental_seconds:8.1f} s, "
              f"{sum(r.n_computed for r in incremental.inference)} predictions")
        for name, result in (("full", full), ("incremental", incremental)):
            print(f"  {name} run steps: " + ", ".join(f"{step} {sec:.1f} s" for step, sec in result.seconds.items()))
        ratio = incremental_seconds / full_seconds
        print(f"incremental / full wall time: {ratio:.2%} (goal <= {GOAL_RATIO:.0%}: {'met' if ratio <= GOAL_RATIO else 'NOT met'})")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
