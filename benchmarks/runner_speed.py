"""clbench's runner against Avalanche 0.6 and a bare PyTorch loop, its evaluation share, and its memory.

Four measurements, each side by side in one invocation on the same machine (the machine is printed):

``avalanche``  whole process, imports included: ``python -m clbench`` vs an Avalanche 0.6 script (Naive
               strategy, the standard ``train(experience)`` / ``eval(test_stream)`` loop) on the same
               5-task Permuted MNIST-5k tensors, MLP 784-100-100-10, SGD lr 0.1, batch 64, 5 epochs;
               both fill the same R (random-init row included). clbench runs three ways: its default (W&B
               offline logger, heatmap PNG), ``logger=none``, and ``logger=none plots=false`` (writes only
               result.json and its checkpoint, as the Avalanche script writes nothing).
``overhead``   in one process: clbench's training time (``timings.fit_s``) vs a hand-written PyTorch loop
               doing the same steps (same per-epoch shuffles from the same generator, same batches, same
               model and initialisation) and the same evaluation of R. On a CPU clbench runs twice: its
               default (closed-form gradients) and ``trainer.closed_form=false`` (autograd, as the bare
               loop), which isolates the harness's own overhead.
``eval``       the share of a run's time spent filling R for T = 20 tasks (random-init row included), in
               fp32, fp32 without the evaluation-input cache, and with ``trainer.eval_amp=bf16``.
``memory``     peak resident memory of a run on 2 vs 100 permuted tasks (each in its own process).

    python benchmarks/runner_speed.py all                 # CPU, ~8 min on 2 cores
    python benchmarks/runner_speed.py all --device cuda   # the same on a GPU

Results go to stdout and to ``benchmarks/results/runner_speed_<device>.md``.

``ab`` compares two source trees (two commits' checkouts) on the same machine, for a change that must not
slow the runner: ``--trees OLD NEW`` (``--extra`` adds overrides to every run). Every measurement is its own
process importing clbench from one tree (``PYTHONPATH``; the tree each imported is checked and printed);
the trees take turns within each repeat, in an order that flips every repeat (old, new, then new, old), so
a slow spell of a shared machine falls on both alike. Cases: the ``overhead`` protocol's training time in
process with closed-form and with autograd steps, and the whole ``python -m clbench logger=none
plots=false`` process. Medians go to ``--out`` with the command and the load average.

    python benchmarks/runner_speed.py ab --trees /tmp/ab_old . --repeats 7 --extra cpu_threads=1 --out X.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = [
    "stream=permuted_mnist5k",
    "stream.num_tasks=5",
    "model=mlp",
    "model.hidden=[100,100]",
    "strategy=finetune",
    "trainer.epochs=5",
    "trainer.batch_size=64",
    "trainer.lr=0.1",
    "trainer.optimizer=sgd",
    "trainer.momentum=0.0",
]
EPOCHS, BATCH, LR = 5, 64, 0.1


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}, Python {platform.python_version()}"


def section(title: str, columns: list[str]) -> list[str]:
    """A results-file section: its heading and the head of its markdown table."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def median(values: list[float]) -> float:
    """The median (the mean of the two middle values of an even count)."""
    return statistics.median(values)


# -------------------------------------------------------------------------------------------------
# data shared by the three loops: clbench's own stream, exported as plain tensors
# -------------------------------------------------------------------------------------------------


def export_tensors(path: Path, seed: int, num_tasks: int = 5) -> None:
    """Per task the model inputs and targets clbench trains and tests on, as float tensors in a file."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from clbench.__main__ import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*PROTOCOL, f"stream.num_tasks={num_tasks}", f"seed={seed}"])
    stream = instantiate(cfg.stream)
    tasks = []
    for task in stream:
        tasks.append(
            {
                "x_train": stream.inputs("train", task.train_index, task.id).flatten(1),
                "y_train": task.train_targets.clone(),
                "x_test": stream.inputs("test", task.test_index, task.id).flatten(1),
                "y_test": task.test_targets.clone(),
            }
        )
    torch.save(tasks, path)


# -------------------------------------------------------------------------------------------------
# Avalanche, whole process
# -------------------------------------------------------------------------------------------------


def avalanche_child(data: Path, seed: int, device: str) -> None:
    """An Avalanche 0.6 user's script: tensors -> benchmark -> Naive -> train / eval loop."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    tasks = torch.load(data)
    bench = benchmark_from_datasets(
        train=[_make_taskaware_tensor_classification_dataset(t["x_train"], t["y_train"]) for t in tasks],
        test=[_make_taskaware_tensor_classification_dataset(t["x_test"], t["y_test"]) for t in tasks],
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
    )
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        torch.nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=EPOCHS,
        eval_mb_size=1000,
        device=device,
        evaluator=evaluator,
    )
    rows = [strategy.eval(bench.test_stream)]  # the random-init row b, as clbench's
    for experience in bench.train_stream:
        strategy.train(experience)
        rows.append(strategy.eval(bench.test_stream))
    final = rows[-1]
    accs = [v for k, v in final.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")]
    print(f"AVALANCHE ACC {100 * sum(accs) / len(accs):.2f}")


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    tick = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def bench_avalanche(args: argparse.Namespace, work: Path) -> list[str]:
    data = work / "pmnist5k.pt"
    export_tensors(data, args.seed)
    common = [sys.executable, "-m", "clbench", *PROTOCOL, f"seed={args.seed}", f"device={args.device}", "resume=false"]
    lines = section(
        "clbench vs Avalanche 0.6, whole process (5-task Permuted MNIST-5k, MLP 100-100, SGD, batch 64, 5 epochs)",
        ["run", "repeat", "wall s", "final ACC (%)"],
    )
    variants = {
        "clbench (default, W&B offline)": [f"results_dir={work / 'r_wandb'}"],
        "clbench logger=none": ["logger=none", f"results_dir={work / 'r_none'}"],
        "clbench logger=none plots=false": ["logger=none", "plots=false", f"results_dir={work / 'r_bare'}"],
    }
    if args.device.startswith("cuda"):  # the default replays whole steps as CUDA graphs; this one does not
        variants["clbench logger=none plots=false trainer.cuda_graphs=false"] = [
            "logger=none",
            "plots=false",
            "trainer.cuda_graphs=false",
            f"results_dir={work / 'r_eager'}",
        ]
    times: dict[str, list[float]] = {name: [] for name in [*variants, "avalanche"]}
    env = dict(os.environ, WANDB_SILENT="true")
    for repeat in range(args.repeats):
        runs = {
            **{name: [*common, *extra] for name, extra in variants.items()},
            "avalanche": [
                sys.executable,
                __file__,
                "avalanche-child",
                "--data",
                str(data),
                "--seed",
                str(args.seed),
                "--device",
                args.device,
            ],
        }
        for name, command in runs.items():
            seconds, text = timed(command, env)
            found = re.search(r"AVALANCHE ACC ([\d.]+)", text) or re.search(r"ACC ([\d.]+)% \|", text)
            acc = found.group(1) if found else "?"
            times[name].append(seconds)
            lines.append(f"| {name} | {repeat} | {seconds:.2f} | {acc} |")
            print(lines[-1], flush=True)
    best = {name: min(values) for name, values in times.items()}
    lines += [
        "",
        f"Best of {args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()) + ".",
        "Speed-up over Avalanche (best of each): "
        + ", ".join(f"{name} **{best['avalanche'] / best[name]:.2f}x**" for name in variants)
        + ".",
        "",
    ]
    return lines


# -------------------------------------------------------------------------------------------------
# bare PyTorch loop, in process
# -------------------------------------------------------------------------------------------------


def bare_loop(seed: int, device: str) -> dict[str, float]:
    """A hand-written loop: each task's inputs prepared once, then per epoch a shuffle from a generator
    seeded as clbench's and contiguous batches; R filled after every task with big no-grad batches."""
    import torch
    import torch.nn.functional as F

    from clbench.models import MLP

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "clbench_bench_bare.pt"
    export_tensors(work, seed)
    tasks = [{k: v.to(device) for k, v in t.items()} for t in torch.load(work)]
    torch.manual_seed(seed)
    model = MLP([1, 28, 28], [10], hidden=[100, 100]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def evaluate() -> list[float]:
        model.eval()
        with torch.inference_mode():
            row = [(model(t["x_test"]).argmax(1) == t["y_test"]).float().mean() * 100 for t in tasks]
        model.train()
        return torch.stack(row).tolist()

    fit = evaluation = 0.0
    tick = time.perf_counter()
    evaluate()
    evaluation += time.perf_counter() - tick
    for t in tasks:
        tick = time.perf_counter()
        x, y = t["x_train"], t["y_train"]
        for _ in range(EPOCHS):
            order = torch.randperm(len(x), device=device, generator=generator)
            xs, ys = x[order], y[order]
            for start in range(0, len(x), BATCH):
                loss = F.cross_entropy(model(xs[start : start + BATCH]), ys[start : start + BATCH])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fit += time.perf_counter() - tick
        tick = time.perf_counter()
        row = evaluate()
        evaluation += time.perf_counter() - tick
    return {"fit_s": fit, "eval_s": evaluation, "acc": sum(row) / len(row)}


def clbench_in_process(seed: int, device: str, work: Path, extra: list[str] = ()) -> dict:
    from hydra import compose, initialize_config_dir

    from clbench.__main__ import CONFIG_DIR
    from clbench.runner import run

    overrides = [
        *PROTOCOL,
        f"seed={seed}",
        f"device={device}",
        "logger=none",
        "trainer.progress=false",
        "verbose=false",
        "resume=false",
        f"results_dir={work}",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return run(cfg)


def bench_overhead(args: argparse.Namespace, work: Path) -> list[str]:
    lines = section(
        "Harness overhead: clbench vs a bare PyTorch loop (same 5-task protocol, in one process)",
        ["repeat", "bare fit s", "clbench fit s", "ratio", "bare eval s", "clbench eval s", "bare ACC", "clbench ACC"],
    )
    ratios: dict[str, list[float]] = {}
    setups = {"clbench": []}
    if args.device.startswith("cuda"):
        setups["clbench trainer.cuda_graphs=false"] = ["trainer.cuda_graphs=false"]
    else:  # the default's closed-form steps vs the bare loop's autograd ones; this one runs autograd as it does
        setups["clbench trainer.closed_form=false"] = ["trainer.closed_form=false"]
    for repeat in range(args.repeats):
        bare = bare_loop(args.seed, args.device)
        for label, extra in setups.items():
            result = clbench_in_process(args.seed, args.device, work / "overhead", extra)
            fit, evaluation = sum(result["timings"]["fit_s"]), sum(result["timings"]["eval_s"])
            ratios.setdefault(label, []).append(fit / bare["fit_s"])
            tag = "" if label == "clbench" else f" ({label})"
            ratio = ratios[label][-1]
            lines.append(
                f"| {repeat}{tag} | {bare['fit_s']:.3f} | {fit:.3f} | {ratio:.3f}x | {bare['eval_s']:.3f} | "
                f"{evaluation:.3f} | {bare['acc']:.2f} | {result['metrics']['acc']:.2f} |"
            )
            print(lines[-1], flush=True)
    summary = ", ".join(f"{label} {median(values):.3f}x" for label, values in ratios.items())
    lines += ["", f"Median training-time ratio clbench / bare: {summary}.", ""]
    return lines


# -------------------------------------------------------------------------------------------------
# evaluation share at T = 20, and memory
# -------------------------------------------------------------------------------------------------


def bench_eval(args: argparse.Namespace, work: Path) -> list[str]:
    """Two denominators: the run's own total (``timings.total_s``: from the random-init row to the result
    file, the heatmap included), and training plus evaluation alone (the strictest reading).

    The setups take turns within each repeat, so a slow spell of a shared machine falls on all of them
    alike. A slow spell stretches training more than evaluation (it lasts longer) and so flatters a
    repeat's share; the best-of-N reading divides the fastest evaluation by the fastest training and total
    instead, the machine at its quietest for both."""
    lines = section(
        "Evaluation share, T = 20 (Permuted MNIST-5k, 21 rows x 20 test sets incl. the random-init row)",
        [
            "evaluation precision",
            "repeat",
            "fit s",
            "evaluation s",
            "run total s",
            "share of run total",
            "share of fit + evaluation",
            "ACC",
        ],
    )
    setups = (
        ("fp32 (default)", []),
        ("fp32, inputs prepared every row (trainer.eval_cache_mb=0)", ["trainer.eval_cache_mb=0"]),
        ("bf16 autocast (trainer.eval_amp=bf16)", ["trainer.eval_amp=bf16"]),
    )
    measured: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _ in setups}
    for repeat in range(args.repeats):
        for label, extra in setups:
            result = clbench_in_process(args.seed, args.device, work / "eval20", ["stream.num_tasks=20", *extra])
            timings = result["timings"]
            fit = sum(timings["fit_s"])
            evaluation = sum(timings["eval_s"]) + timings["random_init_eval_s"]
            measured[label].append((fit, evaluation, timings["total_s"], result["metrics"]["acc"]))
            print(f"{label} repeat {repeat}: fit {fit:.2f} s, evaluation {evaluation:.2f} s", flush=True)
    summary = []
    for label, _ in setups:
        shares, strict = [], []
        for repeat, (fit, evaluation, total, acc) in enumerate(measured[label]):
            shares.append(100 * evaluation / total)
            strict.append(100 * evaluation / (fit + evaluation))
            lines.append(
                f"| {label} | {repeat} | {fit:.2f} | {evaluation:.2f} | {total:.2f} | {shares[-1]:.1f} % | "
                f"{strict[-1]:.1f} % | {acc:.2f} |"
            )
        fit, evaluation, total = (min(m[k] for m in measured[label]) for k in range(3))
        summary.append(
            f"- {label}: median **{median(shares):.1f} %** of the run, **{median(strict):.1f} %** of fit + "
            f"evaluation; best of {args.repeats} ({evaluation:.2f} s of {total:.2f} s, fit {fit:.2f} s) "
            f"**{100 * evaluation / total:.1f} %** of the run, **{100 * evaluation / (fit + evaluation):.1f} %** "
            "of fit + evaluation."
        )
    return [*lines, "", f"Evaluation share over {args.repeats} repeats:", "", *summary, ""]


def memory_child(num_tasks: int, device: str, work: Path) -> None:
    import torch

    result = clbench_in_process(
        0, device, work / f"mem{num_tasks}", [f"stream.num_tasks={num_tasks}", "trainer.epochs=1"]
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    print(f"MEMORY {num_tasks} {peak_kib / 1024:.1f} {gpu:.1f} {result['tasks_completed']}")


def bench_memory(args: argparse.Namespace, work: Path) -> list[str]:
    found = {}
    for num_tasks in (2, 100):
        _, text = timed(
            [
                sys.executable,
                __file__,
                "memory-child",
                "--tasks",
                str(num_tasks),
                "--device",
                args.device,
                "--work",
                str(work),
            ]
        )
        match = re.search(r"MEMORY (\d+) ([\d.]+) ([\d.]+) (\d+)", text)
        assert match is not None, text
        found[num_tasks] = (float(match.group(2)), float(match.group(3)))
    rss = found[100][0] / found[2][0]
    lines = [
        "## Peak memory, 2 vs 100 permuted tasks (Permuted MNIST-5k, 1 epoch, each in its own process)",
        "",
        f"peak RSS: 2 tasks {found[2][0]:.0f} MiB, 100 tasks {found[100][0]:.0f} MiB: **{rss:.2f}x**.",
    ]
    if args.device.startswith("cuda"):
        lines.append(
            f"peak GPU memory: 2 tasks {found[2][1]:.1f} MiB, 100 tasks {found[100][1]:.1f} MiB "
            f"({found[100][1] / max(found[2][1], 1e-9):.2f}x)."
        )
    return [*lines, ""]


# -------------------------------------------------------------------------------------------------
# A/B of two source trees
# -------------------------------------------------------------------------------------------------

AB_CASES = {  # name -> in-process overrides (None: the whole python -m clbench process)
    "fit, closed-form steps (default)": [],
    "fit, autograd steps (trainer.closed_form=false)": ["trainer.closed_form=false"],
    "whole process (logger=none plots=false)": None,
}


def ab_child(args: argparse.Namespace) -> None:
    """One in-process run of an ``ab`` case, from whichever tree ``PYTHONPATH`` puts first: the training
    time as the runner records it (wall), and the CPU time this process spent inside ``Trainer.fit``."""
    import clbench
    from clbench.trainer import Trainer

    fit, cpu = Trainer.fit, [0.0]

    def cpu_timed_fit(self: Trainer, *args: object, **kwargs: object) -> list[float]:
        tick = time.process_time()
        try:
            return fit(self, *args, **kwargs)
        finally:
            cpu[0] += time.process_time() - tick

    Trainer.fit = cpu_timed_fit
    result = clbench_in_process(args.seed, args.device, args.work, [*json.loads(args.case), *args.extra])
    wall = sum(result["timings"]["fit_s"])
    print("AB " + json.dumps({"wall": wall, "cpu": cpu[0], "acc": result["metrics"]["acc"], "tree": clbench.__file__}))


def ab_measure(args: argparse.Namespace, tree: Path, case: list[str] | None, work: Path) -> dict:
    """One measurement of ``case`` with clbench from ``tree``: wall and CPU seconds, final ACC, the tree
    imported. CPU time counts only this run's own work, so it is far less stretched than wall time by
    other processes on a loaded machine (with cpu_threads=1 it is one thread's time)."""
    env = dict(os.environ, PYTHONPATH=str(tree), WANDB_SILENT="true")
    if case is None:  # run from the work folder: python -m puts the current folder before PYTHONPATH
        command = [sys.executable, "-m", "clbench", *PROTOCOL, f"seed={args.seed}", f"device={args.device}"]
        command += ["resume=false", "logger=none", "plots=false", f"results_dir={work}", *args.extra]
        usage, tick = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
        seconds, after = time.perf_counter() - tick, resource.getrusage(resource.RUSAGE_CHILDREN)
        found = re.search(r"ACC ([\d.]+)% \|", done.stdout + done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        return {"wall": seconds, "cpu": cpu, "acc": float(found.group(1)), "tree": str(tree)}
    command = [sys.executable, __file__, "ab-child", "--case", json.dumps(case), "--work", str(work)]
    command += ["--seed", str(args.seed), "--device", args.device, *(f"--extra={e}" for e in args.extra)]
    _, text = timed(command, env)
    return json.loads(text.split("AB ", 1)[1].splitlines()[0])


def bench_ab(args: argparse.Namespace, work: Path) -> list[str]:
    trees = [tree.resolve() for tree in args.trees]
    labels = ["old", "new"]
    for label, tree in zip(labels, trees, strict=True):
        env = dict(os.environ, PYTHONPATH=str(tree))
        check = [sys.executable, "-c", "import clbench; print(clbench.__file__)"]
        imported = subprocess.run(check, cwd=work, capture_output=True, text=True, env=env).stdout.strip()
        if not imported.startswith(str(tree)):
            raise RuntimeError(f"PYTHONPATH={tree} imports clbench from {imported}: not the tree asked for")
        print(f"{label}: {tree} (git {git_head(tree)}) imports {imported}", flush=True)
    load_before = os.getloadavg()
    columns = ["case", "repeat", "order", "old wall", "new wall", "old CPU", "new CPU", "ACC old / new"]
    lines = section("Every measurement, in the order run (seconds)", columns)
    measured: dict[str, dict[str, list[dict]]] = {case: {label: [] for label in labels} for case in AB_CASES}
    for repeat in range(args.repeats):
        order = labels if repeat % 2 == 0 else labels[::-1]
        for case, overrides in AB_CASES.items():
            for label in order:
                tree = trees[labels.index(label)]
                folder = work / "ab" / label
                folder.mkdir(parents=True, exist_ok=True)
                got = ab_measure(args, tree, overrides, folder)
                assert got["tree"].startswith(str(tree)), f"{label} ran clbench from {got['tree']}"
                measured[case][label].append(got)
            old, new = measured[case]["old"][-1], measured[case]["new"][-1]
            lines.append(
                f"| {case} | {repeat} | {'-'.join(order)} | {old['wall']:.3f} | {new['wall']:.3f} | "
                f"{old['cpu']:.3f} | {new['cpu']:.3f} | {old['acc']:.2f} / {new['acc']:.2f} |"
            )
            print(lines[-1], flush=True)
    load_after = os.getloadavg()
    columns = ["case", "old wall", "new wall", "new / old", "old CPU", "new CPU", "new / old"]
    summary = section(f"Medians over {args.repeats} repeats (seconds)", columns)
    for case, runs in measured.items():
        cells = []
        for kind in ("wall", "cpu"):
            old, new = (median([run[kind] for run in runs[label]]) for label in labels)
            cells += [f"{old:.3f}", f"{new:.3f}", f"{new / old:.3f}x"]
        summary.append(f"| {case} | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{v:.2f}" for v in load_before), ", ".join(f"{v:.2f}" for v in load_after)
    head = [
        f"Trees: old `{trees[0]}` (git {git_head(trees[0])}), new `{trees[1]}` (git {git_head(trees[1])}).",
        f"Extra overrides on every run: `{' '.join(args.extra) or 'none'}`.",
        f"Load average (1, 5, 15 min) at the start: {loads[0]}; at the end: {loads[1]}.",
        "",
    ]
    return [*head, *summary, "", *lines, ""]


def git_head(tree: Path) -> str:
    """The tree's checked-out commit, with ``+changes`` where its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD", "--", "clbench", "strategies"])
    return head.stdout.strip() + ("+changes" if dirty.returncode else "")


BENCHES = {"avalanche": bench_avalanche, "overhead": bench_overhead, "eval": bench_eval, "memory": bench_memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=[*BENCHES, "all", "ab", "avalanche-child", "memory-child", "ab-child"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clbench_runner_speed"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trees", type=Path, nargs=2, metavar=("OLD", "NEW"), help="ab: the two source trees")
    parser.add_argument("--extra", action="append", default=[], help="ab: an override for every run (repeatable)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "avalanche-child":
        avalanche_child(args.data, args.seed, args.device)
        return 0
    if args.what == "memory-child":
        memory_child(args.tasks, args.device, args.work)
        return 0
    if args.what == "ab-child":
        ab_child(args)
        return 0
    if args.what == "ab" and args.trees is None:
        parser.error("ab needs --trees OLD NEW")
    args.work.mkdir(parents=True, exist_ok=True)
    chosen = list(BENCHES) if args.what == "all" else [args.what]
    command = f"python benchmarks/runner_speed.py {args.what} --device {args.device} --repeats {args.repeats}"
    if args.what == "ab":
        chosen, command = ["ab"], " ".join(["python", *sys.argv])
    lines = [
        f"# clbench runner speed ({args.device})",
        "",
        f"Machine: {machine(args.device)}.",
        f"Command: `{command}`",
        "",
    ]
    print("\n".join(lines), flush=True)
    for name in chosen:
        lines += {**BENCHES, "ab": bench_ab}[name](args, args.work)
        print("\n".join(lines[-3:]), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"runner_speed_{args.device.split(':')[0]}.md"
    if args.what == "ab" and args.out is not None:
        out.write_text("\n".join(lines))
        print(f"written: {out}")
    if args.what == "all":
        out.write_text("\n".join(lines))
        print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
