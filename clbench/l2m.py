"""L2M lifelong-learning metrics as pure functions of the accuracy matrix and learning curves.

New et al., 2023, "A Domain-Agnostic Approach for Characterization of Lifelong Learning Systems" (the
L2M metrics specification, arXiv:2201.08278), computed as its reference implementation
lifelong-learning-systems/l2metrics (v3.1, commit 5df0731) computes them, adapted to clbench's protocol.

clbench's protocol in l2metrics' vocabulary: an evaluation block on every task before any training (the
random-init row ``b``), then for each task ``i`` one training block on task ``i`` followed by an
evaluation block on every task (row ``R[i]``). Every task is trained in exactly one block. Write
``E[-1][j] = b_j`` and ``E[i][j] = R[i][j]`` (percent) for the evaluation of task ``j`` in the block after
training task ``i``; ``T`` tasks. The metrics, each the "lifetime" value l2metrics reports with its
default ``aggregation_method="mean"``:

* Performance maintenance (``performance_maintenance.py``, default method ``mrlep``: most recent
  learning evaluation performance). Per task ``PM_j = mean_{i>j} (R[i][j] - R[j][j])``, the change of every
  later evaluation against the evaluation right after learning ``j``; tasks with no later evaluation
  (``j = T-1``) have none. ``PM = mean_{j<T-1} PM_j``.
* Forward and backward transfer (``transfer.py``). For an ordered pair (trained task ``a``, evaluated task
  ``b``, ``a != b``) the "before" and "after" values are the evaluations of ``b`` in the evaluation blocks
  immediately before and after the training block of ``a``: ``before = E[a-1][b]``, ``after = E[a][b]``.
  The pair counts as forward transfer when ``a`` is trained before ``b`` is first trained (``a < b``) and
  as backward transfer when after (``a > b``). Ratio form ``after / before``; contrast form
  ``(after - before) / (after + before)``, in [-1, 1]. ``FT = mean over the T(T-1)/2 pairs a < b``,
  ``BT = mean over the T(T-1)/2 pairs a > b`` (every pair weighs the same, as in l2metrics' lifetime
  aggregation over task pairs). Division by zero: a pair whose denominator (``before`` for the ratio,
  ``after + before`` for the contrast) is 0 is left out, as l2metrics leaves it out; if no pair is left
  the metric is undefined and omitted.
* Performance relative to single-task experts (``ste_relative_performance.py``, ``ste_averaging_method``
  ``"metrics"`` with one STE run). Per task ``RP_j = sum_{k<n} c_j[k] / sum_{k<n} s_j[k]`` with ``c_j`` the
  lifelong learner's training curve on task ``j``, ``s_j`` the STE's, both truncated to their common
  length ``n``: a ratio of areas under the learning curves. ``RP = mean_j RP_j``; a task whose STE area is
  0 is left out (l2metrics would divide by zero).
* Sample efficiency (``sample_efficiency.py`` with ``get_block_saturation_perf`` in ``_localutil.py``).
  A curve is smoothed by l2metrics' flat moving average (window ``min(int(0.2 n), 100)``, no smoothing when
  the window is below 3, i.e. for curves shorter than 15 points); the saturation value ``sat`` is the
  maximum of the smoothed curve and the experience to saturation ``e`` is the index of its first maximum
  (counted in samples here: index times the samples per point). Per task, with the learner's ``(sat_L,
  e_L)`` and the STE's ``(sat_S, e_S)``: ``SE_j = (sat_L / sat_S) * (e_S / e_L)``, set to 0 when
  ``sat_L < 0.2 sat_S`` or the least-squares slope of the learner's raw curve is negative; a task is left
  out when ``e_L = 0`` or ``e_S = 0`` (l2metrics: "saturation not achieved", the maximum is the first
  point) or ``sat_S = 0``. ``SE = mean_j SE_j``; its two factors are reported as well.

Pre-processing, as l2metrics' ``MetricsReport`` does it before any metric (both on by default, as there):

1. Smoothing (``smoothing="flat"``, l2metrics' ``smoothing_method="flat"``): every training curve, the
   learner's and the STE's, goes through :func:`smooth`; evaluation values are not smoothed
   (``do_smooth_eval_data=False``). Curves shorter than 15 points are unchanged by it.
2. Per-task normalisation (``normalization="task"``, l2metrics' ``normalization_method="task"``, scale
   100, offset 1): every value of task j - its column of R, ``b_j``, its (smoothed) training curve and the
   STE's - becomes ``(x - min_j) / (max_j - min_j) * 100 + 1``, with min_j / max_j over those values
   (l2metrics' data range: the task's log data and its STE training data); a task whose values are all
   equal becomes 1 everywhere. The ratio metrics (transfer ratios, relative performance, sample
   efficiency) then match what l2metrics prints; the offset keeps their denominators away from 0.

``normalization="none"`` / ``smoothing="none"`` give the metrics on clbench's raw 0-100 accuracies. The
normalisation divides by each run's own data range, so a strategy's ratio metrics are not comparable
with another run's on the same absolute scale; the raw form is kept for that. ``relative_final_performance``
(a clbench addition) is always computed on raw accuracies: a*_j is no part of l2metrics' data range.

How these differ from clbench's own metrics (``clbench/metrics.py``): BWT there is
``mean_j (R[T-1][j] - R[j][j])``, a difference between the last evaluation and the one right after
learning; L2M performance maintenance averages that difference over every later evaluation, and L2M
backward transfer looks at each single training block's effect (``R[a][b]`` against ``R[a-1][b]``) as a
ratio or contrast. The differences of L2M's pairs telescope to clbench's: ``sum_{a>b} (R[a][b] - R[a-1][b])
= R[T-1][b] - R[b][b]`` and ``sum_{a<b} (R[a][b] - R[a-1][b]) = R[b-1][b] - b_b``, clbench's FWT term for
task ``b``; the ratio and contrast forms and the equal weight per pair make the L2M numbers different.
L2M relative performance and sample efficiency compare learning curves with a single-task expert, where
clbench's intransigence compares final accuracies ``a*_j - R[j][j]``; ``relative_final_performance`` is
that evaluation-based analogue, ``mean_j R[j][j] / a*_j``, a clbench addition, not an l2metrics metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = np.ndarray | Sequence[Sequence[float]]

SATURATION_FLOOR = 0.2
"""l2metrics sets sample efficiency to 0 when the learner saturates below this fraction of the STE."""
NORMALIZATIONS = ("task", "none")
SMOOTHINGS = ("flat", "none")
NORMALIZED_SCALE = 100.0
NORMALIZED_OFFSET = 1.0
"""l2metrics' Normalizer defaults: a task's range maps onto [offset, offset + scale] = [1, 101]."""


@dataclass(frozen=True)
class LearningCurve:
    """Training accuracies in percent for one task, one point per epoch (or chunk) of training.

    ``samples_per_point`` is how many training samples one point stands for; it turns l2metrics'
    experience counts into sample counts and must match between curves that are compared point by point.
    """

    values: Sequence[float]
    samples_per_point: int = 1

    def __post_init__(self) -> None:
        if self.samples_per_point < 1:
            raise ValueError(f"samples_per_point must be >= 1, got {self.samples_per_point}")


CurveLike = LearningCurve | Sequence[float]


def _curve(curve: CurveLike) -> LearningCurve:
    return curve if isinstance(curve, LearningCurve) else LearningCurve(list(curve))


def _curve_values(curve: LearningCurve) -> np.ndarray:
    values = np.asarray(curve.values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"a learning curve must be a non-empty list of finite accuracies, got {curve.values!r}")
    return values


def _square(acc_matrix: ArrayLike) -> np.ndarray:
    matrix = np.asarray(acc_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square T x T matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("acc_matrix has missing entries: L2M metrics need every task evaluated after every task")
    return matrix


def _mean_or_none(values: Sequence[float] | np.ndarray) -> float | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else None


# -- evaluation-block metrics ------------------------------------------------------------------------


def performance_maintenance_per_task(acc_matrix: ArrayLike) -> np.ndarray:
    """PM_j = mean_{i>j} (R[i][j] - R[j][j]); NaN for the last task (l2metrics ``mrlep``, New et al. 2023)."""
    matrix = _square(acc_matrix)
    num_tasks = matrix.shape[0]
    result = np.full(num_tasks, np.nan)
    for j in range(num_tasks - 1):
        result[j] = np.mean(matrix[j + 1 :, j] - matrix[j, j])
    return result


def performance_maintenance(acc_matrix: ArrayLike) -> float | None:
    """PM = mean over tasks j < T-1 of PM_j (New et al. 2023); None for a single task."""
    return _mean_or_none(performance_maintenance_per_task(acc_matrix))


def _before_after(acc_matrix: ArrayLike, random_init_acc: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Evaluations of every task in the block before (E[a-1]) and after (E[a]) training task a."""
    matrix = _square(acc_matrix)
    num_tasks = matrix.shape[0]
    if random_init_acc is None:
        first = np.full(num_tasks, np.nan)
    else:
        first = np.asarray(random_init_acc, dtype=np.float64)
        if first.shape != (num_tasks,):
            raise ValueError(f"random_init_acc must have {num_tasks} entries, got shape {first.shape}")
    before = np.vstack([first[None, :], matrix[:-1]])
    return before, matrix


def transfer_matrix(acc_matrix: ArrayLike, random_init_acc: Sequence[float] | None, form: str) -> np.ndarray:
    """L2M transfer of training task a on task b at [a][b]: ratio E[a][b] / E[a-1][b] or contrast
    (E[a][b] - E[a-1][b]) / (E[a][b] + E[a-1][b]), with E[-1] = b (l2metrics ``transfer.py``).

    Above the diagonal (a < b) it is forward transfer, below (a > b) backward transfer; the diagonal and
    pairs with a zero denominator are NaN. Without ``random_init_acc`` row 0 is NaN: there is no
    evaluation before the first training block.
    """
    if form not in ("ratio", "contrast"):
        raise ValueError(f"form must be 'ratio' or 'contrast', got {form!r}")
    before, after = _before_after(acc_matrix, random_init_acc)
    denominator = before if form == "ratio" else after + before
    numerator = after if form == "ratio" else after - before
    result = np.full_like(after, np.nan)
    defined = np.isfinite(denominator) & (denominator != 0)
    np.fill_diagonal(defined, False)
    result[defined] = numerator[defined] / denominator[defined]
    return result


def forward_transfer_ratio(acc_matrix: ArrayLike, random_init_acc: Sequence[float]) -> float | None:
    """FT ratio = mean_{a<b} R[a][b] / R[a-1][b], R[-1] = b (New et al. 2023); None if no pair is defined."""
    return _mean_or_none(transfer_matrix(acc_matrix, random_init_acc, "ratio")[np.triu_indices(len(acc_matrix), 1)])


def forward_transfer_contrast(acc_matrix: ArrayLike, random_init_acc: Sequence[float]) -> float | None:
    """FT contrast = mean_{a<b} (R[a][b] - R[a-1][b]) / (R[a][b] + R[a-1][b]), R[-1] = b (New et al. 2023)."""
    matrix = transfer_matrix(acc_matrix, random_init_acc, "contrast")
    return _mean_or_none(matrix[np.triu_indices(len(matrix), 1)])


def backward_transfer_ratio(acc_matrix: ArrayLike) -> float | None:
    """BT ratio = mean_{a>b} R[a][b] / R[a-1][b] (New et al. 2023); None if no pair is defined."""
    matrix = transfer_matrix(acc_matrix, None, "ratio")
    return _mean_or_none(matrix[np.tril_indices(len(matrix), -1)])


def backward_transfer_contrast(acc_matrix: ArrayLike) -> float | None:
    """BT contrast = mean_{a>b} (R[a][b] - R[a-1][b]) / (R[a][b] + R[a-1][b]) (New et al. 2023)."""
    matrix = transfer_matrix(acc_matrix, None, "contrast")
    return _mean_or_none(matrix[np.tril_indices(len(matrix), -1)])


def relative_final_performance(acc_matrix: ArrayLike, ste_acc: Sequence[float]) -> float | None:
    """mean_j R[j][j] / a*_j: accuracy right after learning each task relative to its single-task expert.

    A clbench analogue of L2M's relative performance for runs without learning curves, not an l2metrics
    metric; tasks with a*_j = 0 are left out.
    """
    matrix = _square(acc_matrix)
    expert = np.asarray(ste_acc, dtype=np.float64)
    if expert.shape != (matrix.shape[0],):
        raise ValueError(f"ste_acc must have {matrix.shape[0]} entries, got shape {expert.shape}")
    defined = expert != 0
    return _mean_or_none(np.diag(matrix)[defined] / expert[defined])


# -- learning-curve metrics --------------------------------------------------------------------------


def _paired(curves: Sequence[CurveLike], ste_curves: Sequence[CurveLike]) -> list[tuple[LearningCurve, LearningCurve]]:
    if len(curves) != len(ste_curves):
        raise ValueError(f"need one STE curve per task: got {len(curves)} curves and {len(ste_curves)} STE curves")
    return [(_curve(c), _curve(s)) for c, s in zip(curves, ste_curves, strict=True)]


def relative_performance_per_task(curves: Sequence[CurveLike], ste_curves: Sequence[CurveLike]) -> np.ndarray:
    """RP_j = sum(c_j[:n]) / sum(s_j[:n]), n the common length (l2metrics ``ste_relative_performance.py``).

    NaN where the STE's area is 0. Both curves of a task must have the same samples per point, so that
    truncating to the common number of points compares the same amount of training.
    """
    result = []
    for curve, ste_curve in _paired(curves, ste_curves):
        if curve.samples_per_point != ste_curve.samples_per_point:
            raise ValueError(
                "relative performance compares curves point by point: record the learner's and the STE's curves "
                f"with the same samples per point (got {curve.samples_per_point} and {ste_curve.samples_per_point})"
            )
        values, ste_values = _curve_values(curve), _curve_values(ste_curve)
        common = min(values.size, ste_values.size)
        ste_area = ste_values[:common].sum()
        result.append(values[:common].sum() / ste_area if ste_area != 0 else math.nan)
    return np.asarray(result, dtype=np.float64)


def relative_performance(curves: Sequence[CurveLike], ste_curves: Sequence[CurveLike]) -> float | None:
    """RP = mean_j RP_j: area under the learning curve relative to the single-task expert's (New et al. 2023)."""
    return _mean_or_none(relative_performance_per_task(curves, ste_curves))


def smooth(values: Sequence[float]) -> np.ndarray:
    """l2metrics' flat moving average (``_localutil.smooth`` with its default window), same length as input.

    The window is ``min(int(0.2 n), 100)``; below 3 the curve is returned unchanged. The ends are padded
    with reflections and the output is cut as l2metrics cuts it, which for an odd window centres point k's
    average on k+1 near the start; kept as is so saturation indices match l2metrics'.
    """
    x = np.asarray(values, dtype=np.float64)
    window = min(int(x.size * 0.2), 100)
    if window < 3:
        return x
    padded = np.concatenate([x[window - 1 : 0 : -1], x, x[-2 : -window - 1 : -1]])
    averaged = np.convolve(np.full(window, 1.0 / window), padded, mode="valid")
    return averaged[int(np.floor(window / 2 - 1)) : -int(np.ceil(window / 2))]


def block_saturation(curve: CurveLike) -> tuple[float, int]:
    """Saturation value and experience to saturation of one curve (l2metrics ``get_block_saturation_perf``).

    The saturation value is the maximum of the smoothed curve; the experience to saturation is the index of
    its first maximum times ``samples_per_point`` (0 when the curve peaks at its first point).
    """
    curve = _curve(curve)
    smoothed = smooth(_curve_values(curve))
    saturation = float(smoothed.max())
    return saturation, int(np.flatnonzero(smoothed == saturation)[0]) * curve.samples_per_point


@dataclass(frozen=True)
class SampleEfficiency:
    """One task's sample efficiency and its two factors, as l2metrics reports them."""

    saturation_ratio: float
    experience_ratio: float
    sample_efficiency: float


def sample_efficiency_per_task(
    curves: Sequence[CurveLike], ste_curves: Sequence[CurveLike]
) -> list[SampleEfficiency | None]:
    """SE_j = (sat_L / sat_S) * (e_S / e_L), 0 if sat_L < 0.2 sat_S or the learner's curve slopes down;
    None where undefined: e_L = 0, e_S = 0 or sat_S = 0 (l2metrics ``sample_efficiency.py``)."""
    result: list[SampleEfficiency | None] = []
    for curve, ste_curve in _paired(curves, ste_curves):
        values = _curve_values(curve)
        saturation, to_saturation = block_saturation(curve)
        ste_saturation, ste_to_saturation = block_saturation(ste_curve)
        if to_saturation == 0 or ste_to_saturation == 0 or ste_saturation == 0:
            result.append(None)
            continue
        # l2metrics fits the slope against the experience number; its sign does not depend on the unit.
        slope = np.polyfit(np.arange(values.size), values, 1)[0]
        saturation_ratio = saturation / ste_saturation
        experience_ratio = ste_to_saturation / to_saturation
        valid = saturation >= SATURATION_FLOOR * ste_saturation and slope >= 0
        result.append(
            SampleEfficiency(saturation_ratio, experience_ratio, saturation_ratio * experience_ratio if valid else 0.0)
        )
    return result


def sample_efficiency(curves: Sequence[CurveLike], ste_curves: Sequence[CurveLike]) -> float | None:
    """SE = mean over tasks where it is defined of SE_j (New et al. 2023); None if no task has one."""
    return _mean_or_none([s.sample_efficiency for s in sample_efficiency_per_task(curves, ste_curves) if s])


# -- pre-processing ----------------------------------------------------------------------------------


def smooth_curves(curves: Sequence[CurveLike]) -> list[LearningCurve]:
    """Every curve through l2metrics' flat :func:`smooth` (its ``smoothing_method="flat"``)."""
    return [LearningCurve(smooth(_curve_values(c)).tolist(), c.samples_per_point) for c in map(_curve, curves)]


@dataclass(frozen=True)
class L2MData:
    """What the metrics read: R, the random-init row b, and the learner's / the STE's training curves."""

    acc_matrix: np.ndarray
    random_init_acc: np.ndarray
    curves: list[LearningCurve] | None
    ste_curves: list[LearningCurve] | None


def normalize_per_task(data: L2MData) -> L2MData:
    """l2metrics' ``Normalizer(method="task", scale=100, offset=1)``: task j's values (column j of R, b_j,
    curve j and STE curve j) mapped from their own [min_j, max_j] onto [1, 101]; a constant task onto 1."""
    matrix, first = data.acc_matrix.copy(), data.random_init_acc.copy()
    curves = [list(_curve_values(c)) for c in data.curves] if data.curves is not None else None
    ste = [list(_curve_values(c)) for c in data.ste_curves] if data.ste_curves is not None else None
    for j in range(matrix.shape[1]):
        values = [*matrix[:, j], first[j], *(curves[j] if curves else []), *(ste[j] if ste else [])]
        values = [v for v in values if np.isfinite(v)]
        low, high = min(values), max(values)

        def scaled(x: np.ndarray, low: float = low, high: float = high) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            if high == low:
                return np.zeros_like(x) + NORMALIZED_OFFSET
            return (x - low) / (high - low) * NORMALIZED_SCALE + NORMALIZED_OFFSET

        matrix[:, j], first[j] = scaled(matrix[:, j]), scaled(np.asarray([first[j]]))[0]
        if curves:
            curves[j] = scaled(curves[j]).tolist()
        if ste:
            ste[j] = scaled(ste[j]).tolist()

    def rebuilt(values: list[list[float]] | None, like: list[LearningCurve] | None) -> list[LearningCurve] | None:
        if values is None or like is None:
            return None
        return [LearningCurve(v, c.samples_per_point) for v, c in zip(values, like, strict=True)]

    return L2MData(matrix, first, rebuilt(curves, data.curves), rebuilt(ste, data.ste_curves))


def preprocess(
    acc_matrix: ArrayLike,
    random_init_acc: Sequence[float],
    curves: Sequence[CurveLike] | None = None,
    ste_curves: Sequence[CurveLike] | None = None,
    normalization: str = "task",
    smoothing: str = "flat",
) -> L2MData:
    """Smoothing, then per-task normalisation, in l2metrics' order (see the module docstring)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"l2m normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"l2m smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
    matrix = _square(acc_matrix)
    first = np.asarray(random_init_acc, dtype=np.float64)
    if first.shape != (matrix.shape[0],):
        raise ValueError(f"random_init_acc must have {matrix.shape[0]} entries, got shape {first.shape}")
    learner = None if curves is None else [_curve(c) for c in curves]
    expert = None if ste_curves is None else [_curve(c) for c in ste_curves]
    if smoothing == "flat":
        learner = None if learner is None else smooth_curves(learner)
        expert = None if expert is None else smooth_curves(expert)
    data = L2MData(matrix, first, learner, expert)
    return normalize_per_task(data) if normalization == "task" else data


# -- summary -----------------------------------------------------------------------------------------


def summarize_l2m(
    acc_matrix: ArrayLike,
    random_init_acc: Sequence[float],
    ste_acc: Sequence[float] | None = None,
    curves: Sequence[CurveLike] | None = None,
    ste_curves: Sequence[CurveLike] | None = None,
    normalization: str = "task",
    smoothing: str = "flat",
) -> dict[str, float]:
    """Every L2M scalar computable from what is given, keys prefixed ``l2m_``; undefined ones are omitted.

    ``curves[j]`` / ``ste_curves[j]`` are the lifelong learner's and the single-task expert's training
    curves on task j (percent); ``ste_acc[j]`` is a*_j, the expert's test accuracy (the ``independent``
    strategy's diagonal). ``normalization`` / ``smoothing``: l2metrics' pre-processing, on by default as
    there (``"none"`` for raw accuracies; see the module docstring).
    """
    if curves is not None and len(curves) != len(acc_matrix):
        raise ValueError(f"need one learning curve per task: got {len(curves)} for {len(acc_matrix)} tasks")
    if ste_curves is not None and len(ste_curves) != len(acc_matrix):
        raise ValueError(f"need one STE curve per task: got {len(ste_curves)} for {len(acc_matrix)} tasks")
    raw_matrix = acc_matrix
    data = preprocess(acc_matrix, random_init_acc, curves, ste_curves, normalization, smoothing)
    acc_matrix, random_init_acc = data.acc_matrix, data.random_init_acc.tolist()
    curves, ste_curves = data.curves, data.ste_curves
    candidates: dict[str, float | None] = {
        "l2m_performance_maintenance": performance_maintenance(acc_matrix),
        "l2m_forward_transfer_ratio": forward_transfer_ratio(acc_matrix, random_init_acc),
        "l2m_forward_transfer_contrast": forward_transfer_contrast(acc_matrix, random_init_acc),
        "l2m_backward_transfer_ratio": backward_transfer_ratio(acc_matrix),
        "l2m_backward_transfer_contrast": backward_transfer_contrast(acc_matrix),
    }
    if ste_acc is not None:
        candidates["l2m_relative_final_performance"] = relative_final_performance(raw_matrix, ste_acc)
    if curves is not None and ste_curves is not None:
        candidates["l2m_relative_performance"] = relative_performance(curves, ste_curves)
        per_task = [s for s in sample_efficiency_per_task(curves, ste_curves) if s is not None]
        candidates["l2m_sample_efficiency"] = _mean_or_none([s.sample_efficiency for s in per_task])
        candidates["l2m_sample_efficiency_saturation"] = _mean_or_none([s.saturation_ratio for s in per_task])
        candidates["l2m_sample_efficiency_experience"] = _mean_or_none([s.experience_ratio for s in per_task])
    return {key: value for key, value in candidates.items() if value is not None}
