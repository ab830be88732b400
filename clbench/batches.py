"""A fit's training samples and their batches: one shuffle per epoch, model inputs a block of steps at a time.

There is no DataLoader: the stream keeps every task's samples on the device, so a batch is a slice of an
index, not a collated list of samples. Each epoch draws one permutation on the device and gathers the
fit's index, targets and task ids once; every step then takes contiguous slices (views, no index kernels).
Model inputs (gather from the uint8 pool, the task's permutation, normalisation) cost a handful of kernels
whatever their size, so they are built for a block of ``trainer.prefetch_mb`` of batches at once, which
removes most of the per-step input cost at small batch sizes; the batches are the same as batch by batch.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clbench.strategy import Batch

if TYPE_CHECKING:
    from clbench.streams import Task

# a block's sample index and task id(s) -> its model inputs and the strategy's per-sample extra (prepare_block)
BlockInputs = Callable[[Tensor, int | Tensor], tuple[Tensor, Tensor | None]]


def prefetch_steps(prefetch_mb: float, input_shape: Sequence[int], batch_size: int) -> int:
    """How many steps' inputs one block holds: as many batches as fit in ``prefetch_mb`` of fp32 inputs of
    ``input_shape``, at least one (``prefetch_mb`` 0: batch by batch)."""
    sample_bytes = 4 * math.prod(input_shape)
    return max(1, int(prefetch_mb * 2**20) // (sample_bytes * batch_size))


@contextlib.contextmanager
def block_threading(block_threads: int | str | None, device: torch.device | None) -> Iterator[None]:
    """CPU threads while a block of inputs is prepared (``trainer.block_threads``): the block's transforms
    and a strategy's ``prepare_block`` are large operations that split well over cores, while tiny-batch
    steps may run fastest on one thread (``cpu_threads=1``). ``auto``: every core this process may use;
    None (or no CPU ``device``): the steps' own setting. The steps' thread count is restored afterwards."""
    if block_threads is None or device is None or device.type != "cpu":
        yield
        return
    if block_threads == "auto":
        wanted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    else:
        wanted = int(block_threads)
    steps_threads = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(steps_threads)


@dataclass
class TrainingSet:
    """The samples one fit trains on: its tasks' training index and targets, and their task ids (an int
    where the fit has one task, else every sample's id, for joint training on a union of tasks)."""

    index: Tensor
    targets: Tensor
    task_ids: int | Tensor

    @classmethod
    def of(cls, tasks: Sequence[Task]) -> TrainingSet:
        """The union of ``tasks``' training samples (one task: its own tensors, no copy)."""
        if len(tasks) == 1:
            return cls(tasks[0].train_index, tasks[0].train_targets, tasks[0].id)
        index = torch.cat([t.train_index for t in tasks])
        targets = torch.cat([t.train_targets for t in tasks])
        sizes = torch.tensor([t.num_train for t in tasks], device=index.device)
        task_ids = torch.tensor([t.id for t in tasks], device=index.device).repeat_interleave(sizes)
        return cls(index, targets, task_ids)

    @property
    def num_samples(self) -> int:
        return int(self.index.numel())

    def steps(self, batch_size: int) -> int:
        """Steps per epoch: every sample once, the last batch possibly smaller."""
        return math.ceil(self.num_samples / batch_size)

    def ids(self, rows: slice) -> int | Tensor:
        """The task id(s) of the samples at positions ``rows``."""
        return self.task_ids if isinstance(self.task_ids, int) else self.task_ids[rows]

    def shuffled(self, generator: torch.Generator) -> TrainingSet:
        """The samples in one epoch's order: a permutation drawn on the device from ``generator`` (the
        trainer's, seeded per run), applied in one gather."""
        order = torch.randperm(self.num_samples, device=self.index.device, generator=generator)
        task_ids = self.task_ids if isinstance(self.task_ids, int) else self.task_ids[order]
        return TrainingSet(self.index[order], self.targets[order], task_ids)

    def batches(
        self, batch_size: int, block_steps: int, prepare: BlockInputs
    ) -> Iterator[tuple[int, slice, Batch, int]]:
        """The batches in order (the last may be smaller), inputs made by ``prepare`` for ``block_steps``
        batches at a time. Yields the step, its samples' positions, its :class:`Batch` (rows of the block's
        inputs and of the strategy's extra), and the block's row count on a block's first step (else 0)."""
        for step in range(self.steps(batch_size)):
            chosen = slice(step * batch_size, (step + 1) * batch_size)
            block_rows = 0
            if step % block_steps == 0:
                block_start = chosen.start
                block = slice(block_start, block_start + block_steps * batch_size)
                block_x, block_aux = prepare(self.index[block], self.ids(block))
                block_rows = block_x.shape[0]
            rows = slice(chosen.start - block_start, chosen.stop - block_start)
            aux = None if block_aux is None else block_aux[rows]
            batch = Batch(block_x[rows], self.targets[chosen], self.ids(chosen), self.index[chosen], aux)
            yield step, chosen, batch, block_rows
