"""Wall time of one sweep through Hydra's basic launcher versus the joblib launcher.

Runs ``python -m clbench -m strategy=finetune,joint,independent seed=0,1,2 stream=split_digits`` twice
(basic, then joblib with 2 workers), each into a fresh results folder, then prints the report's markdown
table for the joblib sweep. Writes everything to ``benchmarks/results/sweep_launchers.md``.

    python benchmarks/sweep_launchers.py [--epochs N ...]

Each ``--epochs`` value is measured separately: with tiny jobs the basic launcher, which runs every job in
one process, wins (a joblib worker pays the imports again); with jobs of several seconds, two workers win.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = [
    "strategy=finetune,joint,independent",
    "seed=0,1,2",
    "stream=split_digits",
    "logger=none",
    "trainer.progress=false",
    "verbose=false",
    "device=cpu",
]
OUT = Path(__file__).resolve().parent / "results" / "sweep_launchers.md"


def sweep(extra: list[str], results: Path) -> float:
    """Wall time of one multirun of SWEEP plus ``extra`` into ``results``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "clbench", "-m", *extra, *SWEEP, f"results_dir={results}"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 30])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clbench-sweep-"))
    rows, table = [], ""
    for epochs in args.epochs:
        load = os.getloadavg()[0]
        basic = sweep([f"trainer.epochs={epochs}"], root / f"basic{epochs}")
        joblib = sweep(
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"trainer.epochs={epochs}"], root / f"joblib{epochs}"
        )
        rows.append(f"| {epochs} | {basic:.1f} | {joblib:.1f} | {basic / joblib:.2f}x | {load:.1f} |")
        table = subprocess.run(
            [sys.executable, "-m", "clbench.report", str(root / f"joblib{epochs}"), "--no-plots"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    lines = [
        "# Sweep wall time: basic vs joblib launcher",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}. Command: `python benchmarks/sweep_launchers.py --epochs "
        f"{' '.join(map(str, args.epochs))}`.",
        "Sweep: 3 strategies (finetune, joint, independent) x 3 seeds on split_digits (9 jobs), OMP_NUM_THREADS=1.",
        "The basic launcher runs every job in one process; joblib's two workers each import torch and clbench",
        "again, which only pays off once jobs last several seconds. Load: 1-minute load average at the start.",
        "",
        "| epochs per task | basic (s) | joblib, n_jobs=2 (s) | speed-up | load |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Report of the last joblib sweep (`python -m clbench.report <dir>`, epochs {args.epochs[-1]}):",
        "",
        table.strip(),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
