"""Does a population member give its solo run's R? For every population-safe strategy, one table.

For each strategy (and scenario) it runs one sweep of 4 seeds twice, into two fresh results folders: under
Hydra's basic launcher (every job a solo run) and under ``hydra/launcher=population`` (the 4 seeds one
population). It then compares each seed's accuracy matrix R, the task-aware R where there is one, and the
training-loss curves, and reports whether they are bit-identical and, if not, the largest difference. It also
reads, from the population's results, how the fits were trained (batched closed-form steps, batched autograd
steps, or each member alone).

    python benchmarks/population_correctness.py [--threads 1 2] [--workers 1 auto] [--strategies finetune ewc ...]

``--threads 1`` (``cpu_threads=1 deterministic=true``) is the case the population promises bit-identical;
with 2 threads a batched product may sum in another order than the single one. ``--workers``: the launcher's
``hydra.launcher.workers`` for the population sweeps: 1 keeps the 4 seeds one population in one process, ``auto``
deals them out to one worker process per core (2 here: two populations of 2). Writes
``benchmarks/results/population_correctness.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (strategy, scenario): every population-safe strategy in the default protocol's domain scenario, and those that
# support it in the task and class scenarios too (the class scenario runs on split MNIST-5k)
CASES = [
    ("finetune", "domain"),
    ("joint", "domain"),
    ("ewc", "domain"),
    ("ewc_online", "domain"),
    ("si", "domain"),
    ("mas", "domain"),
    ("lwf", "domain"),
    ("gpm", "domain"),
    ("trgp", "domain"),
    ("supsup", "domain"),
    ("finetune", "task"),
    ("ewc", "task"),
    ("lwf", "task"),
    ("gpm", "task"),
    ("supsup", "task"),
    ("finetune", "class"),
    ("si", "class"),
    ("lwf", "class"),
]
# with two threads (where rounding may differ) one case per kind of step is enough to show how far apart they land
TWO_THREAD_CASES = [("finetune", "domain"), ("gpm", "domain"), ("ewc", "domain"), ("lwf", "domain")]
SEEDS = "0,1,2,3"
OUT = Path(__file__).resolve().parent / "results" / "population_correctness.md"


def scenario_overrides(scenario: str) -> list[str]:
    if scenario == "class":
        return ["stream=split_mnist5k", "stream.scenario=class"]
    return [f"stream.scenario={scenario}"]


def sweep(strategy: str, scenario: str, threads: int, launcher: str, results: Path, workers: str = "1") -> float:
    settings = ["cpu_threads=1", "deterministic=true"] if threads == 1 else []
    if launcher == "population":
        settings.append(f"hydra.launcher.workers={workers}")
    command = [
        sys.executable, "-m", "clbench", "-m", f"hydra/launcher={launcher}", f"strategy={strategy}",
        f"seed={SEEDS}", *scenario_overrides(scenario), *settings, "logger=none", "plots=false",
        "trainer.progress=false", "verbose=false", f"results_dir={results}",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def results_by_seed(folder: Path) -> dict[int, dict]:
    found = {}
    for path in folder.rglob("result.json"):
        result = json.loads(path.read_text())
        found[int(result["seed"])] = result
    return found


def largest_difference(a: list | None, b: list | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float("inf") if x.shape != y.shape else float(np.abs(x - y).max(initial=0.0))


def compare(solo: dict[int, dict], population: dict[int, dict]) -> dict:
    same = True
    worst = {"R": 0.0, "R_TAw": 0.0, "loss curves": 0.0}
    for seed, mine in solo.items():
        theirs = population.get(seed)
        if theirs is None or theirs.get("status") != "completed" or mine.get("status") != "completed":
            return {"same": False, "worst": {"R": float("inf")}, "note": f"seed {seed} did not complete"}
        pairs = {
            "R": (mine["acc_matrix"], theirs["acc_matrix"]),
            "R_TAw": (mine.get("acc_matrix_taw"), theirs.get("acc_matrix_taw")),
            "loss curves": (mine["learning_curves"], theirs["learning_curves"]),
        }
        for name, (a, b) in pairs.items():
            same &= a == b
            worst[name] = max(worst[name], largest_difference(a, b))
    return {"same": same, "worst": worst, "note": ""}


def step_kinds(population: dict[int, dict]) -> str:
    """How the population trained, read from the closed-form step counts (autograd batched or alone: 0)."""
    closed = [sum(r["timings"]["closed_form_steps"]) for r in population.values()]
    return "closed-form" if all(closed) else "autograd" if not any(closed) else "mixed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", nargs="+", default=["1"], help="hydra.launcher.workers values (1, auto, N)")
    parser.add_argument("--strategies", nargs="*", default=None, help="only these strategies (default: all)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clbench-population-"))
    lines = [
        "# Population members against their solo runs",
        "",
        f"`python benchmarks/population_correctness.py --threads {' '.join(map(str, args.threads))} --workers "
        f"{' '.join(args.workers)}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs), torch threads as stated; seeds {SEEDS} of the default "
        "protocol (5-task Permuted MNIST-5k, MLP 784-100-100, 3 epochs, SGD lr 0.1; the class scenario on split "
        "MNIST-5k). Each row: the same 4-seed sweep under the basic launcher (4 solo runs) and under "
        "`hydra/launcher=population`, compared seed by seed: with `workers` 1 one population of 4 in one process, "
        "with `auto` one worker process per core, each a population of its share (here two of 2), each worker on "
        "one thread unless `threads` says otherwise. `steps`: how the solo runs "
        "train on this CPU (closed-form gradients, or autograd), which is the kind of batched step the "
        "population takes where the strategy keeps the model's own forward pass; SupSup and TRGP have their own "
        "forward pass, so their members train alone, one after another, inside the population.",
        "",
        "| threads | workers | strategy | scenario | steps | bit-identical | max abs diff R | R (TAw) | loss curves "
        "| solo sweep s | population s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failures = 0
    for threads in args.threads:
        for strategy, scenario in CASES if threads == 1 else TWO_THREAD_CASES:
            if args.strategies and strategy not in args.strategies:
                continue
            folder = root / f"{strategy}-{scenario}-{threads}"
            solo_s = sweep(strategy, scenario, threads, "basic", folder / "solo")
            solo = results_by_seed(folder / "solo")
            for workers in args.workers:
                population_s = sweep(strategy, scenario, threads, "population", folder / workers, workers)
                population = results_by_seed(folder / workers)
                outcome = compare(solo, population)
                failures += threads == 1 and not outcome["same"]
                worst = outcome["worst"]
                row = (
                    f"| {threads} | {workers} | {strategy} | {scenario} | {step_kinds(solo)} "
                    f"| {'yes' if outcome['same'] else 'no'} | {worst['R']:.3g} | {worst.get('R_TAw', 0.0):.3g} "
                    f"| {worst.get('loss curves', 0.0):.3g} | {solo_s:.1f} | {population_s:.1f} |"
                )
                print(row, outcome["note"], flush=True)
                lines.append(row)
    lines += [
        "",
        "R in percent; `max abs diff` over every seed and entry (0: equal). Timing columns are whole sweeps of 4 "
        "seeds with plots off and no W&B (see `population_speed.md` for the speed benchmark).",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {OUT}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
