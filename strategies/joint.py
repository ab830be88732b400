"""Joint (multitask) training: the upper-bound reference trained on every task seen so far."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from clbench.models import reset_parameters
from clbench.strategy import Strategy
from clbench.streams import Task
from clbench.trainer import Trainer


class Joint(Strategy):
    """After task t the model is trained on the union of tasks 0..t (mixed batches, each sample through
    its own task's head in the task scenario). With ``reinit`` (default) each row of R is a fresh
    multitask model, the usual upper bound; without, training continues from the previous model."""

    name = "joint"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    closed_form_safe = True  # cross-entropy on the model's forward: trainer.closed_form may train it

    def __init__(self, reinit: bool = True) -> None:
        super().__init__()
        self.reinit = reinit

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.model is not None and self.stream is not None
        if self.reinit and task.id > 0:
            reset_parameters(self.model)
        trainer.fit(self, self.stream.tasks[: task.id + 1])

    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        assert self.model is not None and self.stream is not None
        if self.stream.scenario == "task":
            heads = self.model.heads.heads[: task.id + 1]
            return [*self.model.shared_parameters(), *heads.parameters()]
        return list(self.model.parameters())
