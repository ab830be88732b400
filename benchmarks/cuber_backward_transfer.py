"""CUBER's backward transfer (issue 21): GPM, TRGP, CUBER and fine-tune on two streams, 3 seeds, one command.

    python benchmarks/cuber_backward_transfer.py

Streams: rotated Fashion-MNIST with 3-degree steps (strongly related tasks, where backward transfer can exist)
and permuted Fashion-MNIST (GPM's PMNIST protocol, reduced). Both use the GPM PMNIST recipe (MLP 784-100-100-10
without biases, one shared head, SGD lr 0.01 without momentum, batch 10, 10 % of train held out, thresholds
[0.95, 0.99, 0.99], 300 samples per representation, eps1 / trust threshold 0.2), reduced so that the 24 runs fit
a shared 2-core CPU: ``--tasks`` tasks (5), ``--train`` training images per task (3,000, before the 10 % split)
and ``--epochs`` epochs (2), identical for every strategy. Each run goes through ``clbench.runner.run`` on the
composed config (in-process, ``cpu_threads=1``); runs already completed under ``--results-dir`` are skipped
(``resume=true``; a run made by other strategy source is run again unless ``--keep``), so a stopped script
can be started again. The table (with CUBER's regime diagnostics from result.json) goes to ``--table``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("finetune", "gpm", "trgp", "cuber")
STEP_DEGREES = 3.0
THRESHOLDS = "strategy.threshold=[0.95,0.99,0.99]"
STRATEGY_SETTINGS = {
    "finetune": [],
    "gpm": [THRESHOLDS, "strategy.num_samples=300"],
    "trgp": [THRESHOLDS, "strategy.num_samples=300", "strategy.trust_threshold=0.2"],
    "cuber": [THRESHOLDS, "strategy.num_samples=300", "strategy.eps1=0.2"],
}


def stream_overrides(stream: str, tasks: int) -> list[str]:
    if stream == "rotated_fashion_mnist":
        return [f"stream={stream}", f"stream.num_tasks={tasks}", f"stream.max_angle={STEP_DEGREES * tasks}"]
    return [f"stream={stream}", f"stream.num_tasks={tasks}", "stream.permute_first=true"]


def strategy_settings(strategy: str, args: argparse.Namespace) -> list[str]:
    """The recipe's settings for ``strategy`` with the command line's extra overrides for it (``--gpm``,
    ``--trgp``, ``--cuber``: ablations and probes); an extra override replaces a recipe setting of its key."""
    extra = list(getattr(args, strategy, None) or [])
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in STRATEGY_SETTINGS[strategy] if item.split("=", 1)[0] not in keys] + extra


def overrides(stream: str, strategy: str, seed: int, args: argparse.Namespace) -> list[str]:
    return [
        *stream_overrides(stream, args.tasks),
        "stream.scenario=domain",
        "stream.val_fraction=0.1",
        f"stream.train_per_task={args.train}",
        "model=mlp",
        "model.hidden=[100,100]",
        "model.bias=false",
        f"trainer.epochs={args.epochs}",
        "trainer.batch_size=10",
        "trainer.lr=0.01",
        "trainer.optimizer=sgd",
        "trainer.momentum=0.0",
        "trainer.weight_decay=0.0",
        "trainer.progress=false",
        f"strategy={strategy}",
        *strategy_settings(strategy, args),
        f"seed={seed}",
        "cpu_threads=1",
        "device=cpu",
        "logger=none",
        "plots=false",
        "verbose=false",
        f"resume={'keep' if args.keep else 'true'}",
        f"results_dir={args.results_dir}",
    ]


def run_one(stream: str, strategy: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from clbench.__main__ import CONFIG_DIR
    from clbench.runner import run

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(stream, strategy, seed, args))
    return run(cfg)


def undo_probe(args: argparse.Namespace) -> str:
    """What CUBER's move inside the free subspace does to task 0 at task 1 of the rotated stream, for the default
    ``lam`` and ``lam=0`` from the same W_0 (per seed): task 0's test accuracy after task 1, the same with the move
    inside F undone (``W - (W - W_0) F F^T``: what is left is TRGP's update), the move's norm per layer and the
    first-order change of task 0's loss it predicts (CUBER's own diagnostic). No result files: in-process."""
    import copy

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from clbench.__main__ import CONFIG_DIR
    from clbench.runner import seed_everything

    rows = []
    for seed in args.seeds:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides("rotated_fashion_mnist", "cuber", seed, args))
        seed_everything(seed)
        torch.set_num_threads(1)
        stream = instantiate(cfg.stream)
        model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
        strategy = instantiate(cfg.strategy)
        strategy.setup(model, stream)
        assert not any(layer.has_bias for layer in strategy.layers), "the probe restores bias-free weights only"
        trainer = instantiate(cfg.trainer)
        trainer.attach(stream, seed)
        strategy.fit_task(stream.tasks[0], trainer)
        strategy.after_task(stream.tasks[0])
        state, weights, rng = (
            copy.deepcopy(strategy.state_dict()),
            copy.deepcopy(model.state_dict()),
            torch.get_rng_state(),
        )
        first = strategy.test_accuracies(trainer, [0])[0]
        for lam in dict.fromkeys([strategy.lam, 0.0]):
            model.load_state_dict(weights)
            strategy.load_state_dict(copy.deepcopy(state))
            torch.set_rng_state(rng)
            strategy.lam = lam
            strategy.fit_task(stream.tasks[1], trainer)
            log = strategy.regime_log[-1]
            after = strategy.test_accuracies(trainer, [0])[0]
            with torch.no_grad():
                for layer, free, start in zip(strategy.layers, strategy.free, strategy.start_weights, strict=True):
                    if free is not None and start is not None:
                        weight = layer.weight_matrix().detach()
                        moved = free.component((weight - start).to(free.bases.dtype)).to(weight.dtype)
                        layer.module.weight.copy_((weight - moved).view_as(layer.module.weight))
            undone = strategy.test_accuracies(trainer, [0])[0]
            predicted = sum(c["change"] for c in log["regime3_first_order"])
            norms = ", ".join(f"{n:.3f}" for n in log["free_move"])
            rows.append(
                f"| {seed} | {lam:g} | {log['regimes']} | {first:.2f} | {after:.2f} | {undone:.2f} | "
                f"{after - undone:+.2f} | {norms} | {predicted:+.4f} |"
            )
            print(rows[-1], flush=True)
    return "\n".join(
        [
            "# CUBER's move inside the free subspace at task 1 (issue 21)",
            "",
            "Rotated Fashion-MNIST, the recipe of cuber_backward_transfer.md; per seed one task-0 model W_0, "
            "then task 1 with CUBER at the given lam from that same W_0. R[0][0]: task 0's test accuracy after "
            "task 0; after: after task 1; undone: after task 1 with the move inside the free subspace F removed "
            "(W - (W - W_0) F F^T, i.e. TRGP's update of that run); effect = after - undone. Predicted: the "
            "first-order change of task 0's loss from the move, with task 0's stored gradient (negative: descent).",
            "",
            f"Made by `{made_by()}`.",
            "",
            "| seed | lam | regimes | R[0][0] | after | undone | effect of the move | norm of the move per layer "
            "| predicted loss change |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def mean_sd(values: list[float], sign: str = "") -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.2f} +- {sd:.2f}"


def regime_summary(results: list[dict[str, Any]], trgp: list[dict[str, Any]]) -> list[str]:
    """CUBER's diagnostics over seeds: pairs per regime, free ranks, accuracy change of regime-3 tasks, and
    the change of the same (task t, old task j) under TRGP with the same seed (a paired comparison)."""
    counts = {1: 0, 2: 0, 3: 0}
    ranks: list[list[int]] = []
    changes: list[float] = []
    paired: list[float] = []
    per_task: dict[int, list[float]] = {}
    first_order: list[tuple[float, float]] = []  # (predicted change of task j's loss, accuracy change of j)
    trgp_acc = {r["seed"]: r["acc_matrix"] for r in trgp}
    for result in results:
        other = trgp_acc.get(result["seed"])
        for entry in result.get("cuber_regimes", []):
            t = entry["task"]
            if other is not None:
                paired.extend(other[t][c["task"]] - other[t - 1][c["task"]] for c in entry["regime3_accuracy"])
            for row in entry["regimes"]:
                for regime in row:
                    counts[regime] += 1
            if entry["task"] > 0:
                ranks.append(entry["free_rank"])
            for change in entry["regime3_accuracy"]:
                changes.append(change["change"])
                per_task.setdefault(entry["task"], []).append(change["change"])
            accuracy = {c["task"]: c["change"] for c in entry["regime3_accuracy"]}
            first_order.extend((c["change"], accuracy[c["task"]]) for c in entry.get("regime3_first_order", []))
    layers = len(ranks[0]) if ranks else 0
    mean_ranks = ", ".join(f"{statistics.mean(r[i] for r in ranks):.1f}" for i in range(layers)) or "-"
    positive = sum(c > 0 for c in changes)
    lines = [
        f"- (layer, old task) pairs per regime, summed over tasks and seeds: regime 1 {counts[1]}, "
        f"regime 2 {counts[2]}, regime 3 {counts[3]}",
        f"- free-subspace rank per projected layer, mean over tasks 1.. and seeds: {mean_ranks}",
        f"- accuracy change of a regime-3 task during the task (R[t][j] - R[t-1][j]): {len(changes)} cases, "
        f"mean {statistics.mean(changes) if changes else float('nan'):+.2f}, {positive} positive",
        f"- the same (t, j) cases under TRGP, same seeds: {len(paired)} cases, mean "
        f"{statistics.mean(paired) if paired else float('nan'):+.2f}, {sum(c > 0 for c in paired)} positive",
        "- mean change by task t: "
        + ", ".join(f"t={t}: {statistics.mean(v):+.2f} (n={len(v)})" for t, v in sorted(per_task.items())),
    ]
    if first_order:
        descent = [acc for predicted, acc in first_order if predicted < 0]
        ascent = [acc for predicted, acc in first_order if predicted >= 0]
        lines.append(
            "- first-order change of a regime-3 task's loss predicted by the move inside the free subspace (its "
            f"stored gradient): {len(first_order)} cases, mean {statistics.mean(p for p, _ in first_order):+.4f}; "
            f"{len(descent)} descent (their accuracy change: mean "
            f"{statistics.mean(descent) if descent else float('nan'):+.2f}), {len(ascent)} not (mean "
            f"{statistics.mean(ascent) if ascent else float('nan'):+.2f})"
        )
    return lines


def verdict(found: dict[tuple[str, str], list[dict[str, Any]]], stream: str) -> list[str]:
    """The issue's checks, computed from the runs: CUBER's BWT positive and above TRGP's and GPM's; its ACC
    not below TRGP's; fine-tune's own BWT (whether backward transfer can exist on the stream at all)."""
    means = {}
    for strategy in STRATEGIES:
        runs = found.get((stream, strategy), [])
        if runs:
            means[strategy] = (
                statistics.mean(r["metrics"]["acc"] for r in runs),
                statistics.mean(r["metrics"]["bwt"] for r in runs),
            )
    if not {"cuber", "trgp", "gpm"} <= set(means):
        return []
    acc, bwt = means["cuber"]
    lines = [
        f"- CUBER's mean BWT is {'positive' if bwt > 0 else 'not positive'} ({bwt:+.2f}), "
        f"{'above' if bwt > means['trgp'][1] else 'not above'} TRGP's ({means['trgp'][1]:+.2f}) and "
        f"{'above' if bwt > means['gpm'][1] else 'not above'} GPM's ({means['gpm'][1]:+.2f}).",
        f"- CUBER's mean ACC {acc:.2f} is {'not below' if acc >= means['trgp'][0] else 'below'} TRGP's "
        f"({means['trgp'][0]:.2f}).",
    ]
    if "finetune" in means:
        lines.append(f"- Fine-tune's own mean BWT: {means['finetune'][1]:+.2f}.")
    return lines


def made_by() -> str:
    """The command line that made the runs (``--keep`` only rebuilds the table, so it is left out)."""
    words = [shlex.quote(word) for word in sys.argv[1:] if word != "--keep"]
    return " ".join(["python benchmarks/cuber_backward_transfer.py", *words])


def table(found: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace, streams: list[str]) -> str:
    lines = [
        "# CUBER backward transfer (issue 21)",
        "",
        f"Reduced GPM PMNIST recipe on CPU (cpu_threads=1): {args.tasks} tasks, {args.train} training images per "
        f"task (10 % held out), {args.epochs} epochs, batch 10, SGD lr 0.01, MLP 784-100-100-10 without biases, "
        "thresholds [0.95, 0.99, 0.99], 300 samples per representation, eps1 / trust threshold 0.2, CUBER "
        "eps2 0.01, lam 1, top_k 2 (conf/strategy/cuber.yaml defaults, unless overridden below); identical for every "
        "strategy. "
        f"Rotated Fashion-MNIST steps {STEP_DEGREES:g} degrees per task. ACC and BWT in percent, mean +- sd over "
        "seeds.",
        "",
        f"Made by `{made_by()}`" + (" (table rebuilt by --keep from its finished runs)." if args.keep else "."),
        "",
    ]
    for stream in streams:
        lines += [
            f"## {stream}",
            "",
            "| strategy | seeds | ACC | BWT | BWT per seed | wall s per run |",
            "|---|---|---|---|---|---|",
        ]
        for strategy in STRATEGIES:
            runs = sorted(found.get((stream, strategy), []), key=lambda r: r["seed"])
            acc = [r["metrics"]["acc"] for r in runs]
            bwt = [r["metrics"]["bwt"] for r in runs]
            per_seed = ", ".join(f"{b:+.2f}" for b in bwt) or "-"
            wall = ", ".join(f"{r['timings']['total_s']:.0f}" for r in runs) or "-"
            lines.append(f"| {strategy} | {len(runs)} | {mean_sd(acc)} | {mean_sd(bwt, '+')} | {per_seed} | {wall} |")
        lines += ["", *verdict(found, stream)]
        cuber = found.get((stream, "cuber"), [])
        if cuber:
            summary = regime_summary(cuber, found.get((stream, "trgp"), []))
            lines += ["", "CUBER regime diagnostics (result.json `cuber_regimes`):", "", *summary]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", nargs="+", default=["rotated_fashion_mnist", "permuted_fashion_mnist"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    for strategy, example in (
        ("gpm", "'strategy.threshold=[0.999,0.9999,0.9999]'"),
        ("trgp", "strategy.trust_threshold=1"),
    ):
        parser.add_argument(
            f"--{strategy}", nargs="*", default=[], help=f"extra overrides for the {strategy} runs (probes: {example})"
        )
    parser.add_argument(
        "--cuber", nargs="*", default=[], help="extra overrides for the CUBER runs (ablations: strategy.lam=0)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep finished runs made by older strategy source (rebuild the table)"
    )
    parser.add_argument("--results-dir", type=Path, default=Path("/tmp/clbench_cuber_bwt"))
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks/results/cuber_backward_transfer.md")
    parser.add_argument(
        "--undo-probe",
        action="store_true",
        help="instead of the table: CUBER's move inside the free subspace at task 1, default lam and lam=0 (--table)",
    )
    args = parser.parse_args()
    if args.undo_probe:
        text = undo_probe(args)
        args.table.write_text(text)
        print(text)
        return
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for stream in args.streams:
        for seed in args.seeds:
            for strategy in args.strategies:
                tick = time.perf_counter()
                result = run_one(stream, strategy, seed, args)
                result = json.loads(Path(result["paths"]["result"]).read_text())  # as stored, JSON types
                found.setdefault((stream, strategy), []).append(result)
                m = result["metrics"]
                print(
                    f"{stream} {strategy} seed {seed}: ACC {m['acc']:.2f} BWT {m['bwt']:+.2f} "
                    f"({time.perf_counter() - tick:.0f} s)",
                    flush=True,
                )
    text = table(found, args, args.streams)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
