"""SPU against fine-tuning, LwF, EWC, a random mask of SPU's size and training only the head, on the
pretrain-then-continue protocol, 3 seeds: ACC, BWT and the control change (generic knowledge kept).

``protocol=pretrained_fmnist`` pretrains clbench's small ViT on Fashion-MNIST classes 0-4 (once, cached under the
results folder), then learns MNIST-5k's digits as 5 tasks of 2; the control set is the pretraining classes' test
split read through the pretraining classifier. Each variant is one Hydra multirun over the seeds into one results
folder, then ``python -m clbench.report`` summarises them; this script writes ``benchmarks/results/spu.md`` with
mean ± sd over seeds, the exact commands, the machine, and the report's full table.

    python benchmarks/spu.py [--seeds 0 1 2] [--results results/spu] [--extra ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "spu.md"
PROTOCOL = "pretrained_fmnist"
# (slug, label, overrides): the six rows; every run on the same protocol, pretraining and control set
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("finetune", "fine-tune", ["strategy=finetune"]),
    ("lwf", "LwF", ["strategy=lwf"]),
    ("ewc", "EWC", ["strategy=ewc"]),
    ("spu", "SPU", ["strategy=spu"]),
    ("spu_random", "SPU, random mask of the same size", ["strategy=spu", "strategy.selection=random"]),
    ("head_only", "head only (body frozen)", ["strategy=finetune", "model.freeze=[body]"]),
]
EXTRA = {
    "spu_buffer_free": ("spu_buffer_free", "SPU, buffer-free", ["strategy=spu", "strategy.buffer_size=0"]),
    "spu_loss_score": ("spu_loss_score", "SPU, scored by the loss", ["strategy=spu", "strategy.score=loss"]),
}
COMMON = ["logger=none", "trainer.progress=false", "verbose=false", "cpu_threads=1", "plots=false"]


def build_command(slug: str, overrides: list[str], seeds: list[int], results: Path, common: list[str]) -> list[str]:
    """One variant's multirun over the seeds, its index in ``<results>/_hydra/sweeps/<slug>``."""
    return [
        sys.executable,
        "-m",
        "clbench",
        "-m",
        f"protocol={PROTOCOL}",
        *overrides,
        f"seed={','.join(map(str, seeds))}",
        *COMMON,
        *common,
        f"results_dir={results}",
        f"hydra.sweep.dir={results / '_hydra' / 'sweeps' / slug}",
    ]


def sweep(command: list[str]) -> tuple[float, int]:
    """Run one multirun; its wall time and exit code (a failed job is reported, not fatal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    tick = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT)
    return time.perf_counter() - tick, done.returncode


def results_of(results: Path, slug: str) -> list[dict[str, Any]]:
    """The completed results of one variant's sweep (its ``index.json``)."""
    index = ROOT / results / "_hydra" / "sweeps" / slug / "index.json"
    if not index.exists():
        return []
    found = []
    for job in json.loads(index.read_text()).get("jobs", []):
        path = Path(job.get("result") or "")
        path = path if path.is_absolute() else ROOT / path
        if job.get("status") == "completed" and path.exists():
            found.append(json.loads(path.read_text()))
    return found


def cell(values: list[float]) -> str:
    """mean ± sd over seeds (sd with n - 1), or the single value."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return "–"
    if data.size == 1:
        return f"{data[0]:.2f}"
    return f"{data.mean():.2f} ± {data.std(ddof=1):.2f}"


def row(label: str, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return f"| {label} | 0 | – | – | – | – | – | – | – |"
    metrics = [run["metrics"] for run in runs]
    before = [run.get("control_acc_before") for run in runs]
    train = [sum(run["timings"]["fit_s"]) for run in runs]
    trained = [run["spu"]["trained_fraction_of_model"] * 100 for run in runs if "spu" in run]
    return (
        f"| {label} | {len(runs)} | {cell([m['acc'] for m in metrics])} | {cell([m['bwt'] for m in metrics])} | "
        f"{cell([m.get('control_change') for m in metrics])} | {cell(before)} | "
        f"{cell([m.get('control_acc_final') for m in metrics])} | {cell(trained) if trained else '–'} | "
        f"{np.mean(train):.0f} s |"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "spu")
    parser.add_argument("--extra", nargs="*", default=[], choices=sorted(EXTRA), help="extra rows")
    parser.add_argument("--label", default="", help="a note on the first line of the table file (e.g. partial)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run, e.g. model=mlp")
    parser.add_argument("--out", type=Path, default=OUT, help="the table file to write")
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs already there, run nothing")
    args = parser.parse_args()
    variants = [*VARIANTS, *(EXTRA[name] for name in args.extra)]
    results = args.results.resolve()
    if results.is_relative_to(ROOT):  # the commands run from the checkout: shown relative to it
        results = results.relative_to(ROOT)
    started = time.perf_counter()
    commands = []
    for slug, label, overrides in variants:
        command = build_command(slug, overrides, args.seeds, results, args.set)
        wall, code = (math.nan, None) if args.report_only else sweep(command)
        commands.append((label, ["python", *command[1:]], wall, code))
        print(f"{label}: {wall:.0f} s, exit code {code}", flush=True)
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "clbench.report",
            str(results),
            "--baseline",
            "finetune",
            "--format",
            "md",
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    rows = [row(label, results_of(results, slug)) for slug, label, _ in variants]
    typed = " ".join(["python", "benchmarks/spu.py", *(["--seeds", *map(str, args.seeds)])])
    if args.extra:
        typed += " --extra " + " ".join(args.extra)
    if args.set:
        typed += " --set " + " ".join(args.set)
    if args.results != ROOT / "results" / "spu":
        typed += f" --results {args.results}"
    if args.out != OUT:
        typed += f" --out {args.out}"
    example = next(run for slug, _, _ in variants for run in results_of(results, slug))
    pretrain = example["config"].get("pretrain", {})
    lines = [
        "# SPU and the control set on the pretrain-then-continue protocol",
        "",
        *([f"**{args.label}**", ""] if args.label else []),
        f"Command: `{typed}` ("
        + (
            "the runs it made, tabulated again with --report-only"
            if args.report_only
            else f"{time.perf_counter() - started:.0f} s in all"
        )
        + ", one job at a time, cpu_threads=1).",
        f"Machine: {machine()}.",
        "",
        f"Protocol `{PROTOCOL}`: the model is pretrained on {pretrain.get('dataset', {}).get('_target_', '?')} classes "
        f"{pretrain.get('classes')} ({pretrain.get('epochs')} epochs, seed {pretrain.get('seed')}; one cached "
        f"checkpoint for every run), then learns {example['stream']} as {len(example['tasks'])} tasks "
        f"({example['scenario']} scenario); model `{example['config']['model']['_target_']}`. Control set: "
        f"{example['control']['dataset']} test images of the pretraining classes ({example['control']['num_test']}), "
        f"read through the pretraining classifier (`control={example['config']['control']['name']}`).",
        "",
        "ACC, BWT over the stream's tasks; control change = control accuracy after the last task - before the first "
        "(percent; negative = pretraining knowledge lost). Cells: mean ± sd over seeds "
        f"({', '.join(map(str, args.seeds))}). Trained: the share of the model's parameters SPU updates per task.",
        "",
        "| variant | n | ACC | BWT | control change | control before | control after | trained % | train time |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Commands (one Hydra multirun per variant, all into one results folder):",
        "",
        *[
            f"- {label}{'' if code is None else f' ({wall:.0f} s, exit code {code})'}: `{shlex.join(command)}`"
            for label, command, wall, code in commands
        ],
        "",
        f"`python -m clbench.report {results.relative_to(ROOT) if results.is_relative_to(ROOT) else results} "
        "--baseline finetune --format md` (95 % intervals, paired tests against fine-tune):",
        "",
        report.strip(),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
