"""Quadratic weight regularisation around an anchor: the logic EWC, online EWC, SI and MAS share.

All four methods add ``strength * sum_i importance_i * (theta_i - anchor_i)^2`` to the task loss and
differ only in how ``importance`` is estimated after a task and how it is merged with the old one
(Kirkpatrick et al. 2017; Schwarz et al. 2018; Zenke et al. 2017; Aljundi et al. 2018). A subclass
implements :meth:`QuadraticRegularizer.estimate_importance` and, where it differs from summing,
:meth:`QuadraticRegularizer.consolidate`.

Stability under plain SGD. The penalty's curvature along weight i is ``2 * strength * importance_i``, and
an explicit gradient step of size ``lr`` on a quadratic of curvature h diverges once ``lr * h >= 2`` (with
heavy-ball momentum mu: ``lr * h >= 2 (1 + mu)``): each step then overshoots the anchor by more than it
corrects. The papers' strengths were set for small steps (MAS: lambda = 1 at SGD lr 0.0008; SI:
c = 0.1 under Adam lr 0.001), where this never happens; at the default job's SGD lr 0.1 a few weights
of MAS (at the paper's lambda 1: strength * importance up to ~23 after one task) and SI (c 0.1: up to
~10.5) cross the bound, their distance to the anchor grows by a factor |1 - 2 lr strength importance| > 1
per step, and the loss reaches inf within a task (SI's path integral then feeds the oscillation back into
the next task's importance). With
``stable_penalty`` on (the default), the strategy caps ``strength * importance`` at
``(1 + mu) / (2 lr)`` for SGD - half the bound, so a capped weight is pulled back at most onto its anchor
in one step and never oscillates - and leaves every weight below the cap untouched; under Adam / AdamW
(steps bounded by lr whatever the curvature) nothing is capped. The fraction of capped importances per
task is reported in result.json (``penalty_capped``). ``stable_penalty: false`` is the papers' plain
penalty.
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


def stiffness_limit(trainer: Trainer) -> float | None:
    """The largest ``strength * importance`` the trainer's optimizer steps through without overshooting
    the anchor: ``(1 + momentum) / (2 lr)`` for SGD (half the explicit-step stability bound on a quadratic
    of curvature 2 * strength * importance); None for Adam / AdamW, whose per-weight steps are bounded by
    lr and so cannot blow up on a stiff quadratic."""
    if trainer.optimizer != "sgd":
        return None
    return (1.0 + trainer.momentum) / (2.0 * trainer.lr)


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
    strength_key = "strength"
    """The config key of ``strength`` in a subclass's conf/strategy file, so that a bad value is named as typed."""

    def __init__(self, strength: float, importance_batch_size: int | None = None, stable_penalty: bool = True) -> None:
        super().__init__()
        if strength < 0:
            key = f"strategy.{self.strength_key}"
            raise ValueError(f"{key} must be >= 0, got {strength}: set {key} to a value >= 0")
        self.strength = float(strength)
        self.importance_batch_size = importance_batch_size
        self.stable_penalty = bool(stable_penalty)
        self.anchor: ParamDict = {}
        self.importance: ParamDict = {}
        self.tasks_seen = 0
        self.capped: list[float] = []  # per task: fraction of importances capped by stable_penalty
        self._effective: ParamDict = {}  # the importances the penalty uses during the current task
        self._trained: dict[str, nn.Parameter] = {}
        self._batch_size = 64

    # -- hooks ---------------------------------------------------------------------------------------
    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.model is not None
        self._trained = named_subset(self.model, self.parameters(task))
        self._batch_size = self.importance_batch_size or trainer.batch_size
        self._effective = self.effective_importance(stiffness_limit(trainer) if self.stable_penalty else None)
        self.before_fit(task)
        trainer.fit(self, [task])

    def effective_importance(self, limit: float | None) -> ParamDict:
        """The importances the penalty uses: ``self.importance`` with ``strength * importance`` capped at
        ``limit`` (see the module docstring); records the fraction capped for this task."""
        if limit is None or self.strength == 0 or not self.importance:
            self.capped.append(0.0)
            return dict(self.importance)
        bound = limit / self.strength
        over = sum(int((value > bound).sum()) for value in self.importance.values())
        total = sum(value.numel() for value in self.importance.values())
        self.capped.append(over / max(1, total))
        return {name: value.clamp_max(bound) for name, value in self.importance.items()}

    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        return F.cross_entropy(output, y) + self.strength * self.penalty()

    def after_task(self, task: Task) -> None:
        assert self.model is not None
        trained = named_subset(self.model, self.parameters(task))
        was_training = self.model.training
        new_importance = self.estimate_importance(task, trained)
        self.model.train(was_training)
        self.consolidate(new_importance, detached_copy(trained))
        self._effective = dict(self.importance)  # uncapped until the next fit_task knows the optimizer
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
        if not self._effective:
            return torch.zeros((), device=next(iter(self._trained.values())).device)
        return quadratic_penalty(self._trained, self.anchor, self._effective)

    def task_batches(self, task: Task) -> Iterator[tuple[Tensor, Tensor]]:
        """The task's training inputs and targets in consecutive device batches (no shuffling needed)."""
        assert self.stream is not None
        return self.stream.train_batches(task, self._batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": self.anchor,
            "importance": self.importance,
            "tasks_seen": self.tasks_seen,
            "capped": self.capped,
        }

    def extra_results(self) -> dict[str, Any]:
        return {"penalty_capped": {"stable_penalty": self.stable_penalty, "fraction_per_task": self.capped}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.anchor = dict(state["anchor"])
        self.importance = dict(state["importance"])
        self.tasks_seen = int(state["tasks_seen"])
        self.capped = list(state.get("capped", []))
        self._effective = dict(self.importance)
