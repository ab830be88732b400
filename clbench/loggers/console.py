"""Human-readable progress on stdout: the accuracy matrix and a one-line summary."""

from __future__ import annotations

from typing import Any

import numpy as np

from clbench.loggers.base import Logger, RunInfo


def format_matrix(matrix: np.ndarray, random_init_acc: np.ndarray | None = None) -> str:
    """The accuracy matrix as aligned text, rows 'after task i', with the random-init row b on top."""
    num_tasks = matrix.shape[1]
    lines = ["acc_matrix (%)  " + " ".join(f"{'T' + str(j):>6}" for j in range(num_tasks))]
    if random_init_acc is not None:
        lines.append("random init b   " + " ".join(f"{v:6.2f}" for v in random_init_acc))
    for i, row in enumerate(matrix):
        lines.append(f"after task {i:<4} " + " ".join(f"{v:6.2f}" for v in row))
    return "\n".join(lines)


def format_summary(metrics: dict[str, float | None]) -> str:
    """``ACC 91.20% | BWT -3.10% | FWT 0.20% | forgetting 3.40%`` (whatever metrics are present); an
    undefined one (None: BWT of a single task) reads ``n/a``, never 0.00."""
    labels = {
        "acc": "ACC",
        "bwt": "BWT",
        "fwt": "FWT",
        "forgetting": "forgetting",
        "intransigence": "intransigence",
        "acc_first": "first",
        "acc_final": "final",
        "acc_mean_over_time": "mean over time",
        "accumulation_gain": "gain",
        "control_change": "control change",
    }
    parts = [
        f"{labels[k]} {'n/a' if v is None else f'{v:.2f}%'}"
        for k, v in metrics.items()
        if (v is None or isinstance(v, float)) and k in labels
    ]
    return " | ".join(parts)


class ConsoleLogger(Logger):
    """Prints a line per finished task (every ~5% of a long stream) and, at the end, the matrix (when it
    is small enough to read) and the summary.

    ``tagged`` (a sweep's jobs): each per-task line names its run (``[finetune seed 2]``), and the end is written
    as one block. Several runs print at once in a sweep (a population's members, a launcher's worker processes),
    and their lines would otherwise mix with nothing to tell whose "after task 3" a line is."""

    MAX_PRINTED_ROWS = 30

    def __init__(self, enabled: bool = True, tagged: bool = False) -> None:
        self.enabled = enabled
        self.tagged = tagged
        self.every = 1
        self.tag = ""

    def start(self, run: RunInfo) -> None:
        if self.enabled:
            self.tag = f"[{run.strategy} seed {run.seed}] " if self.tagged else ""
            self.every = 1 if run.num_tasks <= 50 else run.num_tasks // 20
            print(
                f"clbench: {run.strategy} on {run.stream} ({run.scenario} scenario, {run.num_tasks} tasks, "
                f"seed {run.seed}) -> {run.run_dir}"
            )

    def log_task(self, task_id: int, acc_matrix: np.ndarray, random_init_acc: np.ndarray) -> None:
        if not self.enabled or (task_id + 1) % self.every:
            return
        if acc_matrix.shape[0] == acc_matrix.shape[1]:
            seen = acc_matrix[task_id, : task_id + 1].mean()
            print(f"  {self.tag}after task {task_id}: mean accuracy on tasks seen so far {seen:.2f}%", flush=True)
        else:
            mean = acc_matrix[task_id].mean()
            print(f"  {self.tag}after task {task_id}: accuracy on the evaluation set {mean:.2f}%", flush=True)

    def log_control(self, task_id: int | None, accuracy: float | None) -> None:
        if not self.enabled or accuracy is None or (task_id is not None and (task_id + 1) % self.every):
            return
        when = "before training" if task_id is None else f"after task {task_id}"
        print(f"  {self.tag}control set {when}: {accuracy:.2f}%", flush=True)

    def finish(self, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        lines = []
        matrix = np.asarray(result["acc_matrix"], dtype=np.float64)
        if matrix.size and matrix.shape[0] <= self.MAX_PRINTED_ROWS and matrix.shape[0] == matrix.shape[1]:
            lines.append(format_matrix(matrix, np.asarray(result["random_init_acc"], dtype=np.float64)))
        if result["status"] == "completed":
            summary = format_summary(result["metrics"])
            lines.append(f"{result['strategy']} on {result['stream']} (seed {result['seed']}): {summary}")
        else:
            lines.append(f"{self.tag}run failed: {result.get('error')}")
        lines.append(f"result: {result['paths']['result']}")
        # one write: another process's lines cannot land inside the block (print would write the end apart)
        print("\n".join(lines) + "\n", end="", flush=True)
