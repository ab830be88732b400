"""Quadratic weight regularisation around an anchor: the logic EWC, online EWC, SI and MAS share.

All four methods add ``strength * sum_i importance_i * (theta_i - anchor_i)^2`` to the task loss and
differ only in how ``importance`` is estimated after a task and how it is merged with the old one
(Kirkpatrick et al. 2017; Schwarz et al. 2018; Zenke et al. 2017; Aljundi et al. 2018). A subclass
implements :meth:`QuadraticRegularizer.estimate_importance` and, where it differs from summing,
:meth:`QuadraticRegularizer.consolidate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.strategy import Batch, Strategy
from clbench.streams import Task
from clbench.trainer import Trainer

ParamDict = dict[str, Tensor]


def named_subset(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """The ``model`` parameters that are in ``params`` (what the optimizer trains), by name."""
    wanted = {id(p) for p in params}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def detached_copy(params: dict[str, nn.Parameter]) -> ParamDict:
    """A snapshot of parameter values (the anchor theta*)."""
    return {name: p.detach().clone() for name, p in params.items()}


def quadratic_penalty(params: dict[str, nn.Parameter], anchor: ParamDict, importance: ParamDict) -> Tensor:
    """``sum_i importance_i * (theta_i - anchor_i)^2`` over the parameters present in all three dicts."""
    names = [name for name in params if name in importance]
    if not names:
        return torch.zeros(())
    return torch.stack([(importance[n] * (params[n] - anchor[n]).pow(2)).sum() for n in names]).sum()


class QuadraticRegularizer(Strategy):
    """Fine-tuning plus ``strength * sum importance * (theta - anchor)^2`` for the parameters trained now.

    Importance is estimated after each task only over the parameters the strategy trained for it
    (``self.parameters(task)``: the shared body plus that task's head in the task scenario), so frozen
    heads never enter the estimate. The penalty at step time runs only over parameters that are both
    trained now and have an importance, since a frozen parameter sits at its anchor and adds a constant.
    """

    name = "quadratic"

    def __init__(self, strength: float, importance_batch_size: int | None = None) -> None:
        super().__init__()
        if strength < 0:
            raise ValueError(f"the regularisation strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.importance_batch_size = importance_batch_size
        self.anchor: ParamDict = {}
        self.importance: ParamDict = {}
        self.tasks_seen = 0
        self._trained: dict[str, nn.Parameter] = {}
        self._batch_size = 64

    # -- hooks ---------------------------------------------------------------------------------------
    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.model is not None
        self._trained = named_subset(self.model, self.parameters(task))
        self._batch_size = self.importance_batch_size or trainer.batch_size
        self.before_fit(task)
        trainer.fit(self, [task])

    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        return F.cross_entropy(output, y) + self.strength * self.penalty()

    def after_task(self, task: Task) -> None:
        assert self.model is not None
        trained = named_subset(self.model, self.parameters(task))
        was_training = self.model.training
        new_importance = self.estimate_importance(task, trained)
        self.model.train(was_training)
        self.consolidate(new_importance, detached_copy(trained))
        self.tasks_seen += 1

    # -- what a method fills in ----------------------------------------------------------------------
    def before_fit(self, task: Task) -> None:
        """Per-task set-up before training (SI starts its path integral here)."""

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        """Importance of each parameter in ``params`` for ``task`` (same shapes); called after training."""
        raise NotImplementedError

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        """Merge a finished task: by default importances add up and the anchor moves to the new weights."""
        for name, value in new_importance.items():
            self.importance[name] = self.importance[name] + value if name in self.importance else value
        self.anchor.update(new_anchor)

    # -- shared pieces -------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """The unscaled quadratic penalty over the parameters trained for the current task."""
        if not self.importance:
            return torch.zeros((), device=next(iter(self._trained.values())).device)
        return quadratic_penalty(self._trained, self.anchor, self.importance)

    def task_batches(self, task: Task) -> Iterator[tuple[Tensor, Tensor]]:
        """The task's training inputs and targets in consecutive device batches (no shuffling needed)."""
        assert self.stream is not None
        for positions, targets in zip(
            task.train_index.split(self._batch_size), task.train_targets.split(self._batch_size), strict=True
        ):
            yield self.stream.inputs("train", positions, task.id), targets

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": self.anchor,
            "importance": self.importance,
            "tasks_seen": self.tasks_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.anchor = dict(state["anchor"])
        self.importance = dict(state["importance"])
        self.tasks_seen = int(state["tasks_seen"])
