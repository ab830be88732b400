"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2018): distil the previous model's outputs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.models import ContinualModel
from clbench.strategy import Batch, Strategy
from clbench.streams import Stream, Task, TaskIds

if TYPE_CHECKING:
    from clbench.trainer import Trainer


def distillation(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(old / T) || softmax(new / T)), averaged over the batch.

    Li & Hoiem write the term as the cross-entropy of the softened old outputs against the softened new
    ones; that is this KL plus the old outputs' entropy, a constant, so the gradients are the same and the
    term is exactly 0 when the two models agree. No T^2 factor, as in Li & Hoiem and Avalanche.
    """
    old = F.softmax(old_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(new_logits / temperature, dim=1), old, reduction="batchmean")


CROSS_ENTROPY_UNITS = ("own", "all")


class LwF(Strategy):
    """loss = CE(current task) + alpha * sum over old outputs of distillation(new, old), the old model
    frozen at the end of the previous task, on the current task's inputs (no replay).

    What is distilled depends on the scenario: in the task scenario (multi-head) each old task's head
    (one term per old head, as Li & Hoiem); with a shared head (domain) its whole output; in the class
    scenario the output units of classes seen in earlier tasks only, since the others were never trained.
    Li & Hoiem's warm-up phase (training the new head alone first) is not done.

    The new task's cross-entropy (L_new in Li & Hoiem's objective, Sec. 3) is over the new task's own outputs
    (``cross_entropy="own"``): in the class scenario, over the units of the current task's classes, so
    the old classes' units are shaped by the distillation alone (as FACIL's class-incremental LwF without
    exemplars). ``cross_entropy="all"`` takes it over every output unit instead, as Avalanche's LwF does;
    there the cross-entropy pushes the old classes' logits down on the new inputs, which a softmax over the
    old units alone cannot see (it is blind to a shift shared by all of them), and on the default protocol
    the class scenario then ends 18 points below fine-tuning (docs/strategies.md). In the task and domain
    scenarios the two are the same loss: the head a task trains is all its own.
    """

    name = "lwf"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("alpha", "temperature")  # numeric settings members of one population may differ in

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, cross_entropy: str = "own") -> None:
        super().__init__()
        if alpha < 0 or temperature <= 0:
            raise ValueError(f"strategy.alpha must be >= 0 and strategy.temperature > 0, got {alpha}, {temperature}")
        if cross_entropy not in CROSS_ENTROPY_UNITS:
            raise ValueError(
                f"strategy.cross_entropy must be one of {'|'.join(CROSS_ENTROPY_UNITS)}, got {cross_entropy!r}"
            )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.cross_entropy = cross_entropy
        # class scenario, cross_entropy="own": True for the output units of the task being trained
        self.other_units: Tensor | None = None  # class scenario, cross_entropy=own: units outside the task
        self.old_model: ContinualModel | None = None
        self.old_tasks: list[int] = []
        self.seen_units: Tensor | None = None
        self._features: Tensor | None = None

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        self.seen_units = torch.zeros(stream.head_sizes[0], dtype=torch.bool, device=stream.device)
        return model

    def forward_heads(self, features: Tensor, task_ids: TaskIds) -> Tensor:
        assert self.model is not None
        # keep the features so the old heads' new outputs need no second pass through the body
        self._features = features
        return self.model.heads(features, self.head_ids(task_ids))

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.stream is not None
        if self.stream.scenario == "class" and self.cross_entropy == "own":
            self.other_units = torch.ones(self.stream.head_sizes[0], dtype=torch.bool, device=self.stream.device)
            self.other_units[torch.unique(task.train_targets)] = False  # once per task, not inverted per step
        super().fit_task(task, trainer)

    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        # other tasks' units get probability 0 in the new task's softmax, and so no gradient from it
        logits = output if self.other_units is None else output.masked_fill(self.other_units, float("-inf"))
        loss = F.cross_entropy(logits, y)
        if self.old_model is None or self.alpha == 0:
            return loss
        return loss + self.alpha * self.distillation_loss(output, batch.x)

    def distillation_loss(self, output: Tensor, x: Tensor) -> Tensor:
        """The sum of distillation terms over what the old model knew (see the class docstring)."""
        assert self.model is not None and self.old_model is not None and self.stream is not None
        with torch.no_grad():
            old_features = self.old_model.features(x)
        if self.stream.scenario == "task":
            assert self._features is not None
            terms = [
                distillation(
                    self.model.heads.heads[k](self._features),
                    self.old_model.heads.heads[k](old_features),
                    self.temperature,
                )
                for k in self.old_tasks
            ]
            return torch.stack(terms).sum()
        with torch.no_grad():
            old_output = self.old_model.heads(old_features, None)
        if self.stream.mask_absent_classes:
            # the trainer pushed the logits of classes absent from the fit to the dtype's minimum for the
            # cross-entropy (SCoLe's group masking); distil the model's own outputs, or a seen class absent now
            # makes the KL term overflow to inf
            assert self._features is not None
            output = self.model.heads(self._features, None)
        if self.stream.scenario == "class":
            assert self.seen_units is not None
            return distillation(output[:, self.seen_units], old_output[:, self.seen_units], self.temperature)
        return distillation(output, old_output, self.temperature)

    def after_task(self, task: Task) -> None:
        assert self.model is not None and self.seen_units is not None
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.old_tasks.append(task.id)
        if self.stream is not None and self.stream.scenario != "task":
            self.seen_units[torch.unique(task.train_targets)] = True
        self._features = None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "old_model": None if self.old_model is None else self.old_model.state_dict(),
            "old_tasks": list(self.old_tasks),
            "seen_units": self.seen_units,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        assert self.model is not None
        if state["old_model"] is not None:
            self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.old_model.load_state_dict(state["old_model"])
        self.old_tasks = list(state["old_tasks"])
        self.seen_units = state["seen_units"]
