"""Weights of which only chosen positions may change during a task: the rest stays bit for bit as it was.

Masking the gradient alone is not enough: momentum, weight decay and Adam's moments move a position whose
gradient is zero. So a guard masks the gradients after every backward pass (what an optimizer sees) and, after
every optimizer step, writes the frozen positions back from a copy taken when the guard was made. SPU (only the
top-scored weights of a layer train) and the supermask family's weight phase (ExSSNeT, WSN: only the weights a
task's mask selects train) both keep their weights this way. A strategy of yours can too: make a guard in
``fit_task`` and call it from ``after_backward`` and ``after_step``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class FrozenPositions:
    """``(weight, trainable)`` pairs, ``trainable`` a bool tensor of the weight's shape; the weights' values at
    creation are kept for the positions that must not change."""

    guarded: list[tuple[nn.Parameter, Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def of(cls, pairs: Iterable[tuple[nn.Parameter, Tensor]]) -> FrozenPositions:
        """A guard over ``pairs``, the weights' current values frozen outside their ``trainable`` positions."""
        return cls([(weight, trainable, weight.detach().clone()) for weight, trainable in pairs])

    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen position (call after the backward pass)."""
        for weight, trainable, _ in self.guarded:
            if weight.grad is not None:
                weight.grad.mul_(trainable)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen positions back, in place and bit for bit (call after the optimizer step)."""
        for weight, trainable, frozen in self.guarded:
            torch.where(trainable, weight, frozen, out=weight)
