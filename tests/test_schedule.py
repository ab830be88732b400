"""PlateauSchedule on its own: decay after ``patience`` bad epochs, stop below ``lr_min``, restore the best."""

from __future__ import annotations

import pytest
import torch

from clbench.schedule import PlateauSchedule


def schedule_and_optimizer(**kwargs):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    settings = {"lr": 0.1, "patience": 2, "factor": 2.0, "lr_min": 0.0, "restore_best": False, **kwargs}
    return PlateauSchedule(**settings), optimizer, param


def test_a_new_best_resets_the_patience_and_bad_epochs_divide_the_lr():
    schedule, optimizer, param = schedule_and_optimizer()
    for loss in (1.0, 2.0, 0.5, 2.0):  # one bad epoch, a new best, one bad epoch: no decay yet
        assert schedule.update(loss, [param], optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert schedule.update(2.0, [param], optimizer)  # the second bad epoch in a row
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert schedule.losses == [1.0, 2.0, 0.5, 2.0, 2.0]


def test_the_fit_stops_once_the_lr_would_fall_below_lr_min_and_zero_patience_never_decays():
    schedule, optimizer, param = schedule_and_optimizer(patience=1, lr_min=0.03)
    assert schedule.update(1.0, [param], optimizer) and schedule.update(1.0, [param], optimizer)  # lr 0.05
    assert not schedule.update(1.0, [param], optimizer)  # 0.025 < 0.03
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    still, optimizer, param = schedule_and_optimizer(patience=0)
    assert all(still.update(loss, [param], optimizer) for loss in (1.0, 2.0, 3.0, 4.0))
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_puts_back_the_best_epochs_parameters_only_when_asked(restore_best):
    schedule, optimizer, param = schedule_and_optimizer(restore_best=restore_best)
    with torch.no_grad():
        for value, loss in ((1.0, 0.9), (2.0, 0.4), (3.0, 0.7)):
            param.fill_(value)
            schedule.update(loss, [param], optimizer)
    schedule.restore([param])
    assert param.tolist() == ([2.0, 2.0] if restore_best else [3.0, 3.0])
