"""SCoLe streams: long sequences of small tasks drawn from one label set, so classes re-occur.

Lesort et al. (2023), "Challenging Common Assumptions about Catastrophic Forgetting": each task samples a
few classes from the whole label set, training is one epoch per task through a single head whose absent
classes' logits are masked (group masking), and after every task the model is evaluated on the whole test
set. With re-occurring classes even plain fine-tuning accumulates knowledge: accuracy on the full test set
rises over the stream. R is then T x 1 (one evaluation set), plus per-class accuracy after every task.

Fidelity to the official code (TLESORT/SCoLe-SCaling-Continual-Learning):

* Class distribution. ``official`` is its ``get_probability``: p_c proportional to (1 - factor * c)
  (factor 0.05, 0.01 for 100 classes), raised to the power ``entropy_decrease`` and renormalised, then
  shuffled by the seed (``numpy.random.RandomState(seed)``, the same permutation as its
  ``np.random.seed(seed); np.random.shuffle``), so how frequent a class is does not follow its label.
  ``decaying`` (p_c proportional to exp(-decay c / (C - 1)), class 0 the most frequent, unshuffled) is
  clbench's own, kept as an option: one parameter sweeps the entropy smoothly down from uniform and the
  per-class plots read in frequency order. Default: uniform (both codes' default).
* Group masking. ``masking: task`` (default) masks the classes absent from the current *task*;
  ``masking: batch`` masks those absent from each *batch* (the official ``get_loss``: ``labels.unique()``
  of the batch). With a few classes per task and batches of tens of samples the two differ only in
  batches that miss one of the task's classes; masking by task keeps every step's loss over the same
  label set, so the result does not depend on the batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clbench.data.base import ImageDataset
from clbench.streams import Stream, Task

DISTRIBUTIONS = ("uniform", "decaying", "official")
MASKING = ("task", "batch")


def official_factor(num_classes: int) -> float:
    """The official code's slope of the linear decrease: 0.01 for 100 classes, 0.05 otherwise."""
    return 0.01 if num_classes == 100 else 0.05


def class_probabilities(
    num_classes: int,
    distribution: str,
    decay: float = 0.0,
    entropy_decrease: float = 0.0,
    seed: int = 0,
    factor: float | None = None,
) -> np.ndarray:
    """How often each class is drawn (see the module docstring): ``uniform``; ``decaying``, p_c proportional
    to exp(-decay * c / (C - 1)), class 0 the most frequent (decay 0: uniform); ``official``, the official
    ``get_probability``: (1 - factor * c) normalised, raised to ``entropy_decrease``, normalised, shuffled
    by ``seed`` (entropy_decrease 0: uniform, unshuffled, as there). ``factor`` None: the official slope."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown stream.distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    uniform = np.full(num_classes, 1.0 / num_classes)
    if distribution == "uniform" or num_classes == 1:
        return uniform
    if distribution == "decaying":
        if decay < 0:
            raise ValueError(f"stream.decay must be >= 0, got {decay}")
        weights = np.exp(-decay * np.arange(num_classes) / (num_classes - 1))
        return weights / weights.sum()
    if entropy_decrease < 0:
        raise ValueError(f"stream.entropy_decrease must be >= 0, got {entropy_decrease}")
    if entropy_decrease == 0:
        return uniform
    slope = official_factor(num_classes) if factor is None else float(factor)
    linear = uniform - uniform * np.arange(num_classes) * slope
    if (linear <= 0).any():
        raise ValueError(
            f"stream.factor {slope} makes the last of {num_classes} classes' probability <= 0: "
            f"set stream.factor below {1.0 / (num_classes - 1):.4g}"
        )
    linear /= linear.sum()
    powered = linear**entropy_decrease / (linear**entropy_decrease).sum()
    np.random.RandomState(seed).shuffle(powered)
    return powered


def scole_stream(
    dataset: ImageDataset,
    num_tasks: int = 200,
    classes_per_task: int = 2,
    distribution: str = "uniform",
    decay: float = 0.0,
    entropy_decrease: float = 0.0,
    factor: float | None = None,
    masking: str = "task",
    samples_per_class: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
) -> Stream:
    """A SCoLe stream of ``num_tasks`` tasks, each ``classes_per_task`` classes drawn (without replacement
    within a task) from the class distribution; ``samples_per_class`` training images per drawn class
    (all of them when None). Targets are the dataset's labels, through one shared head (class scenario);
    ``masking`` says whether absent classes are masked per task or per batch (see the module docstring)."""
    total = dataset.num_classes
    if masking not in MASKING:
        raise ValueError(f"unknown stream.masking {masking!r}: use one of {', '.join(MASKING)}")
    if not 1 <= classes_per_task <= total:
        raise ValueError(f"stream.classes_per_task must be in [1, {total}] for {dataset.name}, got {classes_per_task}")
    if num_tasks < 1:
        raise ValueError(f"stream.num_tasks must be >= 1, got {num_tasks}")
    probabilities = class_probabilities(total, distribution, decay, entropy_decrease, seed, factor)
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
            "masking": masking,
            "class_probabilities": probabilities.tolist(),
            "entropy_nats": entropy,
            "max_entropy_nats": math.log(total),
            "root": root,
        },
        eval_tasks=[full_test],
        mask_absent_classes=True,
        mask_per_batch=masking == "batch",
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
