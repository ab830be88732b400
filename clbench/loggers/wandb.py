"""Weights & Biases logging written for clbench (Avalanche's W&B logger logs matrices as histograms).

Offline by default, so a fresh machine needs no account: the run lands in ``<run_dir>/wandb`` and
``wandb sync <that dir>/offline-run-*`` uploads it later. Matrices go up as ``wandb.Table`` rows and as
annotated heatmap images, never as histograms.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from clbench.loggers.base import Logger, RunInfo

MODES = ("offline", "online", "disabled")


def matrix_table(matrix: np.ndarray, task_names: Sequence[str], row_label: str = "after_task"):
    """A wandb.Table with one row per 'after task i' and one column per task; NaN cells become None."""
    import wandb

    columns = [row_label, *[f"T{j}:{name}" for j, name in enumerate(task_names)]]
    rows = [[i, *[None if not np.isfinite(v) else float(v) for v in row]] for i, row in enumerate(matrix)]
    return wandb.Table(columns=columns, data=rows)


# the W&B runs this process opened and has not finished, by id: several are open at once in a population, and an
# interrupted run's stays open until the same run resumes (W&B refuses a second open run with one id)
_open_runs: dict[str, Any] = {}


class WandbLogger(Logger):
    """Per task: the accuracy matrix so far (a table; a heatmap too with ``heatmaps_every_task``) and the mean
    accuracy on seen tasks. At the end: summary metrics, the final matrices and the forgetting / transfer
    matrices, each as a table and a heatmap.

    A heatmap per task is off by default: the per-task table holds the same numbers, and the images grow with T
    (:mod:`clbench.heatmap` draws one in ~10 ms; through matplotlib it was ~0.2 s)."""

    def __init__(
        self,
        mode: str = "offline",
        project: str = "clbench",
        entity: str | None = None,
        group: str | None = None,  # None: the sweep (or, for one run, the stream)
        tags: Sequence[str] = (),
        heatmaps_every_task: bool = False,
        save_requirements: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown logger.mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode, self.project, self.entity, self.group, self.tags = mode, project, entity, group, list(tags)
        self.heatmaps_every_task = heatmaps_every_task
        self.save_requirements = save_requirements
        self.run = None
        self.task_names: list[str] = []
        self.run_id: str | None = None  # kept in the checkpoint: a resumed run continues the same W&B run
        self.control_before: float | None = None  # the control accuracy before training, once logged

    def start(self, run: RunInfo) -> None:
        import wandb

        self.task_names = run.task_names
        self.run_id = self.run_id or uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
        stale = _open_runs.pop(self.run_id, None)
        if stale is not None:  # an interrupted attempt of this run in this process (a notebook): close it first
            stale.finish(exit_code=1)
        self.run = wandb.init(
            id=self.run_id,
            resume="allow",
            reinit="create_new",  # several runs may be open in one process (a population's members)
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            group=self.group or run.group or run.stream,
            name=f"{run.strategy}-seed{run.seed}",
            job_type=run.strategy,
            tags=[*self.tags, run.stream, run.strategy, run.scenario],
            config=run.config,
            dir=str(run.run_dir),
            settings=wandb.Settings(
                console="off", silent=True, x_disable_stats=True, x_save_requirements=self.save_requirements
            ),
        )
        _open_runs[self.run_id] = self.run

    def _log_matrix(
        self, key: str, matrix: np.ndarray, symmetric: bool = False, heatmap: bool = True
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {f"{key}/table": matrix_table(matrix, self.task_names)}
        if heatmap:
            import wandb

            from clbench.heatmap import matrix_image

            image = matrix_image(matrix, key, cmap="RdBu" if symmetric else "viridis", symmetric=symmetric)
            payload[f"{key}/heatmap"] = wandb.Image(image)
        return payload

    def log_task(self, task_id: int, acc_matrix: np.ndarray, random_init_acc: np.ndarray) -> None:
        if self.run is None:
            return
        rows = acc_matrix[: task_id + 1]
        if acc_matrix.shape[0] != acc_matrix.shape[1]:  # long stream: a curve, not a matrix per task
            self.run.log({"acc_eval_set": float(rows[task_id].mean()), "task": task_id}, step=task_id)
            return
        payload = self._log_matrix("acc_matrix", rows, heatmap=self.heatmaps_every_task)
        payload["acc_seen"] = float(rows[task_id, : task_id + 1].mean())
        payload["acc_all"] = float(rows[task_id].mean())
        payload["task"] = task_id
        self.run.log(payload, step=task_id)

    def log_control(self, task_id: int | None, accuracy: float | None) -> None:
        """The control accuracy before training goes to the summary (``control_acc_before``); after each task
        it is logged at that task's step (``control_acc``), beside the change from before (``control_change``)."""
        if self.run is None or accuracy is None:
            return
        if task_id is None:
            self.control_before = accuracy
            self.run.summary["control_acc_before"] = accuracy
            return
        payload = {"control_acc": accuracy, "task": task_id}
        if self.control_before is not None:
            payload["control_change"] = accuracy - self.control_before
        self.run.log(payload, step=task_id)

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("wandb_run_id") or self.run_id

    def finish(self, result: dict[str, Any]) -> None:
        if self.run is None:
            return
        payload: dict[str, Any] = {}
        matrix = np.asarray(result["acc_matrix"], dtype=np.float64)
        if matrix.size:
            payload.update(self._log_matrix("final/acc_matrix", matrix))
        for name, values in result.get("matrices", {}).items():
            payload.update(self._log_matrix(f"final/{name}", np.asarray(values, dtype=np.float64), symmetric=True))
        if payload:
            self.run.log(payload, step=max(len(matrix), 1))
        self.run.summary.update({**result.get("metrics", {}), "status": result["status"]})
        self.run.finish(exit_code=0 if result["status"] == "completed" else 1)
        _open_runs.pop(self.run_id or "", None)
        self.run = None
