"""Evaluation over the device-resident test sets: a row of R, per-class accuracy, the validation loss.

The :class:`Evaluator` belongs to a :class:`~clbench.trainer.Trainer` and reads its settings
(``conf/trainer/``: ``eval_batch_size``, ``eval_amp``, ``batched_eval``, ``eval_chunk_mb``,
``eval_cache_mb``, ``channels_last``) at every call, so a setting changed between rows applies from the
next row. It owns what evaluation keeps across rows: the prepared test inputs and the bf16 probe's verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clbench.strategy import Strategy
from clbench.streams import Segment, Task

if TYPE_CHECKING:
    from clbench.trainer import Trainer

AMP_DTYPES = {"bf16": torch.bfloat16}
# Rows of the first evaluation chunk sent through both in fp32 and rounded to eval_amp's dtype to decide
# whether rounded inputs can be kept (Evaluator._kept_form): enough to catch an fp32 input op, a few ms at most.
PROBE_ROWS = 256


@dataclass(eq=False)
class Evaluator:
    """Accuracy of a strategy on the stream's test sets, a row of R at a time.

    Where the task identity is not given to the model (``batched_eval``), a row is one pass over all
    tasks' test sets in chunks of ``eval_batch_size`` samples or more (``eval_chunk_mb``); otherwise task
    by task. Prepared inputs are kept across rows while they fit in ``eval_cache_mb`` (``kept``, keyed by
    index tensor, tasks and chunk), under ``eval_amp`` rounded to its dtype where a probe shows the logits
    unchanged (``kept_rounded``). ``reset`` forgets both when the trainer is attached to a new run.
    """

    trainer: Trainer
    kept: dict[tuple, Tensor] = field(default_factory=dict, repr=False)
    labels: dict[int, Tensor] = field(default_factory=dict, repr=False)  # per task id, its classes' outputs
    kept_bytes: int = 0
    kept_rounded: bool | None = None

    def __post_init__(self) -> None:
        trainer = self.trainer
        if trainer.eval_amp is not None and trainer.eval_amp not in AMP_DTYPES:
            raise ValueError(
                f"unknown trainer.eval_amp {trainer.eval_amp!r}: use null or one of {', '.join(AMP_DTYPES)}"
            )
        if trainer.eval_cache_mb < 0:
            raise ValueError(f"trainer.eval_cache_mb must be >= 0 (0: no cache), got {trainer.eval_cache_mb}")
        if trainer.eval_chunk_mb < 0:
            raise ValueError(
                f"trainer.eval_chunk_mb must be >= 0 (0: chunks of eval_batch_size), got {trainer.eval_chunk_mb}"
            )

    def reset(self) -> None:
        """Forget the kept inputs and the probe's verdict (a new stream or run)."""
        self.kept.clear()
        self.labels.clear()
        self.kept_bytes = 0
        self.kept_rounded = None

    def row(self, strategy: Strategy, give_task_id: bool) -> list[float]:
        """One row of R: accuracy in percent on every task's test set, seen and unseen (one host read).

        Without task identity the model's prediction does not depend on which task a sample belongs to,
        so all test sets go through the model together in large chunks (``batched_eval``); with it, task
        by task, since the task id picks heads, masks or scaling matrices. A strategy that infers one task
        per batch (``Strategy.inference_batch``) also goes task by task: a chunk mixing tasks would get one
        inferred task for all of them."""
        trainer = self.trainer
        assert trainer.stream is not None
        for module in strategy.eval_modules():
            module.eval()
        tasks = trainer.stream.evaluation_tasks
        # One autocast region for the whole row: its cast weights are made once, not once per chunk. The
        # passes run under no_grad, not inference_mode, because autocast keeps no cast-weight cache there.
        with trainer.autocast(evaluation=True):
            per_task = give_task_id or not trainer.batched_eval or strategy.inference_batch() is not None
            if per_task or len(tasks) == 1:
                row = torch.stack([self.accuracy(strategy, task, "test", give_task_id) for task in tasks])
            else:
                row = self._batched_row(strategy, tasks)
        return row.cpu().tolist()

    def rows_with_task_aware(self, strategy: Strategy, give_task_id: bool) -> tuple[list[float], list[float]]:
        """The class scenario's two rows of R from one pass over the test sets (one host read): task-agnostic
        (TAg, the argmax over every output) and task-aware (TAw, as FACIL reports beside it: each task's
        argmax over its own classes, :meth:`task_labels`). The task identity only picks which outputs are
        read, so both come from the same logits, task by task."""
        trainer = self.trainer
        assert trainer.stream is not None
        for module in strategy.eval_modules():
            module.eval()
        with trainer.autocast(evaluation=True):
            pairs = torch.stack(
                [self.accuracies(strategy, task, give_task_id) for task in trainer.stream.evaluation_tasks]
            )
        agnostic, aware = pairs.T.cpu().tolist()
        return agnostic, aware

    @torch.no_grad()
    def accuracy(
        self, strategy: Strategy, task: Task, split: str = "test", give_task_id: bool = True, task_aware: bool = False
    ) -> Tensor:
        """Accuracy (percent, a 0-d tensor on the device) of ``strategy`` on one task's ``split``; with
        ``task_aware``, the argmax runs over ``task``'s own classes only."""
        index = task.test_index if split == "test" else task.val_index
        targets = task.test_targets if split == "test" else task.val_targets
        pool_split = "test" if split == "test" else "train"  # validation images live in the training pool
        segments = [Segment(0, int(index.numel()), task.id)]
        given = task.id if give_task_id else None
        allowed = self.task_labels(task) if task_aware else None
        predicted = self._predictions(
            strategy, pool_split, index, segments, given, self._chunk(strategy, given), allowed
        )
        if task_aware:
            predicted = predicted[:, 1]
        return (predicted == targets).sum().double() * (100.0 / max(1, int(index.numel())))

    @torch.no_grad()
    def accuracies(self, strategy: Strategy, task: Task, give_task_id: bool) -> Tensor:
        """Task-agnostic and task-aware test accuracy (percent, a ``[2]`` tensor on the device) of one task,
        from one forward pass."""
        segments = [Segment(0, task.num_test, task.id)]
        given = task.id if give_task_id else None
        chunk = self._chunk(strategy, given)
        predicted = self._predictions(strategy, "test", task.test_index, segments, given, chunk, self.task_labels(task))
        hits = (predicted == task.test_targets[:, None]).sum(dim=0).double()
        return hits * (100.0 / max(1, task.num_test))

    def task_labels(self, task: Task) -> Tensor:
        """The output positions of ``task``'s own classes: the labels its targets use (in the class scenario,
        the task's global class positions); found once per task and run."""
        labels = self.labels.get(task.id)
        if labels is None:
            labels = torch.cat([task.train_targets, task.test_targets, task.val_targets]).unique()
            self.labels[task.id] = labels
        return labels

    @torch.no_grad()
    def class_accuracy(self, strategy: Strategy, task: Task, num_classes: int, give_task_id: bool) -> list[float]:
        """Per-class test accuracy (percent; NaN for a class absent from the set) on one evaluation set."""
        for module in strategy.eval_modules():
            module.eval()
        segments = [Segment(0, task.num_test, task.id)]
        given = task.id if give_task_id else None
        with self.trainer.autocast(evaluation=True):
            predicted = self._predictions(
                strategy, "test", task.test_index, segments, given, self._chunk(strategy, given)
            )
        targets = task.test_targets
        hits = (predicted == targets).float()
        correct = torch.bincount(targets, weights=hits, minlength=num_classes)[:num_classes]
        total = torch.bincount(targets, minlength=num_classes)[:num_classes].float()
        return (correct * 100.0 / total).cpu().tolist()

    @torch.no_grad()
    def validation_loss(self, strategy: Strategy, tasks: Sequence[Task]) -> Tensor:
        """Mean cross-entropy (a 0-d tensor) on the validation split of ``tasks``, in eval mode, through
        the strategy's training-time forward and the training autocast (as GPM's ``test`` on the
        validation set); read by the trainer's lr schedule, so it keeps no inputs."""
        trainer = self.trainer
        assert trainer.stream is not None
        for module in strategy.eval_modules():
            module.eval()
        total = torch.zeros((), device=trainer.stream.device)
        count = 0
        for task in tasks:
            for start in range(0, int(task.val_index.numel()), trainer.eval_batch_size):
                chosen = task.val_index[start : start + trainer.eval_batch_size]
                with trainer.autocast():
                    logits = strategy.forward(trainer.model_inputs("train", chosen, task.id), task.id)
                targets = task.val_targets[start : start + trainer.eval_batch_size]
                total += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
                count += int(chosen.numel())
        return total / max(1, count)

    def chunk_size(self) -> int:
        """Samples per evaluation forward pass where any batch will do: ``eval_batch_size``, grown while a
        chunk's prepared fp32 inputs stay within ``eval_chunk_mb``, if all evaluation inputs are kept
        (``eval_cache_mb``).

        Small inputs gain: a chunk of a few thousand runs an MLP's narrow later layers as larger, more
        efficient products and makes fewer Python round trips (28x28 images go 5,349 at a time at 16 MB),
        while large images, whose activations dominate memory, keep ``eval_batch_size``. Inputs prepared
        anew every row do not: building a 16 MB chunk each time (out of the CPU's caches) cost more than the
        larger products saved in ``benchmarks/runner_speed.py eval``'s uncached setup."""
        trainer = self.trainer
        assert trainer.stream is not None
        sample_bytes = 4 * math.prod(trainer.stream.input_shape)
        kept = int(trainer.stream.evaluation_plan.index.numel()) * sample_bytes <= trainer.eval_cache_mb * 2**20
        if not kept:
            return trainer.eval_batch_size
        return max(trainer.eval_batch_size, int(trainer.eval_chunk_mb * 2**20) // sample_bytes)

    def _chunk(self, strategy: Strategy, given: int | None) -> int:
        """Samples per evaluation forward pass: the strategy's own inference batch where it infers one task
        per batch (no task id given), else ``chunk_size``."""
        per_batch = strategy.inference_batch() if given is None else None
        return per_batch if per_batch is not None else self.chunk_size()

    @torch.no_grad()
    def _batched_row(self, strategy: Strategy, tasks: Sequence[Task]) -> Tensor:
        assert self.trainer.stream is not None
        plan = self.trainer.stream.evaluation_plan
        predicted = self._predictions(strategy, "test", plan.index, plan.segments, None, self.chunk_size())
        hits = (predicted == plan.targets).double()
        correct = torch.zeros(len(tasks), dtype=torch.float64, device=hits.device).index_add_(0, plan.owners, hits)
        return correct * 100.0 / plan.sizes.clamp(min=1)

    def _predictions(
        self,
        strategy: Strategy,
        split: str,
        index: Tensor,
        segments: Sequence[Segment],
        given: int | None,
        chunk: int,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Predicted classes for pool positions ``index`` in chunks of ``chunk`` samples (no grad, autocast).

        ``segments`` say which task each run of ``index`` belongs to. A chunk may span several runs (many
        small test sets in one forward pass); its inputs are built run by run, so each part takes the
        one-transform path of ``Stream.inputs`` instead of gathering a per-sample permutation table.
        Each chunk's prepared inputs are kept for the next call on the same ``index``
        tensor as the same tasks (a task's test set, the stream's evaluation plan: the inputs of every row
        of R) while they fit in ``eval_cache_mb``. The key holds ``index`` itself, so it cannot be confused
        with another tensor that later takes its address, and the segments' task ids, since tasks of a
        permuted stream share one test index. With ``allowed`` (output positions) the result is ``[N, 2]``:
        the plain argmax and the argmax over those classes alone, from the same logits."""
        chunks = []
        owners = tuple((seg.start, seg.stop, seg.task_id) for seg in segments)
        first = 0  # the first segment that may still overlap the current chunk
        for start in range(0, int(index.numel()), chunk):
            stop = start + chunk
            while segments[first].stop <= start:
                first += 1
            key = (split, index, owners, chunk, start)
            x = self.kept.get(key)
            if x is None:
                x = self._kept_form(strategy, self._chunk_inputs(split, index, segments[first:], start, stop), given)
                if self.kept_bytes + x.nbytes <= self.trainer.eval_cache_mb * 2**20:
                    self.kept[key] = x
                    self.kept_bytes += x.nbytes
            with self.trainer.autocast(evaluation=True):
                logits = strategy.predict(x, given)
            if allowed is None:
                chunks.append(logits.argmax(dim=1))
                continue
            blocked = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            blocked[allowed] = False
            within = logits.masked_fill(blocked, float("-inf")).argmax(dim=1)
            chunks.append(torch.stack([logits.argmax(dim=1), within], dim=1))
        return torch.cat(chunks) if chunks else index.new_empty(0)

    def _kept_form(self, strategy: Strategy, x: Tensor, given: int | None) -> Tensor:
        """Prepared evaluation inputs in the form they are kept and fed: under ``eval_amp``, in its dtype.

        Autocast rounds the inputs of the model's first matmul or convolution to its dtype anyway, so
        keeping them rounded halves the cache and skips that cast in every later row. A model that first
        works on its inputs in fp32 (an input normalisation, a mask) would see different values, so the
        first rows of the first prepared chunk of a run are sent through both ways, and rounded inputs are
        kept only if the logits are bit for bit the same; otherwise inputs stay fp32 for the rest of the run."""
        dtype = AMP_DTYPES.get(self.trainer.eval_amp or "")
        if dtype is None or not x.is_floating_point() or x.dtype == dtype or self.kept_rounded is False:
            return x
        rounded = x.to(dtype)
        if self.kept_rounded is None:
            probe = slice(0, PROBE_ROWS)
            with self.trainer.autocast(evaluation=True):
                exact, low = strategy.predict(x[probe], given), strategy.predict(rounded[probe], given)
            self.kept_rounded = torch.equal(exact, low)
        return rounded if self.kept_rounded else x

    def _chunk_inputs(self, split: str, index: Tensor, segments: Sequence[Segment], start: int, stop: int) -> Tensor:
        """The model inputs of positions ``index[start:stop]``, built segment by segment; a chunk spanning
        several segments has each written straight into its rows."""
        stream = self.trainer.stream
        assert stream is not None
        stop = min(stop, int(index.numel()))
        parts = []
        for segment in segments:
            if segment.start >= stop:
                break
            parts.append((max(segment.start, start), min(segment.stop, stop), segment.task_id))
        if len(parts) == 1:
            first, last, task_id = parts[0]
            return self.trainer.memory_format(stream.inputs(split, index[first:last], task_id))
        x = torch.empty((stop - start, *stream.input_shape), device=index.device)
        for first, last, task_id in parts:
            stream.inputs(split, index[first:last], task_id, out=x[first - start : last - start])
        return self.trainer.memory_format(x)
