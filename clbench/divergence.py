"""Stopping a fit whose training loss diverged (``trainer.nan_checks_per_epoch``).

The step loop writes each step's loss into a device-side buffer and never reads it back per step: a host
read would make every step wait for the device (on a GPU it also breaks the asynchrony CUDA graphs rely
on). Instead the buffer is checked a few times per epoch, one host read each, and the first non-finite
loss stops the run with a message naming task, epoch and step, so that a diverging regulariser costs a
fraction of an epoch rather than the rest of the run, and the finished tasks keep their results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from clbench.streams import Task


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class FiniteLossCheck:
    """When an epoch of ``steps`` steps checks its losses: about ``checks_per_epoch`` times, evenly spaced,
    and always after its last step (so no epoch ends unchecked)."""

    steps: int
    checks_per_epoch: int
    every: int = field(init=False)

    def __post_init__(self) -> None:
        self.every = max(1, self.steps // max(1, self.checks_per_epoch))

    def due(self, step: int) -> bool:
        """Whether the losses are checked after ``step`` (0-based)."""
        return (step + 1) % self.every == 0 or step + 1 == self.steps


def check_finite(step_losses: Tensor, task: Task, epoch: int, bar: tqdm) -> None:
    """Raise :class:`NonFiniteLossError` at the first NaN / inf in ``step_losses`` (the epoch's steps so
    far), naming task, epoch and step; closes the progress bar first so the message is not drawn over."""
    finite = torch.isfinite(step_losses)
    if bool(finite.all()):
        return
    step = int((~finite).nonzero()[0])
    bar.close()
    raise NonFiniteLossError(
        f"training loss became {float(step_losses[step])} in task {task.id} epoch {epoch} step {step}: "
        "lower trainer.lr or check the strategy's regularisation strength"
    )
