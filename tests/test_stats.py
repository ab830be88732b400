"""Intervals, paired tests, Holm and ranks, each checked against scipy or a hand computation on made-up data."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from clbench import stats

ACC = [81.0, 84.5, 86.0, 83.0, 85.5]
BASE = [78.0, 80.0, 84.5, 79.0, 83.0]


def test_t_interval_matches_the_textbook_formula():
    interval = stats.mean_interval(ACC)
    mean, sd, n = np.mean(ACC), np.std(ACC, ddof=1), len(ACC)
    half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert interval.mean == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - half) and interval.high == pytest.approx(mean + half)
    assert interval.n == 5 and interval.sd == pytest.approx(sd)
    # t_{0.975, 4} = 2.776: the half-width is 2.776 sd / sqrt(5), by hand
    assert interval.high - interval.mean == pytest.approx(2.7764451 * sd / math.sqrt(5), rel=1e-6)


def test_bootstrap_interval_is_scipys_and_reproducible():
    interval = stats.mean_interval(ACC, method="bootstrap", seed=3)
    expected = scipy_stats.bootstrap((np.array(ACC),), np.mean, method="BCa", rng=np.random.default_rng(3))
    assert interval.low == pytest.approx(expected.confidence_interval.low)
    assert interval.high == pytest.approx(expected.confidence_interval.high)
    assert interval == stats.mean_interval(ACC, method="bootstrap", seed=3)


def test_interval_edge_cases():
    single = stats.mean_interval([70.0])
    assert single.n == 1 and single.mean == 70.0 and math.isnan(single.low) and math.isnan(single.high)
    flat = stats.mean_interval([50.0, 50.0, 50.0])
    assert (flat.low, flat.high, flat.sd) == (50.0, 50.0, 0.0)
    assert stats.mean_interval([]).n == 0
    with pytest.raises(ValueError, match="--ci"):
        stats.mean_interval(ACC, method="normal")


def test_paired_tests_match_scipy():
    result = stats.paired_comparison(ACC, BASE)
    assert result.n == 5 and result.mean_difference == pytest.approx(np.mean(np.subtract(ACC, BASE)))
    assert result.p_t == pytest.approx(scipy_stats.ttest_rel(ACC, BASE).pvalue)
    assert result.p_wilcoxon == pytest.approx(scipy_stats.wilcoxon(np.subtract(ACC, BASE)).pvalue)
    # every difference is positive: only the all-plus and all-minus flips reach the observed |mean|
    assert result.p_permutation == pytest.approx(2 / 2**5)
    assert result.p("t") == result.p_t
    with pytest.raises(ValueError, match="--test"):
        result.p("anova")


def test_exact_permutation_test_by_hand_and_against_scipy():
    a, b = [3.0, 1.0, 4.0, 1.0], [2.0, 2.0, 2.0, 2.0]  # differences 1, -1, 2, -1: mean 0.25
    flips = [abs(np.dot(signs, [1, -1, 2, -1])) / 4 for signs in itertools.product((1, -1), repeat=4)]
    by_hand = sum(f >= 0.25 for f in flips) / 16
    assert stats.permutation_test(a, b) == pytest.approx(by_hand)
    reference = scipy_stats.permutation_test(
        (np.array(a), np.array(b)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
    )
    assert stats.permutation_test(a, b) == pytest.approx(reference.pvalue)


def test_degenerate_pairs():
    assert stats.paired_t_test([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert stats.wilcoxon_test([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert math.isnan(stats.paired_t_test([1.0], [0.0]))
    assert math.isnan(stats.paired_t_test([2.0, 3.0], [1.0, 2.0]))  # a constant shift has no variance to test
    with pytest.raises(ValueError, match="same length"):
        stats.paired_comparison([1.0, 2.0], [1.0])


def test_smallest_attainable_p():
    assert stats.smallest_attainable_p("permutation", 3) == 0.25
    assert stats.smallest_attainable_p("wilcoxon", 5) == 0.0625
    assert stats.smallest_attainable_p("t", 3) == 0.0


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    adjusted = stats.holm([0.5, math.nan, 0.6])
    assert adjusted[0] == pytest.approx(1.0) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(1.0)


def test_average_ranks_over_seeds_with_ties():
    scores = {"a": {0: 90.0, 1: 80.0, 2: 85.0}, "b": {0: 70.0, 1: 80.0, 2: 95.0}, "c": {0: 60.0, 1: 50.0}}
    ranks = stats.average_ranks(scores)
    # seeds 0 and 1 only (c lacks seed 2): seed 0 ranks a1 b2 c3; seed 1 ranks a1.5 b1.5 c3
    assert ranks["a"].mean == pytest.approx(1.25) and ranks["b"].mean == pytest.approx(1.75)
    assert ranks["c"].mean == 3.0 and ranks["c"].sd == 0.0 and ranks["a"].n == 2
    assert ranks["a"].sd == pytest.approx(np.std([1.0, 1.5], ddof=1))
    lower = stats.average_ranks({"a": {0: 1.0}, "b": {0: 2.0}}, higher_is_better=False)
    assert lower["a"].mean == 1.0 and math.isnan(lower["a"].sd)
