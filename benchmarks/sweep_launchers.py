"""Wall time of one sweep through Hydra's basic launcher versus the joblib launcher.

Runs ``python -m clbench -m strategy=finetune,joint,independent seed=0,1,2 stream=split_digits`` twice
(basic, then joblib with 2 workers), each into a fresh results folder, then prints the report's markdown
table for the joblib sweep. Writes everything to ``benchmarks/results/sweep_launchers.md``.

    python benchmarks/sweep_launchers.py
"""

from __future__ import annotations

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
    root = Path(tempfile.mkdtemp(prefix="clbench-sweep-"))
    load_before = os.getloadavg()[0]
    basic = sweep([], root / "basic")
    joblib = sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], root / "joblib")
    load_after = os.getloadavg()[0]
    table = subprocess.run(
        [sys.executable, "-m", "clbench.report", str(root / "joblib"), "--no-plots"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [
        "# Sweep wall time: basic vs joblib launcher",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}. Command: `python benchmarks/sweep_launchers.py`.",
        "Sweep: 3 strategies x 3 seeds on split_digits (9 jobs), OMP_NUM_THREADS=1 per job.",
        f"1-minute load average before / after: {load_before:.1f} / {load_after:.1f} (other work on the same cores"
        " shrinks what a second worker can gain).",
        "",
        "| launcher | wall time (s) |",
        "|---|---|",
        f"| basic (sequential) | {basic:.1f} |",
        f"| joblib, n_jobs=2 | {joblib:.1f} |",
        f"| speed-up | {basic / joblib:.2f}x |",
        "",
        "Report of the joblib sweep (`python -m clbench.report <dir>`):",
        "",
        table.strip(),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
