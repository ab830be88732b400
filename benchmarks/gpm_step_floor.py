"""How fast hand-written eager-PyTorch GPM steps, with no harness at all, run GPM's PMNIST protocol here.

``gpm_official_speed.py`` asks clbench to beat GPM's official script by a factor; this script measures
how far lean hand-written eager-PyTorch implementations go, so a missed factor can be told apart from
harness overhead (a lower bound for these implementations, not for every conceivable one: a compiled step
or cleverer algebra could go further). It times hand-written GPM training steps at the basis
ranks a real clbench run reached task by task (``basis_ranks`` in its result.json; a step's cost depends
on the shapes, not on the values), and adds the two costs no implementation avoids: starting Python with
torch and reading Fashion-MNIST, and filling R (one forward pass of every test set per row).

Three hand-written steps, each with GPM's factored projection (the weight gradient ``delta^T X`` of a
linear layer projected as ``delta^T (X - X M M^T)``, the cheapest form at batch 10):

``autograd``        the loss's gradients with respect to the three pre-activations by ``torch.autograd.grad``
                    (no weight gradient is formed twice), then the projected weight gradients and SGD.
``analytic``        forward and backward written out by hand (softmax cross-entropy, ReLU gates), no
                    autograd: the same operations as clbench's closed-form step (``trainer.closed_form``),
                    without the harness around them.
``analytic+block``  as ``analytic``, but the first layer's inputs - the data, fixed within a task - are
                    projected beforehand for blocks of 5,350 rows on all the cores (``--threads``' largest
                    count), that time included: what clbench's GPM does with ``Strategy.prepare_block``.

Protocol as ``experiment=gpm_pfmnist``: MLP 784-100-100-10 without biases, batch 10, 5 epochs of 54,000
training images per task (10 % held out), 10 tasks, 10,000 test images per task, SGD.

    python -m clbench experiment=gpm_pfmnist logger=none results_dir=/tmp/gpm   # a run to take ranks from
    python benchmarks/gpm_step_floor.py --result /tmp/gpm/permuted_fashion_mnist/gpm/*/result.json \\
        --official-s 499.0

Results go to stdout and to ``benchmarks/results/gpm_step_floor.md``. The floor leaves out GPM's
per-task basis updates (SVDs of 300-sample representations: well under a second per task) and any
logging, so it is a lower bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (784, 100, 100, 10)
TRAIN_PER_TASK, TEST_PER_TASK, BATCH, EPOCHS, LR = 54_000, 10_000, 10, 5, 0.01
Step = Callable[[Tensor, Tensor, Tensor | None], None]
VARIANTS = ("autograd", "analytic", "analytic+block")
BLOCK_ROWS = 5350  # rows per block of prepared inputs: clbench's trainer.prefetch_mb (16 MB) of 784 floats


def orthonormal(dim: int, rank: int, generator: torch.Generator) -> Tensor | None:
    if rank == 0:
        return None
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator))
    return q


def projector(basis: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``x -> x (I - M M^T)`` in its cheapest eager form: the identity without a basis, ``x - (x M) M^T``
    as one product and one fused product-and-subtract for a narrow basis, ``x - x (M M^T)`` with the square
    matrix formed once for a wide one (rank >= d / 2)."""
    if basis is None:
        return lambda x: x
    dim, rank = basis.shape
    if 2 * rank >= dim:
        square = basis @ basis.T
        return lambda x: torch.addmm(x, x, square, alpha=-1)
    transposed = basis.T.contiguous()
    return lambda x: torch.addmm(x, x @ basis, transposed, alpha=-1)


def init_weights(generator: torch.Generator, scale: float | None = None) -> list[Tensor]:
    """``[out, in]`` weights of the three layers (He scale unless ``scale`` is given)."""
    return [
        torch.randn(o, i, generator=generator) * (scale if scale is not None else (2 / i) ** 0.5)
        for i, o in itertools.pairwise(LAYERS)
    ]


def make_steps(weights: list[Tensor], bases: list[Tensor | None]) -> dict[str, tuple[Step, bool]]:
    """The hand-written GPM steps on ``weights`` (updated in place) with ``bases`` per layer, each with
    whether it reads the first layer's inputs projected per block (its third argument)."""
    w1, w2, w3 = weights
    projections = [projector(b) for b in bases]

    def autograd_step(x: Tensor, y: Tensor, _: Tensor | None) -> None:
        params = [w.requires_grad_() for w in weights]
        z1 = x @ params[0].T
        h1 = z1.relu()
        z2 = h1 @ params[1].T
        h2 = z2.relu()
        z3 = h2 @ params[2].T
        loss = torch.nn.functional.cross_entropy(z3, y)
        d1, d2, d3 = torch.autograd.grad(loss, [z1, z2, z3])
        with torch.no_grad():
            inputs = (x, h1.detach(), h2.detach())
            grads = [d.T @ p(i) for d, i, p in zip((d1, d2, d3), inputs, projections, strict=True)]
            torch._foreach_add_(weights, grads, alpha=-LR)

    minus_one = torch.full((BATCH, 1), -1.0)

    @torch.no_grad()
    def analytic_step(x: Tensor, y: Tensor, projected: Tensor | None) -> None:
        h1 = (x @ w1.T).relu_()
        h2 = (h1 @ w2.T).relu_()
        log_probs = (h2 @ w3.T).log_softmax(dim=1)
        target = y.unsqueeze(1)
        log_probs.gather(1, target).mean().neg_()  # the loss, as any step reports it
        d3 = log_probs.exp_().scatter_add_(1, target, minus_one).div_(BATCH)
        d2 = torch.ops.aten.threshold_backward(d3 @ w3, h2, 0)
        d1 = torch.ops.aten.threshold_backward(d2 @ w2, h1, 0)
        first = d1.T @ (projections[0](x) if projected is None else projected)
        grads = [first, d2.T @ projections[1](h1), d3.T @ projections[2](h2)]
        torch._foreach_add_(weights, grads, alpha=-LR)

    return {
        "autograd": (autograd_step, False),
        "analytic": (analytic_step, False),
        "analytic+block": (analytic_step, True),
    }


def time_step(
    step: Step, steps: int, generator: torch.Generator, block: Callable[[Tensor], Tensor] | None, block_threads: int
) -> float:
    """Seconds per step over ``steps`` steps on consecutive fresh batches (after 50 warm-up steps). With
    ``block``, the first layer's inputs are projected beforehand in blocks of ``BLOCK_ROWS`` rows on
    ``block_threads`` threads, and that time is added, spread over the steps it serves."""
    total = (steps + 50) * BATCH
    x = torch.randn(total, LAYERS[0], generator=generator)
    y = torch.randint(0, LAYERS[-1], (total,), generator=generator)
    projected, block_seconds = None, 0.0
    if block is not None:
        step_threads = torch.get_num_threads()
        torch.set_num_threads(block_threads)
        start = time.perf_counter()
        projected = torch.cat([block(x[a : a + BLOCK_ROWS]) for a in range(0, total, BLOCK_ROWS)])
        block_seconds = time.perf_counter() - start
        torch.set_num_threads(step_threads)
    rows = (lambda i: projected[i : i + BATCH]) if projected is not None else (lambda i: None)
    for i in range(0, 50 * BATCH, BATCH):
        step(x[i : i + BATCH], y[i : i + BATCH], rows(i))
    start = time.perf_counter()
    for i in range(50 * BATCH, total, BATCH):
        step(x[i : i + BATCH], y[i : i + BATCH], rows(i))
    return (time.perf_counter() - start) / steps + block_seconds / (total // BATCH)


def check_steps_agree(generator: torch.Generator) -> None:
    """All hand-written steps must make the same update (so the fastest is a fair floor)."""
    bases = [orthonormal(d, r, generator) for d, r in zip(LAYERS[:-1], (50, 30, 30), strict=True)]
    start = init_weights(generator, scale=0.1)
    x, y = (
        torch.randn(BATCH, LAYERS[0], generator=generator),
        torch.randint(0, LAYERS[-1], (BATCH,), generator=generator),
    )
    updated = []
    for name in ("autograd", "analytic", "analytic+block"):
        weights = [w.clone() for w in start]
        step, blocked = make_steps(weights, bases)[name]
        step(x, y, projector(bases[0])(x) if blocked else None)
        updated.append([w.detach() for w in weights])
    for other in updated[1:]:
        for a, b in zip(updated[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def evaluation_floor(num_tasks: int, weights: list[Tensor], repeats: int = 3) -> float:
    """Seconds to fill R: ``num_tasks + 1`` rows (the random-init row included), each a forward pass of
    every task's test set in 1,000-image chunks (inputs prepared once, as clbench's evaluation cache)."""
    x = torch.randn(1000, LAYERS[0])
    per_row = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(num_tasks * TEST_PER_TASK // 1000):
                ((x @ weights[0].T).relu() @ weights[1].T).relu().matmul(weights[2].T).argmax(dim=1)
            per_row.append(time.perf_counter() - start)
    return min(per_row) * (num_tasks + 1)


def startup_floor(repeats: int = 3) -> float:
    """Seconds for a process that imports torch and reads Fashion-MNIST (best of ``repeats``)."""
    code = "import torch\nfrom clbench.data.files import load_fashion_mnist\nload_fashion_mnist()"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, required=True, help="a clbench GPM result.json with basis_ranks")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per task and variant")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to time")
    parser.add_argument("--official-s", type=float, default=None, help="the official script's measured seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpm_step_floor.md")
    args = parser.parse_args()

    result = json.loads(args.result.read_text())
    ranks: list[list[int]] = result.get("basis_ranks") or []
    dims: list[int] = result.get("basis_dims") or []
    if dims != list(LAYERS[:-1]):
        raise SystemExit(f"{args.result}: not a GPM run of MLP 784-100-100-10 without biases (basis_dims {dims})")
    num_tasks = len(ranks)
    steps_per_task = math.ceil(TRAIN_PER_TASK / BATCH) * EPOCHS
    generator = torch.Generator().manual_seed(0)
    check_steps_agree(generator)
    threads = [int(t) for t in args.threads.split(",")]

    lines = [
        "# GPM's PMNIST protocol: hand-written eager-PyTorch steps with no harness, on this machine",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        f"Command: `python benchmarks/gpm_step_floor.py --result <clbench GPM result.json> --steps {args.steps}"
        + (f" --official-s {args.official_s}`" if args.official_s else "`"),
        f"Ranks from: {result.get('config', {}).get('protocol_name', '?')}, seed {result.get('seed')}; "
        f"{steps_per_task} steps per task (batch {BATCH}, {EPOCHS} epochs of {TRAIN_PER_TASK}), {num_tasks} tasks.",
        "",
        "| task | ranks projected | " + " | ".join(f"{v} {t} thr us/step" for t in threads for v in VARIANTS) + " |",
        "|---|---|" + "---|" * (len(VARIANTS) * len(threads)),
    ]
    totals: dict[tuple[str, int], float] = {}
    for task in range(num_tasks):
        during = [0, 0, 0] if task == 0 else ranks[task - 1]
        bases = [orthonormal(d, r, generator) for d, r in zip(LAYERS[:-1], during, strict=True)]
        cells = []
        for count in threads:
            torch.set_num_threads(count)
            weights = init_weights(generator)
            for name, (step, blocked) in make_steps(weights, bases).items():
                block = projector(bases[0]) if blocked and bases[0] is not None else None  # nothing to project
                seconds = time_step(step, args.steps, generator, block, max(threads))
                totals[(name, count)] = totals.get((name, count), 0.0) + seconds * steps_per_task
                cells.append(f"{seconds * 1e6:.0f}")
        lines.append(f"| {task} | {during} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    torch.set_num_threads(max(threads))
    weights = init_weights(generator)
    evaluation = evaluation_floor(num_tasks, weights)
    startup = startup_floor()
    best_name, best_threads = min(totals, key=totals.get)
    floor = totals[(best_name, best_threads)] + evaluation + startup
    lines += [
        "",
        f"Training, all {num_tasks * steps_per_task} steps: "
        + ", ".join(f"{name} {count} thr {seconds:.1f} s" for (name, count), seconds in totals.items())
        + ".",
        f"Evaluation (R, {num_tasks + 1} rows x {num_tasks} test sets, {max(threads)} threads): {evaluation:.1f} s. "
        f"Start-up (python, import torch, read Fashion-MNIST): {startup:.1f} s.",
        f"Floor, whole process: **{floor:.1f} s** ({best_name} steps, {best_threads} thread(s)).",
    ]
    if args.official_s:
        lines.append(
            f"Official script {args.official_s:.1f} s: the fastest of these implementations, with no harness at "
            f"all, would be **{args.official_s / floor:.2f}x** faster on this machine."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
