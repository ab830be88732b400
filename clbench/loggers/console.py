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


def format_summary(metrics: dict[str, float]) -> str:
    """``ACC 91.20% | BWT -3.10% | FWT 0.20% | forgetting 3.40%`` (whatever metrics are present)."""
    labels = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "intransigence": "intransigence"}
    parts = [f"{labels.get(k, k)} {v:.2f}%" for k, v in metrics.items() if isinstance(v, float) and k in labels]
    return " | ".join(parts)


class ConsoleLogger(Logger):
    """Prints one line per finished task and, at the end, the matrix and the summary."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def start(self, run: RunInfo) -> None:
        if self.enabled:
            print(
                f"clbench: {run.strategy} on {run.stream} ({run.scenario} scenario, {len(run.task_names)} tasks, "
                f"seed {run.seed}) -> {run.run_dir}"
            )

    def log_task(self, task_id: int, acc_matrix: np.ndarray, random_init_acc: np.ndarray) -> None:
        if self.enabled:
            seen = acc_matrix[task_id, : task_id + 1]
            print(f"  after task {task_id}: mean accuracy on tasks seen so far {seen.mean():.2f}%")

    def finish(self, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        matrix = np.asarray(result["acc_matrix"], dtype=np.float64)
        if matrix.size:
            print(format_matrix(matrix, np.asarray(result["random_init_acc"], dtype=np.float64)))
        if result["status"] == "completed":
            summary = format_summary(result["metrics"])
            print(f"{result['strategy']} on {result['stream']} (seed {result['seed']}): {summary}")
        else:
            print(f"run failed: {result.get('error')}")
        print(f"result: {result['paths']['result']}")
