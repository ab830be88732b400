"""SupSup: one learned supermask per task over fixed random weights (Wortsman et al. 2020,
"Supermasks in Superposition"; official code RAIVNLab/supsup)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from clbench.streams import Task
from clbench.trainer import Trainer
from strategies.supermasks.base import SupermaskStrategy


class SupSup(SupermaskStrategy):
    """Weights stay at their (signed-constant) initialisation; each task trains only its own score
    tensors, whose top-k (``density``) is its mask. With the task id at train and test time this is
    SupSup's GG setting; without it at test time, the task is inferred per batch (GNu, ``inference``).
    Earlier tasks' scores and the weights never change, so forgetting is zero by construction."""

    name = "supsup"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("density",)  # numeric settings members of one population may differ in

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.set_task(task.id)
        trainer.fit(self, [task])

    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        return self.score_parameters(task.id)
