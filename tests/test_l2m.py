"""L2M metrics on hand-made matrices and learning curves, every value computed by hand in the comments."""

import math

import numpy as np
import pytest

from clbench import l2m
from clbench.l2m import LearningCurve

# R[i][j]: accuracy on task j after training task i; B: random-init accuracies (evaluation before task 0).
R = [
    [80.0, 20.0, 10.0],
    [60.0, 90.0, 40.0],
    [40.0, 45.0, 50.0],
]
B = [10.0, 10.0, 5.0]
RAW = {"normalization": "none", "smoothing": "none"}  # the formulas on raw accuracies (l2metrics' pre-processing off)


def test_performance_maintenance_averages_every_later_evaluation():
    # task 0: mean(60 - 80, 40 - 80) = -30; task 1: 45 - 90 = -45; task 2 has no later evaluation
    per_task = l2m.performance_maintenance_per_task(R)
    assert per_task[:2].tolist() == pytest.approx([-30.0, -45.0]) and math.isnan(per_task[2])
    assert l2m.performance_maintenance(R) == pytest.approx(-37.5)


def test_forward_transfer_pairs_use_the_evaluations_around_each_training_block():
    # pairs (trained a, evaluated b), a < b: before = E[a-1][b] (E[-1] = B), after = R[a][b]
    # (0,1): 10 -> 20; (0,2): 5 -> 10; (1,2): 10 -> 40
    # ratio: 2, 2, 4 -> 8/3; contrast: 10/30, 5/15, 30/50 -> (1/3 + 1/3 + 0.6) / 3
    assert l2m.forward_transfer_ratio(R, B) == pytest.approx(8 / 3)
    assert l2m.forward_transfer_contrast(R, B) == pytest.approx((1 / 3 + 1 / 3 + 0.6) / 3)


def test_backward_transfer_pairs_use_the_evaluations_around_each_training_block():
    # pairs a > b: (1,0): 80 -> 60; (2,0): 60 -> 40; (2,1): 90 -> 45
    # ratio: 0.75, 2/3, 0.5; contrast: -20/140, -20/100, -45/135
    assert l2m.backward_transfer_ratio(R) == pytest.approx((0.75 + 2 / 3 + 0.5) / 3)
    assert l2m.backward_transfer_contrast(R) == pytest.approx((-1 / 7 - 0.2 - 1 / 3) / 3)


def test_transfer_matrix_layout():
    ratio = l2m.transfer_matrix(R, B, "ratio")
    assert ratio[0, 1] == pytest.approx(2.0) and ratio[1, 2] == pytest.approx(4.0)  # forward: above the diagonal
    assert ratio[1, 0] == pytest.approx(0.75) and ratio[2, 1] == pytest.approx(0.5)  # backward: below
    assert np.isnan(np.diag(ratio)).all()
    with pytest.raises(ValueError, match="ratio"):
        l2m.transfer_matrix(R, B, "difference")


def test_zero_denominators_drop_the_pair_and_an_empty_metric_is_omitted():
    r = [
        [50.0, 0.0, 10.0],
        [50.0, 50.0, 0.0],
        [50.0, 50.0, 50.0],
    ]
    zeros = [0.0, 0.0, 0.0]
    # forward pairs: (0,1): 0 -> 0, (0,2): 0 -> 10, (1,2): 10 -> 0
    # ratio drops (0,1) and (0,2) (before = 0): only (1,2) = 0 / 10 = 0
    # contrast drops (0,1) (0 + 0): (0,2) = 10/10 = 1, (1,2) = -10/10 = -1 -> 0
    assert l2m.forward_transfer_ratio(r, zeros) == pytest.approx(0.0)
    assert l2m.forward_transfer_contrast(r, zeros) == pytest.approx(0.0)
    only_zero_before = [[50.0, 0.0], [50.0, 70.0]]
    # the single forward pair (0,1) has before = b_1 = 0: no ratio, contrast (0 - 0) / 0 also undefined
    assert l2m.forward_transfer_ratio(only_zero_before, [0.0, 0.0]) is None
    summary = l2m.summarize_l2m(only_zero_before, [0.0, 0.0], **RAW)
    assert "l2m_forward_transfer_ratio" not in summary and "l2m_forward_transfer_contrast" not in summary
    assert summary["l2m_backward_transfer_ratio"] == pytest.approx(1.0)  # (1,0): 50 -> 50


def test_single_task_has_no_l2m_metric():
    assert l2m.summarize_l2m([[90.0]], [10.0]) == {}


def test_missing_entries_are_rejected():
    with pytest.raises(ValueError, match="every task evaluated"):
        l2m.performance_maintenance([[90.0, np.nan], [80.0, 70.0]])


# -- learning curves ---------------------------------------------------------------------------------

# 4 points: too short to smooth (window int(0.8) < 3); first maximum 90 at index 2
LEARNER = [20.0, 60.0, 90.0, 90.0]
# 6 points: first maximum 90 at index 4
EXPERT = [10.0, 30.0, 50.0, 70.0, 90.0, 90.0]


def test_block_saturation_of_a_short_curve_is_its_first_maximum():
    assert l2m.block_saturation(LEARNER) == (90.0, 2)
    # experiences counted in samples: index 2 x 500 samples per point
    assert l2m.block_saturation(LearningCurve(LEARNER, samples_per_point=500)) == (90.0, 1000)


def test_long_curve_is_smoothed_before_saturation():
    # 20 points, 0, 10, ..., 90 then ten points at 100: l2metrics' window is int(0.2 * 20) = 4 and its
    # output point k is the mean of x[k-2 .. k+1], so the first all-100 window, the saturation point, is
    # k = 12 (the raw curve first reaches 100 at index 10)
    curve = [10.0 * k for k in range(10)] + [100.0] * 10
    smoothed = l2m.smooth(curve)
    assert smoothed[5] == pytest.approx((30 + 40 + 50 + 60) / 4)
    assert smoothed[11] == pytest.approx((90 + 100 + 100 + 100) / 4)
    assert l2m.block_saturation(curve) == (pytest.approx(100.0), 12)


def test_sample_efficiency_is_saturation_ratio_times_experience_ratio():
    # (90 / 90) * (4 / 2): same saturation reached in half the experience
    [result] = l2m.sample_efficiency_per_task([LEARNER], [EXPERT])
    assert result == l2m.SampleEfficiency(1.0, 2.0, 2.0)
    assert l2m.sample_efficiency([LEARNER], [EXPERT]) == pytest.approx(2.0)
    same_chunks = [LearningCurve(LEARNER, 100)], [LearningCurve(EXPERT, 100)]
    assert l2m.sample_efficiency(*same_chunks) == pytest.approx(2.0)


def test_sample_efficiency_is_zero_for_a_falling_curve_or_a_low_saturation():
    # falling: max 80 at index 1; least-squares slope of [50, 80, 40, 30] is -50 / 5 < 0
    falling = [50.0, 80.0, 40.0, 30.0]
    # low: max 15 at index 2 is below 0.2 x 90 = 18
    low = [0.0, 10.0, 15.0]
    results = l2m.sample_efficiency_per_task([falling, low], [EXPERT, EXPERT])
    assert results[0] == l2m.SampleEfficiency(pytest.approx(80 / 90), 4.0, 0.0)
    assert results[1] == l2m.SampleEfficiency(pytest.approx(15 / 90), 2.0, 0.0)


def test_sample_efficiency_omits_a_task_that_peaks_at_its_first_point():
    # [90, 80, 85] peaks at index 0 ("saturation not achieved" in l2metrics): left out of the mean
    results = l2m.sample_efficiency_per_task([LEARNER, [90.0, 80.0, 85.0]], [EXPERT, EXPERT])
    assert results[1] is None
    assert l2m.sample_efficiency([LEARNER, [90.0, 80.0, 85.0]], [EXPERT, EXPERT]) == pytest.approx(2.0)
    assert l2m.sample_efficiency([[90.0, 80.0, 85.0]], [EXPERT]) is None


def test_relative_performance_is_the_ratio_of_areas_over_the_common_length():
    # common length 4: (20 + 60 + 90 + 90) / (10 + 30 + 50 + 70) = 260 / 160
    assert l2m.relative_performance([LEARNER], [EXPERT]) == pytest.approx(1.625)
    # an expert with zero area gives no ratio for that task
    assert l2m.relative_performance([LEARNER], [[0.0, 0.0]]) is None
    with pytest.raises(ValueError, match="same samples per point"):
        l2m.relative_performance([LearningCurve(LEARNER, 10)], [LearningCurve(EXPERT, 20)])


def test_relative_final_performance_against_the_expert_accuracies():
    # diagonal (80, 90, 50) over a* = (100, 90, 100): (0.8 + 1 + 0.5) / 3
    assert l2m.relative_final_performance(R, [100.0, 90.0, 100.0]) == pytest.approx(2.3 / 3)


def test_summary_keys_follow_the_inputs_given():
    base = {
        "l2m_performance_maintenance",
        "l2m_forward_transfer_ratio",
        "l2m_forward_transfer_contrast",
        "l2m_backward_transfer_ratio",
        "l2m_backward_transfer_contrast",
    }
    assert set(l2m.summarize_l2m(R, B)) == base
    with_ste = l2m.summarize_l2m(R, B, ste_acc=[100.0, 90.0, 100.0])
    assert set(with_ste) == base | {"l2m_relative_final_performance"}
    curves = [LEARNER, LEARNER, [90.0, 80.0, 85.0]]
    full = l2m.summarize_l2m(R, B, curves=curves, ste_curves=[EXPERT] * 3, **RAW)
    assert full["l2m_sample_efficiency"] == pytest.approx(2.0)  # task 2 left out
    assert full["l2m_sample_efficiency_saturation"] == pytest.approx(1.0)
    assert full["l2m_sample_efficiency_experience"] == pytest.approx(2.0)
    # (260 + 260 + (90 + 80 + 85)) / 3 over the expert's matching areas 160, 160, 10 + 30 + 50 = 90
    assert full["l2m_relative_performance"] == pytest.approx((1.625 + 1.625 + 255 / 90) / 3)
    assert all(key.startswith("l2m_") for key in full)
    with pytest.raises(ValueError, match="one learning curve per task"):
        l2m.summarize_l2m(R, B, curves=[LEARNER], ste_curves=[EXPERT])


def test_summary_normalizes_each_task_to_1_101_by_default_as_l2metrics():
    # task 0's values: column (80, 60, 40) and b 10 -> range [10, 80]; task 1: (20, 90, 45), 10 -> [10, 90];
    # task 2: (10, 40, 50), 5 -> [5, 50]. x -> (x - min) / (max - min) * 100 + 1
    normalized = l2m.preprocess(R, B)
    scale = lambda x, low, high: (x - low) / (high - low) * 100 + 1  # noqa: E731
    expected = np.array(
        [[scale(r[0], 10, 80), scale(r[1], 10, 90), scale(r[2], 5, 50)] for r in R],
    )
    np.testing.assert_allclose(normalized.acc_matrix, expected)
    np.testing.assert_allclose(normalized.random_init_acc, [1.0, 1.0, 1.0])
    summary = l2m.summarize_l2m(R, B)
    # backward ratio pairs (1,0), (2,0), (2,1) on the normalised values, not the raw 60/80, 40/60, 45/90
    pairs = [expected[1, 0] / expected[0, 0], expected[2, 0] / expected[1, 0], expected[2, 1] / expected[1, 1]]
    assert summary["l2m_backward_transfer_ratio"] == pytest.approx(np.mean(pairs))
    assert summary["l2m_backward_transfer_ratio"] != pytest.approx(l2m.backward_transfer_ratio(R))
    # a zero b no longer drops the forward pair: the offset keeps every denominator >= 1
    assert "l2m_forward_transfer_ratio" in l2m.summarize_l2m([[50.0, 0.0], [50.0, 70.0]], [0.0, 0.0])


def test_task_range_includes_the_training_curves_and_a_constant_task_maps_to_1():
    curves = [[0.0, 100.0], [30.0, 30.0]]
    data = l2m.preprocess([[50.0, 30.0], [50.0, 30.0]], [50.0, 30.0], curves=curves, smoothing="none")
    np.testing.assert_allclose(data.acc_matrix, [[51.0, 1.0], [51.0, 1.0]])  # task 0 range [0, 100] from its curve
    np.testing.assert_allclose(data.curves[0].values, [1.0, 101.0])
    np.testing.assert_allclose(data.curves[1].values, [1.0, 1.0])


def test_training_curves_are_smoothed_before_normalising_and_evaluations_are_not():
    long_curve = [float(v) for v in np.linspace(0.0, 100.0, 20)]
    long_curve[10] = 0.0  # a dip the flat window averages away
    data = l2m.preprocess([[50.0]], [10.0], curves=[long_curve], normalization="none")
    np.testing.assert_allclose(data.curves[0].values, l2m.smooth(long_curve))
    assert data.curves[0].values[10] > 20.0
    assert data.acc_matrix[0, 0] == 50.0
    with pytest.raises(ValueError, match="normalization"):
        l2m.preprocess([[50.0]], [10.0], normalization="run")
