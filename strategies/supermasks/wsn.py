"""WSN: Winning SubNetworks, weights and per-task top-c% masks learned jointly (Kang et al. 2022,
"Forget-free Continual Learning with Winning Subnetworks"; official code ihaeyong/WSN)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from clbench.streams import Task
from clbench.trainer import Trainer
from strategies.supermasks.base import SupermaskStrategy


class WSN(SupermaskStrategy):
    """One score per weight shared by all tasks (the official ``w_m``); a task's mask is the top
    ``density`` (the paper's capacity c) of the absolute scores, trained with a straight-through
    gradient together with the weights. Weights any earlier task's mask selected receive no update
    (WSN zeroes their gradients; clbench also restores them after each step), so earlier tasks never
    change. Per-task heads are dense, as WSN's task-specific classifiers."""

    name = "wsn"
    score_layout = "shared"
    private_density = 1.0

    def __init__(self, density: float = 0.5, weight_init: str = "default", **kwargs: Any) -> None:
        super().__init__(density=density, weight_init=weight_init, **kwargs)

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.set_task(task.id)
        free = {layer: ~layer.used for layer in self.task_layers(task.id)}
        with self.weight_phase(free):
            trainer.fit(self, [task])

    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        return [*self.weight_parameters(task.id), *self.score_parameters(task.id)]
