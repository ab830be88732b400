"""Avalanche benchmarks as clbench streams, and clbench streams as Avalanche benchmarks.

``from_avalanche`` runs every experience's dataset through Avalanche's own eval transforms once and
keeps the result as float32 tensors in one pool; the stream then normalises with mean 0 / std 1, so
nothing is normalised twice. ``to_avalanche`` goes the other way with ``Stream.inputs``, so an Avalanche
strategy sees exactly the inputs and targets clbench's own strategies see.

Avalanche is imported inside the functions: importing it costs seconds, and clbench runs without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from clbench.streams import SCENARIOS, Stream, Task, val_split

MATERIALISE_BATCH = 512


def _check_options(scenario: str, max_per_experience: int | None) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown stream.scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")
    if max_per_experience is not None and max_per_experience < 1:
        raise ValueError(f"stream.max_per_experience must be >= 1 or null, got {max_per_experience}")


def _as_images(x: Tensor) -> Tensor:
    """Bring materialised inputs to [N, C, H, W]: ``Stream.inputs`` normalises per channel on axis 1."""
    if x.ndim == 2:
        return x[:, None, None, :]
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x
    raise ValueError(f"from_avalanche needs inputs of 1 to 3 dimensions per sample, got shape {tuple(x.shape[1:])}")


def _materialise(dataset: Any, limit: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One experience's (inputs, labels) after Avalanche's eval transforms, at most ``limit`` samples.

    The eval transform group is used because the pool is read many times (every epoch, every
    evaluation): a random training augmentation frozen once would be worse than none.
    """
    if limit is not None and limit < len(dataset):
        chosen = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
        dataset = dataset.subset(chosen) if hasattr(dataset, "subset") else Subset(dataset, chosen)
    if hasattr(dataset, "eval"):
        dataset = dataset.eval()
    loader = DataLoader(
        dataset, batch_size=MATERIALISE_BATCH, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None)
    )
    inputs, labels = [], []
    for batch in loader:
        inputs.append(torch.as_tensor(batch[0]).float())
        labels.append(torch.as_tensor(batch[1]).long())
    if not inputs:
        raise ValueError("from_avalanche got an experience with an empty dataset: drop it from the benchmark")
    return _as_images(torch.cat(inputs)), torch.cat(labels)


def from_avalanche(
    benchmark: Any,
    scenario: str = "class",
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    max_per_experience: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Stream:
    """A clbench stream from any Avalanche benchmark with a ``train_stream`` and a ``test_stream``.

    Training experience t and test experience t become task t. Targets follow ``scenario``: ``class``
    maps Avalanche's labels to positions in the order classes first appear (sorted within an
    experience), ``task`` to positions among the experience's sorted classes, ``domain`` keeps them.
    ``max_per_experience`` caps the samples taken from each experience (train and test, drawn with
    ``seed``) for quick runs; ``val_fraction`` holds out part of each task's training samples.
    ``root`` / ``download`` are recorded for provenance: the benchmark node itself reads its data
    (Avalanche's classic benchmarks download missing files on their own).

    As a Hydra target (``conf/stream/avalanche.yaml``) ``benchmark`` is a nested ``_target_`` node that
    Hydra instantiates first, so any Avalanche benchmark factory plugs in.
    """
    _check_options(scenario, max_per_experience)
    train_experiences, test_experiences = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_experiences:
        raise ValueError("from_avalanche got a benchmark whose train_stream is empty")
    if len(train_experiences) != len(test_experiences):
        raise ValueError(
            f"the Avalanche benchmark has {len(train_experiences)} training but {len(test_experiences)} test "
            "experiences: from_avalanche pairs them one to one, so build it with one test experience per task"
        )
    generator = torch.Generator().manual_seed(seed)
    train = [_materialise(e.dataset, max_per_experience, generator) for e in train_experiences]
    test = [_materialise(e.dataset, max_per_experience, generator) for e in test_experiences]
    shapes = {tuple(x.shape[1:]) for x, _ in train + test}
    if len(shapes) != 1:
        raise ValueError(f"the Avalanche benchmark's experiences differ in input shape {sorted(shapes)}: resize them")

    task_classes = [
        tuple(torch.cat([y_tr, y_te]).unique().tolist()) for (_, y_tr), (_, y_te) in zip(train, test, strict=True)
    ]
    if min(min(c) for c in task_classes) < 0:
        raise ValueError("from_avalanche needs non-negative integer class labels")
    first_seen = list(dict.fromkeys(c for classes in task_classes for c in classes))
    num_labels = max(first_seen) + 1
    class_position = torch.full((num_labels,), -1, dtype=torch.int64)
    class_position[first_seen] = torch.arange(len(first_seen))

    tasks = []
    train_offset = test_offset = 0
    for t, ((_, y_tr), (_, y_te), classes) in enumerate(zip(train, test, task_classes, strict=True)):
        if scenario == "class":
            label_map = class_position
        elif scenario == "task":
            label_map = torch.full((num_labels,), -1, dtype=torch.int64)
            label_map[list(classes)] = torch.arange(len(classes))
        else:
            label_map = torch.arange(num_labels)
        train_pos, val_pos = val_split(torch.arange(len(y_tr)), val_fraction, generator)
        tasks.append(
            Task(
                id=t,
                name=f"{name or 'avalanche'}-exp{t}",
                classes=classes,
                num_outputs=num_labels if scenario == "domain" else len(classes),
                train_index=train_pos + train_offset,
                train_targets=label_map[y_tr[train_pos]],
                test_index=torch.arange(len(y_te)) + test_offset,
                test_targets=label_map[y_te],
                val_index=val_pos + train_offset,
                val_targets=label_map[y_tr[val_pos]],
            )
        )
        train_offset += len(y_tr)
        test_offset += len(y_te)

    channels = next(iter(shapes))[0]
    return Stream(
        name=name or "avalanche",
        scenario=scenario,
        tasks=tasks,
        x_train=torch.cat([x for x, _ in train]),
        x_test=torch.cat([x for x, _ in test]),
        mean=torch.zeros(len(tasks), channels),
        std=torch.ones(len(tasks), channels),
        num_classes=num_labels if scenario == "domain" else len(first_seen),
        info={
            "source": "avalanche",
            "benchmark": type(benchmark).__name__,
            "class_order": first_seen,
            "root": root,
            "download": download,
        },
    )


def _model_inputs(stream: Stream, split: str, index: Tensor, task_id: int, batch_size: int) -> Tensor:
    """``stream.inputs`` for a whole index set, in batches so a transformed pool never exists at once."""
    chunks = [
        stream.inputs(split, index[start : start + batch_size], task_id).cpu()
        for start in range(0, int(index.numel()), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, *stream.input_shape)


def to_avalanche(stream: Stream, batch_size: int = 4096, splits: Sequence[str] = ("train", "test", "valid")) -> Any:
    """An Avalanche benchmark (``CLScenario``) with one experience per clbench task.

    Inputs are ``stream.inputs(...)`` (task transform and normalisation applied), targets the stream's
    scenario targets, and task labels the task ids, so an Avalanche strategy trains and is evaluated on
    exactly what clbench's strategies see. Streams: ``train_stream``, ``test_stream``, and
    ``valid_stream`` when any task holds out validation samples; experiences carry ``task_label`` and
    Avalanche's class timeline (``classes_in_this_experience`` ...).

    ``splits`` names the streams to build; one whose tasks hold no samples at all is left out (SCoLe's tasks
    have no test split of their own: the stream evaluates on one held-out set, ``stream.evaluation_tasks``, and
    Avalanche cannot label the tasks of an empty dataset). Training one task needs ``splits=("train",)`` only.
    """
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    fields = {
        "train": ("train", "train_index", "train_targets"),
        "test": ("test", "test_index", "test_targets"),
        "valid": ("train", "val_index", "val_targets"),
    }
    unknown = sorted(set(splits) - set(fields))
    if unknown:
        raise ValueError(f"to_avalanche: unknown splits {unknown}; choose from {sorted(fields)}")
    datasets: dict[str, list[Any]] = {}
    for stream_name in splits:
        pool, index_field, targets_field = fields[stream_name]
        if not any(getattr(task, index_field).numel() for task in stream):
            continue
        datasets[stream_name] = [
            _make_taskaware_tensor_classification_dataset(
                _model_inputs(stream, pool, getattr(task, index_field), task.id, batch_size),
                getattr(task, targets_field).cpu(),
                task_labels=task.id,
            )
            for task in stream
        ]
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**datasets)))


def split_digits_benchmark(
    n_experiences: int = 5,
    *,
    return_task_id: bool = False,
    seed: int | None = None,
    fixed_class_order: Sequence[int] | None = None,
    shuffle: bool = True,
    class_ids_from_zero_in_each_exp: bool = False,
    class_ids_from_zero_from_first_exp: bool = False,
    dataset_root: str | None = None,
) -> Any:
    """Split Digits as an Avalanche benchmark, made the way ``SplitMNIST`` is but needing no download.

    Built with Avalanche's ``nc_benchmark`` on tensors of scikit-learn's bundled 8x8 digits, normalised
    with the training set's statistics as SplitMNIST's transform normalises MNIST. The keywords are
    SplitMNIST's, so ``conf/stream/avalanche.yaml`` can swap one ``_target_`` for the other;
    ``dataset_root`` is accepted for that reason and unused.
    """
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    from clbench.data import load_digits

    digits = load_digits()
    mean = torch.tensor(digits.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits.std).view(1, -1, 1, 1)

    def as_dataset(images: Tensor, labels: Tensor) -> Any:
        return _make_taskaware_tensor_classification_dataset((images.float() / 255.0 - mean) / std, labels)

    return nc_benchmark(
        as_dataset(digits.x_train, digits.y_train),
        as_dataset(digits.x_test, digits.y_test),
        n_experiences,
        task_labels=return_task_id,
        shuffle=shuffle,
        seed=seed,
        fixed_class_order=None if fixed_class_order is None else [int(c) for c in fixed_class_order],
        class_ids_from_zero_in_each_exp=class_ids_from_zero_in_each_exp,
        class_ids_from_zero_from_first_exp=class_ids_from_zero_from_first_exp,
    )
