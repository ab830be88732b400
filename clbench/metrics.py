"""Continual-learning metrics as pure functions of the accuracy matrix.

Conventions, used everywhere in clbench and nowhere redefined:

* ``acc_matrix[i, j]`` (``R[i][j]``) is the accuracy in percent on task ``j``'s test set after training
  task ``i``; it is ``T x T`` and holds unseen tasks too (``j > i``), so FWT needs no extra pass.
* ``random_init_acc[j]`` (``b_j``) is the accuracy in percent on task ``j`` of the model before any
  training (same initialisation as the run).
* ``reference_acc[j]`` (``a*_j``) is the accuracy of a reference model trained on task ``j`` alone
  (clbench's ``independent`` strategy), used by intransigence.

Libraries disagree on these definitions (Avalanche's forgetting is first-minus-last, Continuum's FWT
drops ``b_j``); the definitions here follow the papers named on each function and are tested on
hand-made matrices in ``tests/test_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[Sequence[float]]


def _square(acc_matrix: ArrayLike) -> np.ndarray:
    matrix = np.asarray(acc_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square T x T matrix, got shape {matrix.shape}")
    return matrix


def average_accuracy(acc_matrix: ArrayLike) -> float:
    """ACC: mean accuracy over all tasks after the last task (Lopez-Paz & Ranzato, 2017)."""
    matrix = _square(acc_matrix)
    return float(matrix[-1].mean())


def backward_transfer(acc_matrix: ArrayLike) -> float:
    """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato, 2017); 0.0 for one task."""
    matrix = _square(acc_matrix)
    num_tasks = matrix.shape[0]
    if num_tasks < 2:
        return 0.0
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(num_tasks - 1)]))


def forward_transfer(acc_matrix: ArrayLike, random_init_acc: Sequence[float]) -> float:
    """FWT = mean_{j>0} (R[j-1][j] - b_j) (Lopez-Paz & Ranzato, 2017); 0.0 for one task."""
    matrix = _square(acc_matrix)
    baseline = np.asarray(random_init_acc, dtype=np.float64)
    num_tasks = matrix.shape[0]
    if baseline.shape != (num_tasks,):
        raise ValueError(f"random_init_acc must have {num_tasks} entries, got shape {baseline.shape}")
    if num_tasks < 2:
        return 0.0
    return float(np.mean([matrix[j - 1, j] - baseline[j] for j in range(1, num_tasks)]))


def forgetting_matrix(acc_matrix: ArrayLike) -> np.ndarray:
    """F[i][j] = max_{l<i} R[l][j] - R[i][j] for j < i, NaN elsewhere (Chaudhry et al., 2018).

    The max runs over every earlier row, so accuracy a task reached only after later training
    (backward transfer) counts as its best, as in the paper.
    """
    matrix = _square(acc_matrix)
    num_tasks = matrix.shape[0]
    result = np.full_like(matrix, np.nan)
    for i in range(1, num_tasks):
        for j in range(i):
            result[i, j] = matrix[j:i, j].max() - matrix[i, j]
    return result


def forgetting(acc_matrix: ArrayLike) -> float:
    """Average forgetting after the last task: mean_{j<T-1} F[T-1][j] (Chaudhry et al., 2018)."""
    matrix = _square(acc_matrix)
    if matrix.shape[0] < 2:
        return 0.0
    return float(np.nanmean(forgetting_matrix(matrix)[-1, :-1]))


def intransigence(acc_matrix: ArrayLike, reference_acc: Sequence[float]) -> float:
    """Average intransigence mean_j (a*_j - R[j][j]) (Chaudhry et al., 2018).

    ``reference_acc`` holds a*_j, the accuracy of a model trained on task j alone; clbench takes it
    from the ``independent`` strategy's diagonal on the same stream and seed.
    """
    matrix = _square(acc_matrix)
    reference = np.asarray(reference_acc, dtype=np.float64)
    if reference.shape != (matrix.shape[0],):
        raise ValueError(f"reference_acc must have {matrix.shape[0]} entries, got shape {reference.shape}")
    return float(np.mean(reference - np.diag(matrix)))


def backward_transfer_matrix(acc_matrix: ArrayLike) -> np.ndarray:
    """BT[i][j] = R[i][j] - R[j][j] for i > j, NaN elsewhere: how training task i moved task j."""
    matrix = _square(acc_matrix)
    result = np.full_like(matrix, np.nan)
    rows, cols = np.tril_indices(matrix.shape[0], k=-1)
    result[rows, cols] = matrix[rows, cols] - np.diag(matrix)[cols]
    return result


def forward_transfer_matrix(acc_matrix: ArrayLike, random_init_acc: Sequence[float]) -> np.ndarray:
    """FT[i][j] = R[i][j] - b_j for i < j, NaN elsewhere: what tasks up to i give unseen task j."""
    matrix = _square(acc_matrix)
    baseline = np.asarray(random_init_acc, dtype=np.float64)
    if baseline.shape != (matrix.shape[0],):
        raise ValueError(f"random_init_acc must have {matrix.shape[0]} entries, got shape {baseline.shape}")
    result = np.full_like(matrix, np.nan)
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    result[rows, cols] = matrix[rows, cols] - baseline[cols]
    return result


def summarize(
    acc_matrix: ArrayLike,
    random_init_acc: Sequence[float],
    reference_acc: Sequence[float] | None = None,
) -> dict[str, float]:
    """Every scalar metric of one run, in percent; intransigence only when a reference exists."""
    metrics = {
        "acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix, random_init_acc),
        "forgetting": forgetting(acc_matrix),
    }
    if reference_acc is not None:
        metrics["intransigence"] = intransigence(acc_matrix, reference_acc)
    return metrics
