"""Task-order robustness: ACC and BWT of two strategies over 5 task orders of one stream.

Runs ``python -m clbench -m strategy=<a>,<b> stream.order_seed=0,1,2,3,4`` and prints the report grouped by
strategy (mean ± sd and the min-max range over orders). Writes ``benchmarks/results/task_order.md``.

    python benchmarks/task_order_robustness.py [strategy_a strategy_b] [extra overrides...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clbench.report import collect, runs_frame

OUT = Path(__file__).resolve().parent / "results" / "task_order.md"


def main() -> None:
    strategies = sys.argv[1:3] if len(sys.argv) >= 3 else ["finetune", "ewc"]
    extra = sys.argv[3:] or ["stream=split_mnist5k", "trainer.epochs=2"]
    root = Path(tempfile.mkdtemp(prefix="clbench-orders-"))
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clbench",
            "-m",
            f"strategy={','.join(strategies)}",
            "stream.order_seed=0,1,2,3,4",
            "logger=none",
            "trainer.progress=false",
            "verbose=false",
            "device=cpu",
            *extra,
            f"results_dir={root}",
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    wall = time.perf_counter() - start
    frame = runs_frame(collect([root]).completed)
    lines = [
        "# Task-order robustness",
        "",
        f"Command: `python benchmarks/task_order_robustness.py {' '.join(strategies)} {' '.join(extra)}`",
        f"(5 task orders, `stream.order_seed=0..4`, seed 0; {wall:.0f} s in all).",
        "",
        "| strategy | n orders | ACC mean ± sd | ACC range | BWT mean ± sd | BWT range |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, group in frame.groupby("strategy"):
        acc, bwt = group["acc"], group["bwt"]
        lines.append(
            f"| {strategy} | {len(group)} | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} "
            f"| {acc.min():.2f} to {acc.max():.2f} "
            f"| {bwt.mean():.2f} ± {bwt.std(ddof=1):.2f} | {bwt.min():.2f} to {bwt.max():.2f} |"
        )
    lines.append("")
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
