"""The paper-protocol learning-rate schedule of GPM / TRGP's official code (``trainer.lr_patience``,
``lr_factor``, ``lr_min``, ``restore_best``): lr decay on a validation plateau, an early stop below a floor,
and the best epoch's parameters put back at the end of a task."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clbench.optim import SGD


@dataclass
class PlateauSchedule:
    """One fit's schedule: ``update`` takes each epoch's validation loss, ``restore`` ends the task.

    After ``patience`` epochs without a new best loss the lr is divided by ``factor``, and the fit stops
    once it falls below ``lr_min`` (``patience`` 0: the lr never changes). With ``restore_best`` the trained
    parameters of the best epoch are copied at each new best and put back by ``restore``.
    """

    lr: float
    patience: int
    factor: float
    lr_min: float
    restore_best: bool
    losses: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_state: list[Tensor] | None = None
    bad_left: int = field(init=False)

    def __post_init__(self) -> None:
        self.bad_left = self.patience

    def update(self, loss: float, trained: Sequence[Tensor], optimizer: SGD | torch.optim.Optimizer) -> bool:
        """Record an epoch's validation loss and apply the schedule; False when the fit should stop."""
        self.losses.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.bad_left = loss, self.patience
            if self.restore_best:
                self.best_state = [p.detach().clone() for p in trained]
            return True
        if self.patience == 0:
            return True
        self.bad_left -= 1
        if self.bad_left > 0:
            return True
        self.lr /= self.factor
        if self.lr < self.lr_min:
            return False
        self.bad_left = self.patience
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        return True

    @torch.no_grad()
    def restore(self, trained: Sequence[Tensor]) -> None:
        """Put back the best epoch's parameters (``restore_best``; nothing otherwise)."""
        if self.best_state is None:
            return
        for param, best in zip(trained, self.best_state, strict=True):
            param.copy_(best)
