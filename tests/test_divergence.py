"""NaN checks: a few per epoch, always after the last step, and the error names the first bad step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clbench.divergence import FiniteLossCheck, NonFiniteLossError, check_finite


@pytest.mark.parametrize(
    ("steps", "checks", "due"),
    [
        (23, 10, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 22]),  # every 23 // 10 = 2 steps, and the last
        (23, 0, [22]),  # 0 checks: the epoch's end only
        (3, 10, [0, 1, 2]),  # more checks than steps: after every step
    ],
)
def test_checks_are_evenly_spaced_and_end_every_epoch(steps, checks, due):
    check = FiniteLossCheck(steps, checks)
    assert [step for step in range(steps) if check.due(step)] == due


class Bar:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_the_first_non_finite_loss_is_named_and_the_bar_closed():
    bar = Bar()
    check_finite(torch.tensor([0.5, 0.25]), SimpleNamespace(id=4), 2, bar)
    assert not bar.closed
    with pytest.raises(NonFiniteLossError, match=r"became inf in task 4 epoch 2 step 1: lower trainer\.lr"):
        check_finite(torch.tensor([0.5, float("inf"), float("nan")]), SimpleNamespace(id=4), 2, bar)
    assert bar.closed


def test_the_error_is_importable_from_the_trainer():
    from clbench.trainer import NonFiniteLossError as from_trainer

    assert from_trainer is NonFiniteLossError and issubclass(NonFiniteLossError, FloatingPointError)
