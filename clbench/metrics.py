"""Continual-learning metrics as pure functions of the accuracy matrix.

Conventions, used everywhere in clbench and nowhere redefined:

* ``acc_matrix[i, j]`` (``R[i][j]``) is the accuracy in percent on task ``j``'s test set after training
  task ``i``; it is ``T x T`` and holds unseen tasks too (``j > i``), so FWT needs no extra pass.
* ``random_init_acc[j]`` (``b_j``) is the accuracy in percent on task ``j`` of the model before any
  training (same initialisation as the run).
* ``reference_acc[k]`` (``a*_k``) is, as Chaudhry et al. (2018, RWalk, Sec. 4) define it for intransigence,
  the accuracy on task ``k`` of a reference model trained jointly on tasks ``0..k``: clbench's ``joint``
  strategy trains exactly that model after task ``k``, so ``a*_k = R_joint[k][k]`` (:func:`joint_reference`).
  The single-task variant (a model trained on task ``k`` alone, the ``independent`` strategy's diagonal) is
  kept as ``intransigence_single_task``: it is what the L2M metrics compare against, and in the class
  scenario it is an easier (task-given) target, so the two are never mixed under one name.

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
    """Average intransigence mean_k (a*_k - R[k][k]) (Chaudhry et al., 2018, Eq. 9 averaged over tasks).

    ``reference_acc`` holds a*_k. In the paper a*_k is the accuracy on task k of a model trained jointly on
    tasks 0..k (:func:`joint_reference` of a ``joint`` run); given the single-task diagonal of an
    ``independent`` run instead, the same formula gives the single-task variant.
    """
    matrix = _square(acc_matrix)
    reference = np.asarray(reference_acc, dtype=np.float64)
    if reference.shape != (matrix.shape[0],):
        raise ValueError(f"reference_acc must have {matrix.shape[0]} entries, got shape {reference.shape}")
    return float(np.mean(reference - np.diag(matrix)))


def joint_reference(joint_acc_matrix: ArrayLike) -> list[float]:
    """a*_k = R_joint[k][k]: the accuracy on task k of the model a ``joint`` run trained on tasks 0..k, the
    reference of Chaudhry et al. (2018) for intransigence (row k of a joint run is that model)."""
    return np.diag(_square(joint_acc_matrix)).tolist()


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
    single_task_acc: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """Every scalar metric of one run, in percent. ``intransigence`` only with the joint reference
    ``reference_acc`` (a*_k = R_joint[k][k]), ``intransigence_single_task`` only with ``single_task_acc``
    (an ``independent`` run's diagonal); neither is ever estimated."""
    one_task = len(acc_matrix) < 2  # BWT, FWT and forgetting compare tasks: undefined (None), never 0.0
    metrics: dict[str, float | None] = {
        "acc": average_accuracy(acc_matrix),
        "bwt": None if one_task else backward_transfer(acc_matrix),
        "fwt": None if one_task else forward_transfer(acc_matrix, random_init_acc),
        "forgetting": None if one_task else forgetting(acc_matrix),
    }
    if reference_acc is not None:
        metrics["intransigence"] = intransigence(acc_matrix, reference_acc)
    if single_task_acc is not None:
        metrics["intransigence_single_task"] = intransigence(acc_matrix, single_task_acc)
    return metrics
