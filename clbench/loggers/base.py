"""What every logger receives from the runner; the base class ignores it all (``logger=none``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RunInfo:
    """Identity of a run, known before training starts."""

    run_id: str
    run_dir: Path
    stream: str
    strategy: str
    scenario: str
    seed: int
    task_names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # runs of one sweep share it (W&B group); the stream's name for a single run
    num_tasks: int = 0  # training tasks (rows of R); task_names names the evaluation sets (columns)


class Logger:
    """A sink for run progress. Subclasses override what they record."""

    def start(self, run: RunInfo) -> None:
        """Called once before the random-init evaluation."""

    def log_task(self, task_id: int, acc_matrix: np.ndarray, random_init_acc: np.ndarray) -> None:
        """Called after task ``task_id``: ``acc_matrix`` holds rows 0..task_id (percent)."""

    def log_control(self, task_id: int | None, accuracy: float | None) -> None:
        """Called with the control-set accuracy (percent; :mod:`clbench.control`) before training (``task_id``
        None, right after ``start``) and after task ``task_id`` (right after its ``log_task``); only in runs
        with a control set. None: a resumed run's checkpoint predates the control set."""

    def finish(self, result: dict[str, Any]) -> None:
        """Called once with the final result (status ``completed`` or ``failed``)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this logger's record (kept in the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called before ``start`` when a run resumes, with what ``state_dict`` returned."""
