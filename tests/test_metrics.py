"""Metrics on hand-made matrices whose values are computed by hand in the comments."""

import math

import numpy as np
import pytest

from clbench import metrics

# R[i][j]: accuracy on task j after training task i.
R = [
    [90.0, 10.0, 20.0],
    [80.0, 85.0, 30.0],
    [70.0, 75.0, 95.0],
]
B = [10.0, 12.0, 15.0]


def test_acc_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((70 + 75 + 95) / 3)


def test_bwt_last_row_minus_diagonal():
    # ((70 - 90) + (75 - 85)) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-15.0)


def test_fwt_uses_random_init_baseline():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((10 - 12) + (30 - 15)) / 2
    assert metrics.forward_transfer(R, B) == pytest.approx(6.5)


def test_forgetting_takes_best_earlier_accuracy_not_diagonal():
    # task 0 peaks after task 1 (backward transfer), then drops: f_0 = 60 - 55 = 5 while R[2][0] - R[0][0] = +5
    r = [[50.0, 0.0, 0.0], [60.0, 80.0, 0.0], [55.0, 70.0, 90.0]]
    assert metrics.forgetting(r) == pytest.approx(((60 - 55) + (80 - 70)) / 2)
    assert metrics.backward_transfer(r) == pytest.approx(((55 - 50) + (70 - 80)) / 2)


def test_forgetting_matrix_entries():
    f = metrics.forgetting_matrix(R)
    assert f[1, 0] == pytest.approx(90 - 80)
    assert f[2, 0] == pytest.approx(90 - 70)
    assert f[2, 1] == pytest.approx(85 - 75)
    assert np.isnan(f[0, 0]) and np.isnan(f[0, 1]) and np.isnan(f[1, 2])
    assert metrics.forgetting(R) == pytest.approx((20 + 10) / 2)


def test_intransigence_against_reference():
    # mean(95 - 90, 90 - 85, 96 - 95)
    assert metrics.intransigence(R, [95.0, 90.0, 96.0]) == pytest.approx(11 / 3)


def test_joint_reference_is_the_diagonal_of_the_joint_run():
    # Chaudhry et al. 2018: a*_k is the model trained jointly on tasks 0..k, i.e. row k of a joint run, on task k
    joint = [[96.0, 10.0, 11.0], [94.0, 91.0, 12.0], [93.0, 90.0, 97.0]]
    assert metrics.joint_reference(joint) == [96.0, 91.0, 97.0]
    assert metrics.intransigence(R, metrics.joint_reference(joint)) == pytest.approx((6 + 6 + 2) / 3)


def test_transfer_matrices():
    bt = metrics.backward_transfer_matrix(R)
    ft = metrics.forward_transfer_matrix(R, B)
    assert bt[2, 0] == pytest.approx(-20.0) and bt[1, 0] == pytest.approx(-10.0) and bt[2, 1] == pytest.approx(-10.0)
    assert ft[0, 1] == pytest.approx(-2.0) and ft[0, 2] == pytest.approx(5.0) and ft[1, 2] == pytest.approx(15.0)
    assert np.isnan(bt[0, 1]) and np.isnan(ft[1, 0]) and np.isnan(ft[1, 1])


def test_single_task_has_zero_transfer():
    assert metrics.backward_transfer([[80.0]]) == 0.0
    assert metrics.forward_transfer([[80.0]], [10.0]) == 0.0
    assert metrics.forgetting([[80.0]]) == 0.0


def test_summarize_omits_intransigence_without_reference():
    summary = metrics.summarize(R, B)
    assert set(summary) == {"acc", "bwt", "fwt", "forgetting"}
    assert math.isclose(metrics.summarize(R, B, [95.0, 90.0, 96.0])["intransigence"], 11 / 3)
    both = metrics.summarize(R, B, [96.0, 91.0, 97.0], single_task_acc=[95.0, 90.0, 96.0])
    assert both["intransigence"] == pytest.approx(14 / 3) and both["intransigence_single_task"] == pytest.approx(11 / 3)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [[1.0], [2.0]]])
def test_non_square_matrix_is_rejected(bad):
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy(bad)


def test_baseline_length_is_checked():
    with pytest.raises(ValueError, match="random_init_acc"):
        metrics.forward_transfer(R, [1.0, 2.0])
