"""Wall time of a 10-seed sweep of one job: 10 solo processes, the basic, joblib and population launchers.

    python benchmarks/population_speed.py cpu [--seeds 10] [--repeats 1] [--extra KEY=VALUE ...]
    python benchmarks/population_speed.py gpu [--seeds 10] [--extra ...]

``cpu``: the default job (``python -m clbench``, 5-task Permuted MNIST-5k, W&B offline, plots, as a user runs
it) for seeds 0..N-1, four ways, each into a fresh results folder: N solo processes one after another, then one
sweep each under Hydra's basic launcher, the joblib launcher (one worker per core) and
``hydra/launcher=population``. It checks that every way completed every seed and that the population's
accuracy matrices equal the basic launcher's (see ``population_correctness.md`` for bit-identity). Writes
``benchmarks/results/population_speed.md``.

``gpu`` (where a GPU is lent): the GPM PFMNIST protocol (``protocol=gpm_pfmnist strategy=gpm``), one seed as a
solo process against N seeds as one population (on a GPU the launcher keeps them in one process); the issue's
target is N seeds in at most 1.5x the time of one. Writes ``benchmarks/results/population_speed_gpu.md``. A lent
machine has no Debian Fashion-MNIST package: copy the files into the (git-ignored) data folder first, where
``data_root`` finds them, and carry that folder along (30 MB)::

    mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/
    # device tool: run(command="python benchmarks/population_speed.py gpu --seeds 10", carry=["data"])
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

RESULTS = Path(__file__).resolve().parent / "results"


LAYOUT_NOTE = " jobs in "  # the population launcher's line saying how it spread the jobs ("10 jobs in 2 worker ...")
last_layout: list[str] = []


def clbench(args: list[str], results: Path) -> float:
    """Wall time of one ``python -m clbench`` process (it must succeed); the population launcher's line on how it
    spread the jobs over worker processes is kept in ``last_layout``."""
    command = [sys.executable, "-m", "clbench", *args, f"results_dir={results}", "trainer.progress=false"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    last_layout[:] = [line for line in done.stdout.splitlines() if LAYOUT_NOTE in line][:1]
    return elapsed


def matrices(results: Path) -> dict[int, list]:
    found = {}
    for path in results.rglob("result.json"):
        result = json.loads(path.read_text())
        if result.get("status") == "completed":
            found[int(result["seed"])] = result["acc_matrix"]
    return found


def cpu(args: argparse.Namespace) -> None:
    seeds = list(range(args.seeds))
    sweep = [f"seed={','.join(map(str, seeds))}", *args.extra]
    rows: list[tuple[str, list[float]]] = []
    root = Path(tempfile.mkdtemp(prefix="clbench-population-speed-"))
    load_before = os.getloadavg()[0]
    ways = {
        f"{len(seeds)} solo processes": None,
        "basic launcher": ["-m", *sweep],
        "joblib launcher (2 workers)": ["-m", "hydra/launcher=joblib", *sweep],
        "population launcher": ["-m", "hydra/launcher=population", *sweep],
    }
    found: dict[str, dict[int, list]] = {}
    for repeat in range(args.repeats):
        for name, command in ways.items():
            folder = root / f"{repeat}-{name.split()[0]}"
            if command is None:
                elapsed = sum(clbench([f"seed={s}", *args.extra], folder) for s in seeds)
            else:
                elapsed = clbench(command, folder)
            if name == "population launcher":
                layout = last_layout[0] if last_layout else "clbench: all jobs in the launcher's own process"
            found[name] = matrices(folder)
            if sorted(found[name]) != seeds:
                raise SystemExit(f"{name}: completed seeds {sorted(found[name])}, expected {seeds}")
            print(f"{name}: {elapsed:.1f} s", flush=True)
            next((r for r in rows if r[0] == name), None) or rows.append((name, []))
            next(r for r in rows if r[0] == name)[1].append(elapsed)
    same = found["population launcher"] == found["basic launcher"]
    largest = max(
        float(np.abs(np.asarray(found["population launcher"][s]) - np.asarray(found["basic launcher"][s])).max())
        for s in seeds
    )
    solo_times = next(r for r in rows if r[0].endswith("solo processes"))[1]
    solo, solo_median = min(solo_times), float(np.median(solo_times))
    threads = next((e.split("=", 1)[1] for e in args.extra if e.startswith("cpu_threads=")), "default")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, at {commit or 'an unknown commit'}",
        "",
        f"`python benchmarks/population_speed.py cpu --seeds {args.seeds} --repeats {args.repeats}"
        + (f" --extra {' '.join(args.extra)}" if args.extra else "")
        + f"` on {platform.node()} ({os.cpu_count()} CPUs, torch threads: {threads}), load average "
        f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after. The default job: 5-task Permuted "
        "MNIST-5k, MLP 784-100-100, 3 epochs, SGD lr 0.1, W&B offline, plots; every way runs the same seeds "
        "into a fresh results folder. Wall time of the whole thing (processes started, configs composed, "
        "results, checkpoints and W&B runs written). The ratios divide the solo processes' time by the way's: best "
        "by best, and median by median.",
        "",
        "| way | wall s (best) | median | all repeats | vs solo processes (best) | (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, times in rows:
        best, median = min(times), float(np.median(times))
        lines.append(
            f"| {name} | {best:.1f} | {median:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {solo / best:.2f}x "
            f"| {solo_median / median:.2f}x |"
        )
    lines += [
        "",
        f"The population launcher said: `{layout}`.",
        "",
        "Population members' accuracy matrices against the basic launcher's (solo runs): "
        + (
            "bit-identical."
            if same
            else f"largest difference {largest:.2f} points of R: the solo runs ran on more than one thread, where "
            "a product sums in another order than on one (a worker's members run on one thread unless cpu_threads "
            "says otherwise); population_correctness.md compares them on equal threads."
        ),
    ]
    out = args.out or RESULTS / "population_speed.md"
    write_newest_first(out, f"# Population launcher speed: {len(seeds)} seeds of the default job on this CPU", lines)
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out}")


def write_newest_first(out: Path, title: str, section: list[str]) -> None:
    """Put ``section`` under ``title`` at the top of ``out``, above the measurements already there."""
    earlier = out.read_text().split("\n", 1)[1].lstrip("\n") if out.exists() else ""
    out.write_text("\n".join([title, "", *section]) + "\n" + ("\n" + earlier if earlier else ""))


def gpu(args: argparse.Namespace) -> None:
    protocol = ["protocol=gpm_pfmnist", "strategy=gpm", "logger=none", "plots=false", *args.extra]
    root = Path(tempfile.mkdtemp(prefix="clbench-population-gpu-"))
    one = clbench(["seed=0", *protocol], root / "one")
    seeds = ",".join(map(str, range(args.seeds)))
    population = clbench(["-m", "hydra/launcher=population", f"seed={seeds}", *protocol], root / "population")
    ratio = population / one
    lines = [
        f"# Population launcher on a GPU: {args.seeds} seeds of GPM on the GPM PFMNIST protocol",
        "",
        f"`python benchmarks/population_speed.py gpu --seeds {args.seeds}"
        + (f" --extra {' '.join(args.extra)}" if args.extra else "")
        + f"` on {platform.node()}. Whole processes, W&B and plots off.",
        "",
        "| way | wall s |",
        "|---|---|",
        f"| one seed, solo process | {one:.1f} |",
        f"| {args.seeds} seeds, one population | {population:.1f} |",
        "",
        f"Ratio {ratio:.2f}x (target: at most 1.5x).",
    ]
    out = RESULTS / "population_speed_gpu.md"
    write_newest_first(out, lines[0], lines[2:])
    shutil.rmtree(root, ignore_errors=True)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("device", choices=["cpu", "gpu"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (cpu: default results/)")
    args = parser.parse_args()
    cpu(args) if args.device == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
