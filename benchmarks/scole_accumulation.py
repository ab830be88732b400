"""SCoLe knowledge accumulation: a 200-task run of fine-tuning on MNIST-5k with group masking.

Lesort et al. (2023) report that with re-occurring classes plain fine-tuning accumulates knowledge: the
full-test-set accuracy rises over a long stream. Writes ``benchmarks/results/scole_mnist5k.md`` and the
curve ``benchmarks/results/scole_mnist5k_finetune.png``.

    python benchmarks/scole_accumulation.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
BASE = [
    "experiment=scole_mnist5k",
    "strategy=finetune",
    "logger=none",
    "trainer.progress=false",
    "verbose=false",
    "device=cpu",
]


def run(extra: list[str], results: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "clbench", *BASE, *extra, f"results_dir={results}"],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    path = next(results.glob("scole_mnist5k/finetune/*/result.json"))
    return json.loads(path.read_text()), time.perf_counter() - start


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="clbench-scole-"))
    masked, masked_s = run([], root / "run")
    shutil.copy(masked["paths"]["curve"], OUT / "scole_mnist5k_finetune.png")
    curve = masked["acc_over_time"]
    marks = [1, 10, 25, 50, 100, 150, 200]
    lines = [
        "# SCoLe on MNIST-5k: knowledge accumulation with fine-tuning",
        "",
        "Command: `python benchmarks/scole_accumulation.py` (`experiment=scole_mnist5k strategy=finetune`: 200 tasks",
        "of 2 classes drawn uniformly from 10, all training images of a drawn class, 1 epoch per task, SGD lr 0.01,",
        "batch 64, group masking, evaluation on the whole 1,000-image test set after every task).",
        "",
        "| after task | " + " | ".join(str(m) for m in marks) + " |",
        "|---|" + "---|" * len(marks),
        "| full-test accuracy (%) | " + " | ".join(f"{curve[m - 1]:.1f}" for m in marks) + " |",
        "",
        f"Summary: {json.dumps({k: round(v, 2) for k, v in masked['metrics'].items()})}; wall time {masked_s:.0f} s.",
        "",
        "Curve: `benchmarks/results/scole_mnist5k_finetune.png`.",
        "",
    ]
    (OUT / "scole_mnist5k.md").write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
