"""Reproduce GPM's PMNIST protocol on permuted Fashion-MNIST for gpm, trgp, cuber and finetune.

Each run is a subprocess of the real CLI (``python -m clbench experiment=<strategy>_pfmnist seed=<s>``;
finetune gets the same protocol through explicit overrides). Runs that already completed under
``--results-dir`` are skipped by the runner, so the script can be started again to fill in what is
missing. It writes a markdown table of ACC and BWT (mean +- sd over the seeds that completed) and the
wall time of each run to ``--table``; a strategy with fewer completed seeds than asked is marked so.

    OMP_NUM_THREADS=1 nohup python benchmarks/reproduce_gpm_family.py --jobs 2 &
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cuber_backward_transfer import regime_summary

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("finetune", "gpm", "trgp", "cuber")
# The protocol of conf/experiment/gpm_pfmnist.yaml, spelled out for the strategy that has no preset.
FINETUNE_PROTOCOL = [
    "stream=permuted_fashion_mnist",
    "stream.num_tasks=10",
    "stream.scenario=domain",
    "stream.permute_first=true",
    "stream.val_fraction=0.1",
    "model=mlp",
    "model.hidden=[100,100]",
    "model.bias=false",
    "trainer.epochs=5",
    "trainer.batch_size=10",
    "trainer.lr=0.01",
    "trainer.optimizer=sgd",
    "trainer.momentum=0.0",
    "strategy=finetune",
]
PUBLISHED_PMNIST = {"gpm": "93.91 / -3", "trgp": "96.34 / -0.8", "cuber": "97.25 / -0.02", "finetune": "-"}


def overrides(strategy: str, seed: int, results_dir: Path) -> list[str]:
    protocol = FINETUNE_PROTOCOL if strategy == "finetune" else [f"experiment={strategy}_pfmnist"]
    common = [f"seed={seed}", "logger=none", "trainer.progress=false", "device=cpu", f"results_dir={results_dir}"]
    return [*protocol, *common]


def run_one(strategy: str, seed: int, results_dir: Path, log_dir: Path) -> tuple[str, int, int, float]:
    command = [sys.executable, "-m", "clbench", *overrides(strategy, seed, results_dir)]
    log = log_dir / f"{strategy}_seed{seed}.log"
    tick = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ))
    return strategy, seed, code, time.perf_counter() - tick


def collect(results_dir: Path) -> dict[str, list[dict]]:
    """Completed result files per strategy (the runner writes ``<stream>/<strategy>/<run>/result.json``)."""
    found: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for path in sorted(results_dir.glob("permuted_fashion_mnist/*/*/result.json")):
        result = json.loads(path.read_text())
        if result.get("status") == "completed" and result["strategy"] in found:
            found[result["strategy"]].append(result)
    return found


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (one seed, no sd)"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def write_table(results_dir: Path, table: Path, seeds: list[int], commands: list[str]) -> str:
    found = collect(results_dir)
    lines = [
        "# GPM family on permuted Fashion-MNIST (GPM's PMNIST protocol)",
        "",
        "10 tasks, full Fashion-MNIST (54k train / 6k val / 10k test per task), MLP 784-100-100-10 without biases,",
        "single head, SGD lr 0.01, batch 10, 5 epochs; thresholds [0.95, 0.99, 0.99], 300 samples per matrix.",
        "Accuracies in percent; ACC = mean final accuracy, BWT = mean(R[T-1][j] - R[j][j]) (clbench/metrics.py).",
        "trgp and cuber read the task id at test time to pick each task's scaling matrices, as TRGP's official",
        "PMNIST code does (result files record `uses_task_oracle`). CPU runs, OMP_NUM_THREADS=1, on a shared",
        "2-core machine: wall times include contention with other jobs.",
        "",
        "| strategy | seeds done | ACC (%) | BWT (%) | wall time per run (s) | published PMNIST ACC / BWT |",
        "|---|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        runs = [r for r in found[strategy] if r["seed"] in seeds]
        acc = [r["metrics"]["acc"] for r in runs]
        bwt = [r["metrics"]["bwt"] for r in runs]
        wall = [r["timings"]["total_s"] for r in runs]
        done = f"{len(runs)}/{len(seeds)}" + ("" if len(runs) == len(seeds) else " (incomplete)")
        walls = ", ".join(f"{w:.0f}" for w in wall) or "-"
        lines.append(
            f"| {strategy} | {done} | {mean_sd(acc)} | {mean_sd(bwt)} | {walls} | {PUBLISHED_PMNIST[strategy]} |"
        )
    lines += ["", "Per seed (ACC / BWT):", ""]
    for strategy in STRATEGIES:
        for r in sorted(found[strategy], key=lambda r: r["seed"]):
            if r["seed"] in seeds:
                m = r["metrics"]
                lines.append(
                    f"- {strategy} seed {r['seed']}: {m['acc']:.2f} / {m['bwt']:.2f}  ({r['paths']['result']})"
                )
    cuber = [r for r in found["cuber"] if r["seed"] in seeds]
    if cuber:
        trgp = [r for r in found["trgp"] if r["seed"] in seeds]
        lines += ["", "CUBER regime diagnostics (result.json `cuber_regimes`):", "", *regime_summary(cuber, trgp)]
    lines += ["", "Commands:", "", "```", *commands, "```", ""]
    text = "\n".join(lines)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one CPU thread each)")
    parser.add_argument("--results-dir", type=Path, default=Path("/tmp/clbench_gpm_family"))
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks/results/gpm_family_pfmnist.md")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.results_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    all_commands = [
        "python -m clbench " + " ".join(overrides(s, seed, args.results_dir)) for s in STRATEGIES for seed in args.seeds
    ]
    if not args.table_only:
        jobs = [(s, seed) for seed in args.seeds for s in args.strategies]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, s, seed, args.results_dir, log_dir) for s, seed in jobs]
            for future in futures:
                strategy, seed, code, seconds = future.result()
                print(f"{strategy} seed {seed}: exit {code} after {seconds:.0f} s", flush=True)
                write_table(args.results_dir, args.table, args.seeds, all_commands)
    print(write_table(args.results_dir, args.table, args.seeds, all_commands))


if __name__ == "__main__":
    main()
