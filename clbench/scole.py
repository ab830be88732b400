"""SCoLe streams: long sequences of small tasks drawn from one label set, so classes re-occur.

Lesort et al. (2023), "Challenging Common Assumptions about Catastrophic Forgetting": each task samples a
few classes from the whole label set, training is one epoch per task through a single head whose absent
classes' logits are masked (group masking), and after every task the model is evaluated on the whole test
set. With re-occurring classes even plain fine-tuning accumulates knowledge: accuracy on the full test set
rises over the stream. R is then T x 1 (one evaluation set), plus per-class accuracy after every task.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clbench.data.base import ImageDataset
from clbench.streams import Stream, Task

DISTRIBUTIONS = ("uniform", "decaying")


def class_probabilities(num_classes: int, distribution: str, decay: float) -> np.ndarray:
    """How often each class is drawn: uniform, or ``decaying`` with p_c proportional to exp(-decay * c / (C - 1)),
    so class 0 is the most frequent and the entropy falls as ``decay`` grows (decay 0 is uniform)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown stream.distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    if distribution == "uniform" or num_classes == 1:
        return np.full(num_classes, 1.0 / num_classes)
    if decay < 0:
        raise ValueError(f"stream.decay must be >= 0, got {decay}")
    weights = np.exp(-decay * np.arange(num_classes) / (num_classes - 1))
    return weights / weights.sum()


def scole_stream(
    dataset: ImageDataset,
    num_tasks: int = 200,
    classes_per_task: int = 2,
    distribution: str = "uniform",
    decay: float = 0.0,
    samples_per_class: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
) -> Stream:
    """A SCoLe stream of ``num_tasks`` tasks, each ``classes_per_task`` classes drawn (without replacement
    within a task) from the class distribution; ``samples_per_class`` training images per drawn class
    (all of them when None). Targets are the dataset's labels, through one shared head (class scenario)."""
    total = dataset.num_classes
    if not 1 <= classes_per_task <= total:
        raise ValueError(f"stream.classes_per_task must be in [1, {total}] for {dataset.name}, got {classes_per_task}")
    if num_tasks < 1:
        raise ValueError(f"stream.num_tasks must be >= 1, got {num_tasks}")
    probabilities = class_probabilities(total, distribution, decay)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(dataset.y_train == c).flatten() for c in range(total)]
    empty = torch.zeros(0, dtype=torch.int64)
    tasks = []
    for t in range(num_tasks):
        classes = tuple(
            sorted(int(c) for c in rng.choice(total, size=classes_per_task, replace=False, p=probabilities))
        )
        parts = []
        for c in classes:
            pool = members[c]
            if samples_per_class is not None and samples_per_class < len(pool):
                pool = pool[torch.randperm(len(pool), generator=generator)[:samples_per_class]]
            parts.append(pool)
        train_index = torch.cat(parts).sort().values
        tasks.append(
            Task(
                t,
                f"{dataset.name}{list(classes)}",
                classes,
                total,
                train_index,
                dataset.y_train[train_index],
                empty,
                empty,
                empty,
                empty,
            )
        )
    full_test = Task(
        0,
        f"{dataset.name} test set",
        tuple(range(total)),
        total,
        empty,
        empty,
        torch.arange(len(dataset.y_test)),
        dataset.y_test.clone(),
        empty,
        empty,
    )
    entropy = float(-(probabilities * np.log(probabilities)).sum())
    return Stream(
        name=name or f"scole_{dataset.name}",
        scenario="class",
        tasks=tasks,
        x_train=dataset.x_train,
        x_test=dataset.x_test,
        mean=torch.tensor(dataset.mean).expand(num_tasks, -1).contiguous(),
        std=torch.tensor(dataset.std).expand(num_tasks, -1).contiguous(),
        num_classes=total,
        info={
            "dataset": dataset.name,
            "distribution": distribution,
            "class_probabilities": probabilities.tolist(),
            "entropy_nats": entropy,
            "max_entropy_nats": math.log(total),
            "root": root,
        },
        eval_tasks=[full_test],
        mask_absent_classes=True,
    )


def accumulation_summary(acc_over_time: list[float]) -> dict[str, float]:
    """Knowledge accumulation over a long stream (percent): first, last, best and mean full-test accuracy,
    the gain last - first, and the mean over the last 10% of tasks (less noisy than the last point)."""
    values = np.asarray(acc_over_time, dtype=np.float64)
    tail = values[-max(1, len(values) // 10) :]
    return {
        "acc_first": float(values[0]),
        "acc_final": float(values[-1]),
        "acc_best": float(values.max()),
        "acc_mean_over_time": float(values.mean()),
        "acc_final_decile": float(tail.mean()),
        "accumulation_gain": float(values[-1] - values[0]),
    }
