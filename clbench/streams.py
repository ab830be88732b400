"""Tasks, streams, and the protocols that build them: split, permuted, rotated and multi-dataset.

A :class:`Stream` holds one pool of uint8 images (train and test) and, per task, index and target
tensors into that pool. Derived tasks are views: a permuted task is a row of ``permutations``, a rotated
task an entry of ``angles``, a split task an index set. Memory is O(dataset) however many tasks.
Batches are assembled on the stream's device: gather uint8 -> float -> task transform -> normalise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.data.base import ImageDataset, resize_images

SCENARIOS = ("task", "domain", "class")
TaskIds = int | Tensor


@dataclass(frozen=True)
class Task:
    """One task: its classes and its train / val / test index sets into the stream's pool.

    ``*_targets`` are already in the label space the scenario asks for: local class positions for
    ``task`` (one head per task), shared labels for ``domain``, global class positions for ``class``.
    ``val_*`` index the training pool (a held-out part of the training images).
    """

    id: int
    name: str
    classes: tuple[int, ...]
    num_outputs: int
    train_index: Tensor
    train_targets: Tensor
    test_index: Tensor
    test_targets: Tensor
    val_index: Tensor
    val_targets: Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_index.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_index.numel())

    def to(self, device: torch.device | str) -> Task:
        return replace(
            self,
            **{
                name: getattr(self, name).to(device)
                for name in ("train_index", "train_targets", "test_index", "test_targets", "val_index", "val_targets")
            },
        )


class Segment(NamedTuple):
    """Positions ``[start, stop)`` of a concatenated index that all belong to task ``task_id`` (host ints, so
    inputs for a run of one task take the single-transform path without reading the device)."""

    start: int
    stop: int
    task_id: int


@dataclass(frozen=True)
class EvaluationPlan:
    """Every evaluation set concatenated: pool positions, targets, each sample's set (its position in the
    row), the set sizes (float64, for the division) and the per-task runs of the concatenation."""

    index: Tensor
    targets: Tensor
    owners: Tensor
    sizes: Tensor
    segments: tuple[Segment, ...]


@dataclass
class Stream:
    """A task sequence over one image pool, with the scenario that decides heads and task identity.

    ``permutations`` ([T, C*H*W] long) or ``angles`` ([T] degrees) define per-task input transforms;
    ``mean`` / ``std`` ([T, C]) normalise each task's inputs (per source dataset for multi-dataset).
    """

    name: str
    scenario: str
    tasks: list[Task]
    x_train: Tensor
    x_test: Tensor
    mean: Tensor
    std: Tensor
    num_classes: int
    permutations: Tensor | None = None
    angles: Tensor | None = None
    info: dict = field(default_factory=dict)
    eval_tasks: list[Task] | None = None
    mask_absent_classes: bool = False
    mask_per_batch: bool = False  # with mask_absent_classes: mask the classes absent from each batch, not the task

    @property
    def evaluation_tasks(self) -> list[Task]:
        """What each row of R is measured on: the tasks themselves (square R), or, for long streams such
        as SCoLe, fixed evaluation sets (e.g. the whole test set), giving a T x E matrix."""
        return self.eval_tasks if self.eval_tasks is not None else self.tasks

    @property
    def square(self) -> bool:
        """Whether R is the usual T x T matrix that ACC / BWT / FWT / forgetting are defined on."""
        return self.eval_tasks is None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}: use one of {', '.join(SCENARIOS)}")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, task_id: int) -> Task:
        return self.tasks[task_id]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def head_sizes(self) -> list[int]:
        """Output sizes of the model's heads: one per task in the task scenario, else one shared head."""
        if self.scenario == "task":
            return [task.num_outputs for task in self.tasks]
        if self.scenario == "domain":
            return [max(task.num_outputs for task in self.tasks)]
        return [self.num_classes]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> Stream:
        """The same stream with the pool, the index sets and the transforms on ``device`` (done once)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            tasks=[task.to(device) for task in self.tasks],
            eval_tasks=None if self.eval_tasks is None else [task.to(device) for task in self.eval_tasks],
            x_train=self.x_train.to(device),
            x_test=self.x_test.to(device),
            mean=self.mean.to(device),
            std=self.std.to(device),
            permutations=move(self.permutations),
            angles=move(self.angles),
        )

    def inputs(self, split: str, index: Tensor, task_ids: TaskIds, out: Tensor | None = None) -> Tensor:
        """Model inputs for pool positions ``index`` of ``split`` ("train" or "test"), as task(s) ``task_ids``.

        ``task_ids`` is an int when the whole batch is one task (the fast path) or a [B] tensor. Pixels are
        gathered (and permuted) as uint8, then converted and normalised in one affine pass, so a batch costs
        a handful of kernels: this runs once per training step. ``out`` (fp32, ``[len(index), *input_shape]``)
        receives the inputs in place of a new tensor, so that a chunk made of several tasks' samples is
        written part by part with no concatenation copy; the values are the same.
        """
        pool = self.x_train if split == "train" else self.x_test
        shape = (-1, pool.shape[1], 1, 1)
        if self.angles is not None:  # rotation zero-fills, so it works on [0, 1] images before normalising
            x = pool[index].float()
            if pool.dtype == torch.uint8:
                x = x / 255.0
            x = rotate(x, self.angles[task_ids])
            x = (x - self.mean[task_ids].view(shape)) / self.std[task_ids].view(shape)
            return x if out is None else out.copy_(x)
        x = pool.index_select(0, index)  # on CPU several times faster than pool[index]
        if self.permutations is not None:
            flat = x.flatten(1)
            # gather beats column indexing (flat[:, perm]) by ~4x on CPU; an expanded index costs no copy
            table = self.permutations[task_ids]
            x = flat.gather(1, table.expand(flat.shape[0], -1) if table.dim() == 1 else table).view_as(x)
        scale, shift = self.affine
        x = x.float() if out is None else out.copy_(x)
        return x.mul_(scale[task_ids].view(shape)).sub_(shift[task_ids].view(shape))

    def train_batches(self, task: Task, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """A task's training inputs and targets in order, in consecutive batches of ``batch_size`` (no shuffle):
        what importance estimates (EWC's Fisher, MAS, SPU's score) read in one pass over the task."""
        for positions, targets in zip(
            task.train_index.split(batch_size), task.train_targets.split(batch_size), strict=True
        ):
            yield self.inputs("train", positions, task.id), targets

    @cached_property
    def evaluation_plan(self) -> EvaluationPlan:
        """All evaluation sets concatenated, for one batched pass per row of R. Derived once per stream (and
        per device, since ``to`` makes a new stream)."""
        tasks = self.evaluation_tasks
        device = tasks[0].test_index.device
        counts = [int(t.test_index.numel()) for t in tasks]
        sizes = torch.tensor(counts, device=device)
        bounds = [0, *itertools.accumulate(counts)]
        return EvaluationPlan(
            index=torch.cat([t.test_index for t in tasks]),
            targets=torch.cat([t.test_targets for t in tasks]),
            owners=torch.arange(len(tasks), device=device).repeat_interleave(sizes),
            sizes=sizes.double(),
            segments=tuple(Segment(bounds[k], bounds[k + 1], t.id) for k, t in enumerate(tasks) if counts[k]),
        )

    @cached_property
    def affine(self) -> tuple[Tensor, Tensor]:
        """Per task and channel, ``(scale, shift)`` with ``pixel * scale - shift == (pixel / 255 - mean) / std``
        for uint8 pools (``(pixel - mean) / std`` for float pools)."""
        peak = 255.0 if self.x_train.dtype == torch.uint8 else 1.0
        return 1.0 / (self.std * peak), self.mean / self.std


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate a batch by ``degrees`` (a scalar tensor or one angle per image) about the centre, zero fill."""
    radians = degrees.float().expand(images.shape[0]) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# --------------------------------------------------------------------------------------------------
# builders (the `_target_`s of conf/stream/*.yaml)
# --------------------------------------------------------------------------------------------------


def val_split(positions: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Hold out ``val_fraction`` of ``positions`` (drawn with ``generator``) as the validation set."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"stream.val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = positions[torch.randperm(len(positions), generator=generator)]
    n_val = round(len(positions) * val_fraction)
    return shuffled[n_val:].sort().values, shuffled[:n_val].sort().values


def _subsample(positions: Tensor, limit: int | None, generator: torch.Generator) -> Tensor:
    if limit is None or limit >= len(positions):
        return positions
    return positions[torch.randperm(len(positions), generator=generator)[:limit]].sort().values


def _norm_stats(dataset: ImageDataset, num_tasks: int) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(dataset.mean).expand(num_tasks, -1).contiguous()
    std = torch.tensor(dataset.std).expand(num_tasks, -1).contiguous()
    return mean, std


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown stream.scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")


def split_stream(
    dataset: ImageDataset,
    num_tasks: int,
    classes_per_task: int | None = None,
    scenario: str = "task",
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    val_fraction: float = 0.0,
    train_per_task: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    order_seed: int | None = None,
) -> Stream:
    """Split a dataset by classes into ``num_tasks`` disjoint tasks (Split MNIST / CIFAR-100 protocols).

    Classes go to tasks in natural order unless ``class_order`` is given or ``shuffle_classes`` draws one
    from ``seed``. ``root`` / ``download`` are recorded for provenance; the dataset node reads them.
    """
    _check_scenario(scenario)
    total = dataset.num_classes
    classes_per_task = classes_per_task or total // num_tasks
    if num_tasks < 1 or classes_per_task < 1 or num_tasks * classes_per_task > total:
        raise ValueError(
            f"stream.num_tasks={num_tasks} x classes_per_task={classes_per_task} needs more than the "
            f"{total} classes of {dataset.name}: lower stream.num_tasks or stream.classes_per_task"
        )
    generator = torch.Generator().manual_seed(seed)
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != sorted(set(order)) or not set(order) <= set(range(total)):
            raise ValueError(f"stream.class_order must list distinct classes of {dataset.name} (0..{total - 1})")
    elif shuffle_classes:
        order = torch.randperm(total, generator=generator).tolist()
    else:
        order = list(range(total))
    global_position = torch.full((total,), -1, dtype=torch.int64)
    tasks = []
    for t in range(num_tasks):
        classes = tuple(order[t * classes_per_task : (t + 1) * classes_per_task])
        local_position = torch.full((total,), -1, dtype=torch.int64)
        for k, c in enumerate(classes):
            local_position[c] = k
            global_position[c] = t * classes_per_task + k
        label_map = global_position if scenario == "class" else local_position
        in_task = torch.isin(dataset.y_train, torch.tensor(classes))
        train_pos = _subsample(torch.nonzero(in_task).flatten(), train_per_task, generator)
        train_pos, val_pos = val_split(train_pos, val_fraction, generator)
        test_pos = torch.nonzero(torch.isin(dataset.y_test, torch.tensor(classes))).flatten()
        tasks.append(
            Task(
                id=t,
                name=f"{dataset.name}[{','.join(dataset.class_names[c] for c in classes)}]",
                classes=classes,
                num_outputs=classes_per_task,
                train_index=train_pos,
                train_targets=label_map.clone()[dataset.y_train[train_pos]],
                test_index=test_pos,
                test_targets=label_map.clone()[dataset.y_test[test_pos]],
                val_index=val_pos,
                val_targets=label_map.clone()[dataset.y_train[val_pos]],
            )
        )
    mean, std = _norm_stats(dataset, num_tasks)
    return reorder_tasks(
        Stream(
            name=name or f"split_{dataset.name}",
            scenario=scenario,
            tasks=tasks,
            x_train=dataset.x_train,
            x_test=dataset.x_test,
            mean=mean,
            std=std,
            num_classes=num_tasks * classes_per_task,
            info={"dataset": dataset.name, "class_order": order[: num_tasks * classes_per_task], "root": root},
        ),
        order_seed,
    )


def class_subset_stream(dataset: ImageDataset, classes: list[int]) -> Stream:
    """``dataset``'s ``classes`` as one task (outputs in that order: output k is class ``classes[k]``), its inputs
    normalised as any stream over ``dataset`` normalises them: how the pretraining data and a control set are
    read, so that both see the inputs a run's stream gives the model."""
    return split_stream(
        dataset, num_tasks=1, classes_per_task=len(classes), class_order=classes, scenario="task", name=dataset.name
    )


def _transformed_stream(
    dataset: ImageDataset,
    num_tasks: int,
    kind: str,
    scenario: str,
    val_fraction: float,
    train_per_task: int | None,
    generator: torch.Generator,
    order_seed: int | None,
    **stream_fields,
) -> Stream:
    """Tasks that all see the same images through different input transforms (permutation / rotation).

    The index tensors are shared by every task, so T tasks cost one dataset. Targets are the labels, offset
    by t * C in the class scenario (each task's classes are new outputs of the one growing head).
    """
    train_pos = _subsample(torch.arange(len(dataset.y_train)), train_per_task, generator)
    train_pos, val_pos = val_split(train_pos, val_fraction, generator)
    test_pos = torch.arange(len(dataset.y_test))
    labels = (dataset.y_train[train_pos], dataset.y_train[val_pos], dataset.y_test)
    num = dataset.num_classes
    tasks = []
    for t in range(num_tasks):
        shift = t * num if scenario == "class" else 0
        train_y, val_y, test_y = (y + shift if shift else y for y in labels)
        classes = tuple(range(shift, shift + num))
        tasks.append(
            Task(t, f"{dataset.name}-{kind}{t}", classes, num, train_pos, train_y, test_pos, test_y, val_pos, val_y)
        )
    mean, std = _norm_stats(dataset, num_tasks)
    stream = Stream(
        scenario=scenario,
        tasks=tasks,
        x_train=dataset.x_train,
        x_test=dataset.x_test,
        mean=mean,
        std=std,
        num_classes=num * (num_tasks if scenario == "class" else 1),
        **stream_fields,
    )
    return reorder_tasks(stream, order_seed)


def permuted_stream(
    dataset: ImageDataset,
    num_tasks: int,
    scenario: str = "domain",
    permute_first: bool = True,
    val_fraction: float = 0.0,
    train_per_task: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    order_seed: int | None = None,
) -> Stream:
    """Permuted-pixel tasks (Permuted MNIST): task t applies a fixed random pixel permutation.

    ``permute_first=False`` keeps task 0 as the original images (some papers do); GPM permutes all.
    Only the [T, C*H*W] permutation table is stored per task, never permuted images.
    """
    _check_scenario(scenario)
    if num_tasks < 1:
        raise ValueError(f"stream.num_tasks must be >= 1, got {num_tasks}")
    generator = torch.Generator().manual_seed(seed)
    num_pixels = math.prod(dataset.input_shape)
    permutations = torch.stack([torch.randperm(num_pixels, generator=generator) for _ in range(num_tasks)])
    if not permute_first:
        permutations[0] = torch.arange(num_pixels)
    return _transformed_stream(
        dataset,
        num_tasks,
        "perm",
        scenario,
        val_fraction,
        train_per_task,
        generator,
        order_seed,
        name=name or f"permuted_{dataset.name}",
        permutations=permutations,
        info={"dataset": dataset.name, "root": root},
    )


def rotated_stream(
    dataset: ImageDataset,
    num_tasks: int,
    scenario: str = "domain",
    angles: Sequence[float] | None = None,
    max_angle: float = 180.0,
    val_fraction: float = 0.0,
    train_per_task: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    order_seed: int | None = None,
) -> Stream:
    """Rotated tasks (Rotated MNIST): task t rotates every image by a fixed angle, evenly spaced in
    [0, max_angle) unless ``angles`` lists them. Rotation happens per batch on the device."""
    _check_scenario(scenario)
    if angles is None:
        angles = [max_angle * t / num_tasks for t in range(num_tasks)]
    if len(angles) != num_tasks:
        raise ValueError(f"stream.angles lists {len(angles)} angles for stream.num_tasks={num_tasks}")
    generator = torch.Generator().manual_seed(seed)
    return _transformed_stream(
        dataset,
        num_tasks,
        "rot",
        scenario,
        val_fraction,
        train_per_task,
        generator,
        order_seed,
        name=name or f"rotated_{dataset.name}",
        angles=torch.tensor([float(a) for a in angles]),
        info={"dataset": dataset.name, "angles": [float(a) for a in angles], "root": root},
    )


def multi_dataset_stream(
    datasets: Sequence[ImageDataset],
    shape: Sequence[int] = (3, 32, 32),
    scenario: str = "task",
    num_tasks: int | None = None,
    val_fraction: float = 0.0,
    train_per_task: int | None = None,
    seed: int = 0,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    order_seed: int | None = None,
) -> Stream:
    """One task per dataset, all brought to ``shape`` (5-datasets: CIFAR-10, MNIST, SVHN, Fashion-MNIST,
    notMNIST at 3x32x32). Each task is normalised with its own dataset's statistics."""
    _check_scenario(scenario)
    datasets = list(datasets)[: num_tasks or None]
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.cat([resize_images(d.x_train, shape) for d in datasets])
    x_test = torch.cat([resize_images(d.x_test, shape) for d in datasets])
    tasks, means, stds = [], [], []
    train_offset = test_offset = class_offset = 0
    for t, d in enumerate(datasets):
        resized_mean = [d.mean[0]] * shape[0] if len(d.mean) != shape[0] else list(d.mean)
        resized_std = [d.std[0]] * shape[0] if len(d.std) != shape[0] else list(d.std)
        means.append(resized_mean)
        stds.append(resized_std)
        shift = class_offset if scenario == "class" else 0
        train_pos = _subsample(torch.arange(len(d.y_train)), train_per_task, generator)
        train_pos, val_pos = val_split(train_pos, val_fraction, generator)
        tasks.append(
            Task(
                id=t,
                name=d.name,
                classes=tuple(range(class_offset, class_offset + d.num_classes)),
                num_outputs=d.num_classes,
                train_index=train_pos + train_offset,
                train_targets=d.y_train[train_pos] + shift,
                test_index=torch.arange(len(d.y_test)) + test_offset,
                test_targets=d.y_test + shift,
                val_index=val_pos + train_offset,
                val_targets=d.y_train[val_pos] + shift,
            )
        )
        train_offset += len(d.y_train)
        test_offset += len(d.y_test)
        class_offset += d.num_classes
    return reorder_tasks(
        Stream(
            name=name or "multi_dataset",
            scenario=scenario,
            tasks=tasks,
            x_train=x_train,
            x_test=x_test,
            mean=torch.tensor(means),
            std=torch.tensor(stds),
            num_classes=class_offset,
            info={"datasets": [d.name for d in datasets], "root": root},
        ),
        order_seed,
    )


def reorder_tasks(stream: Stream, order_seed: int | None) -> Stream:
    """The same tasks in a random order drawn from ``order_seed`` (None: unchanged), renumbered 0..T-1,
    with each task's permutation / angle / normalisation moved along with it (task-order robustness)."""
    if order_seed is None:
        return stream
    order = torch.randperm(len(stream.tasks), generator=torch.Generator().manual_seed(order_seed)).tolist()
    pick = lambda table: None if table is None else table[order]  # noqa: E731
    return replace(
        stream,
        tasks=[replace(stream.tasks[k], id=new) for new, k in enumerate(order)],
        permutations=pick(stream.permutations),
        angles=pick(stream.angles),
        mean=stream.mean[order],
        std=stream.std[order],
        info={**stream.info, "task_order": order, "order_seed": order_seed},
    )
