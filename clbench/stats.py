"""Statistics for comparing continual-learning runs over seeds: intervals, paired tests, multiple comparisons,
average ranks.

Every function takes plain per-seed numbers and leans on scipy for the distributions, so each figure the
report prints can be re-derived with a few lines of scipy (``tests/test_stats.py`` does exactly that).

Which test when (also in the README):

* the mean's interval is Student's t (``t``): exact for normally distributed seed results, and what a reader
  expects; ``bootstrap`` (scipy's BCa bootstrap) makes no normality assumption but needs ~10 or more seeds
  to be trustworthy, and is undefined for fewer than 2 (as is t);
* the paired comparison against a baseline matches seeds (same seed, same data order and initialisation),
  which removes the seed-to-seed variance both runs share. The paired t-test assumes normal differences
  and is the only one of the three that can reach p < 0.05 with 3 seeds; the Wilcoxon signed-rank test
  and the exact paired permutation (sign-flip) test assume only symmetric differences, but their smallest
  attainable two-sided p is 2 / 2^n (0.25 at n = 3, 0.0625 at n = 5): they need n >= 6 to show anything
  at the 5 % level;
* p-values of one table are corrected together by Holm's step-down method (controls the family-wise
  error rate without assuming independence between the comparisons).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CI_METHODS = ("t", "bootstrap")
TESTS = ("t", "wilcoxon", "permutation")
EXACT_PERMUTATION_MAX_N = 20
"""Up to this many pairs the permutation test enumerates all 2^n sign flips (about a million at 20);
beyond it, it draws random flips (the p-value is then an estimate)."""


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided confidence interval (NaN bounds below 2 values) and the sample sd."""

    mean: float
    low: float
    high: float
    n: int
    sd: float


def mean_interval(
    values: Sequence[float], level: float = 0.95, method: str = "t", resamples: int = 9999, seed: int = 0
) -> Interval:
    """The mean with its ``level`` confidence interval: Student's t (mean +- t_{n-1} sd / sqrt(n)) or scipy's
    BCa bootstrap of the mean (``resamples`` draws, seeded so a report is reproducible)."""
    if method not in CI_METHODS:
        raise ValueError(f"unknown --ci {method!r}: use one of {', '.join(CI_METHODS)}")
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(data.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = float(data.std(ddof=1))
    if sd == 0.0:  # every seed agrees: the interval is the point (scipy would return NaN bounds)
        return Interval(mean, mean, mean, n, 0.0)
    if method == "t":
        low, high = scipy_stats.t.interval(level, n - 1, loc=mean, scale=sd / math.sqrt(n))
    else:
        result = scipy_stats.bootstrap(
            (data,),
            np.mean,
            confidence_level=level,
            n_resamples=resamples,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
        low, high = result.confidence_interval.low, result.confidence_interval.high
    return Interval(mean, float(low), float(high), n, sd)


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired samples need the same length, got {first.shape} and {second.shape}")
    return first - second


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of mean(a - b) = 0 (``scipy.stats.ttest_rel``); 1.0 when every pair
    agrees exactly, NaN below 2 pairs or when the differences are a non-zero constant (no variance to test)."""
    diff = _differences(a, b)
    if diff.size < 2:
        return math.nan
    if np.all(diff == 0):
        return 1.0
    if np.all(diff == diff[0]):
        return math.nan
    return float(scipy_stats.ttest_rel(a, b).pvalue)


def wilcoxon_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test on a - b (``scipy.stats.wilcoxon``, exact distribution for
    small n without ties, zero differences dropped as Wilcoxon did); 1.0 when every pair agrees."""
    diff = _differences(a, b)
    if diff.size < 1:
        return math.nan
    if np.all(diff == 0):
        return 1.0
    return float(scipy_stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)


def permutation_test(a: Sequence[float], b: Sequence[float], resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of the paired permutation test: under the null each pair's sign is exchangeable, so p is the
    share of the 2^n sign flips of the differences whose |mean| is at least the observed |mean| (the observed
    one included). Exact (all flips enumerated) up to ``EXACT_PERMUTATION_MAX_N`` pairs, else ``resamples``
    random flips with the +1 correction of Phipson & Smyth (2010)."""
    diff = _differences(a, b)
    n = diff.size
    if n < 1:
        return math.nan
    observed = abs(diff.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(diff).max()))  # flips equal to the observed up to rounding count
    if n <= EXACT_PERMUTATION_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ diff) / n
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ diff) / n >= observed - tolerance))
    return (hits + 1) / (resamples + 1)


def smallest_attainable_p(test: str, n: int) -> float:
    """The smallest two-sided p ``test`` can give with ``n`` pairs: 2 / 2^n for the rank and permutation tests
    (all signs alike), 0 for the t-test. A table with 3 seeds cannot show significance with the former."""
    if test not in TESTS:
        raise ValueError(f"unknown --test {test!r}: use one of {', '.join(TESTS)}")
    return 0.0 if test == "t" else min(1.0, 2.0 / 2.0**n) if n > 0 else 1.0


@dataclass(frozen=True)
class PairedComparison:
    """A strategy's per-seed values against the baseline's on the same seeds."""

    n: int
    mean_difference: float
    p_t: float
    p_wilcoxon: float
    p_permutation: float

    def p(self, test: str) -> float:
        """The p-value of ``test`` (one of :data:`TESTS`)."""
        if test not in TESTS:
            raise ValueError(f"unknown --test {test!r}: use one of {', '.join(TESTS)}")
        return {"t": self.p_t, "wilcoxon": self.p_wilcoxon, "permutation": self.p_permutation}[test]


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """All three paired tests of ``a`` against ``b`` (same seeds, same order)."""
    diff = _differences(a, b)
    return PairedComparison(
        n=int(diff.size),
        mean_difference=float(diff.mean()) if diff.size else math.nan,
        p_t=paired_t_test(a, b),
        p_wilcoxon=wilcoxon_test(a, b),
        p_permutation=permutation_test(a, b),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): sort the m p-values ascending, multiply the k-th
    (0-based) by m - k, take the running maximum and cap at 1. NaN entries are left out of m and stay NaN."""
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(values))
    m = present.size
    running = 0.0
    for k, position in enumerate(present[np.argsort(values[present], kind="stable")]):
        running = max(running, min(1.0, (m - k) * values[position]))
        adjusted[position] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class Rank:
    """A strategy's rank among the strategies of one protocol: mean over seeds (1 = best) and its sample sd."""

    mean: float
    sd: float
    n: int


def average_ranks(scores: dict[str, dict[int, float]], higher_is_better: bool = True) -> dict[str, Rank]:
    """Per seed present for every strategy, rank the strategies by score (ties share the mean rank,
    ``scipy.stats.rankdata``), then average each strategy's rank over those seeds (Demsar 2006 ranks over
    data sets; here over seeds of one protocol). Strategies or seeds with gaps are left out of the seeds used."""
    if not scores:
        return {}
    common = sorted(set.intersection(*(set(per_seed) for per_seed in scores.values())))
    names = sorted(scores)
    if not common:
        return {name: Rank(math.nan, math.nan, 0) for name in names}
    table = np.array([[scores[name][seed] for name in names] for seed in common], dtype=np.float64)
    ranks = scipy_stats.rankdata(-table if higher_is_better else table, axis=1)
    return {
        name: Rank(
            float(ranks[:, k].mean()), float(ranks[:, k].std(ddof=1)) if len(common) > 1 else math.nan, len(common)
        )
        for k, name in enumerate(names)
    }
