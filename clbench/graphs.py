"""Whole-step CUDA graphs (``trainer.cuda_graphs``): one training step recorded once, replayed per batch.

At tiny batches a step is dozens of small kernels (forward, loss, backward, the strategy's gradient
surgery, the optimizer update) whose launches cost the host more than the GPU spends running them: GPM's
PMNIST protocol (batch 10) is such a case. A CUDA graph launches the whole recorded step at once. The
graph reads its batch from fixed ("static") tensors, so each step copies its batch there and replays.

What a replay repeats is only the kernels: Python in the hooks runs once, at capture. A step can be
recorded only if its hooks read nothing back to the host and take the same Python path on every step of
a task; strategies say so with ``graph_safe = True`` (see :func:`check_graph_safe`). The first
``warmup`` steps of every ``fit`` run eagerly on a side stream (they are ordinary training steps, on the
real batches): they create lazily built state (momentum buffers, cuBLAS handles) so that the recorded
step is the steady-state one. A batch of another size (the last, ragged one of an epoch) runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from clbench.strategy import Batch, Strategy

Step = Callable[[Batch], tuple[Tensor, Tensor]]


@cache
def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for every warm-up, reused across fits: cuBLAS keeps a workspace (tens of
    MB) for each stream it has run on, for the life of the process, so a new stream per task would leak
    one workspace per task (100 tasks: +2 GB)."""
    return torch.cuda.Stream(device)


def use_graphs(setting: bool | str, strategy: Strategy, device: torch.device, compiled: bool) -> bool:
    """Resolve ``trainer.cuda_graphs``: ``auto`` records where it applies (a CUDA device, a strategy that
    declares graph-safe steps, no ``trainer.compile``, which records graphs of its own); ``true`` demands
    it (a one-line error where it cannot apply); ``false`` never."""
    if setting == "auto":
        return device.type == "cuda" and strategy.declares("graph_safe") and not compiled
    if setting:
        check_graph_safe(strategy, device)
        if compiled:
            raise ValueError("trainer.cuda_graphs=true and trainer.compile cannot be combined: set one of them off")
    return bool(setting)


def check_graph_safe(strategy: Strategy, device: torch.device) -> None:
    """Raise a one-line error where ``trainer.cuda_graphs=true`` cannot apply."""
    if device.type != "cuda":
        raise ValueError(f"trainer.cuda_graphs=true needs device=cuda (this run is on {device}): set it to false")
    if not strategy.declares("graph_safe"):
        raise ValueError(
            f"strategy {strategy.name!r} does not declare graph-safe training steps: run it with "
            "trainer.cuda_graphs=false (or set graph_safe = True in its class once its hooks are capture-safe)"
        )


@dataclass
class GraphedStep:
    """Runs ``step`` (the eager training step, returning the detached loss and the predicted classes)
    eagerly for ``warmup`` calls, then records it in a CUDA graph and replays it for every batch of the
    recorded shape. ``key`` (e.g. the learning rate, which the optimizer bakes into the recorded update)
    changing forces a new recording."""

    step: Step
    zero_grad: Callable[[], None]
    warmup: int = 3
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    key: object = None
    static: Batch | None = None
    outputs: tuple[Tensor, Tensor] | None = None
    replays: int = 0
    captures: int = 0

    def __call__(self, batch: Batch, key: object = None) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.graph is not None and key != self.key:
            self.release()
        if self.graph is None:
            if self.calls <= self.warmup:
                return self._eager_on_side_stream(batch)
            self._capture(batch, key)
        if not self._fits(batch):
            return self.step(batch)  # another shape (the ragged last batch): eagerly
        assert self.static is not None and self.graph is not None and self.outputs is not None
        self.static.x.copy_(batch.x)
        self.static.y.copy_(batch.y)
        self.static.index.copy_(batch.index)
        if isinstance(self.static.task_ids, Tensor):
            self.static.task_ids.copy_(batch.task_ids)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _fits(self, batch: Batch) -> bool:
        """Whether the recording computes this batch: the same shapes, and the same task id where it is
        one int (the recorded Python took its branches for that id)."""
        assert self.static is not None
        recorded = self.static.task_ids
        if isinstance(recorded, Tensor) != isinstance(batch.task_ids, Tensor) or batch.x.shape != self.static.x.shape:
            return False
        return isinstance(recorded, Tensor) or batch.task_ids == recorded

    def _eager_on_side_stream(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """An ordinary step, on a side stream as PyTorch asks of the steps before a capture."""
        device = batch.x.device
        side = warmup_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            result = self.step(batch)
        torch.cuda.current_stream(device).wait_stream(side)
        return result

    def _capture(self, batch: Batch, key: object) -> None:
        """Record the step on a copy of ``batch`` (recording computes nothing; the replay that follows
        does)."""
        static = Batch(
            batch.x.clone(),
            batch.y.clone(),
            batch.task_ids.clone() if isinstance(batch.task_ids, Tensor) else batch.task_ids,
            batch.index.clone(),
        )
        # backward must allocate fresh gradients inside the graph (a replay then overwrites them);
        # gradients left from an eager step would be accumulated into, on every replay
        self.zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(static.x.device), torch.cuda.graph(graph):
                outputs = self.step(static)
        except RuntimeError as error:
            raise RuntimeError(
                f"the training step could not be recorded as a CUDA graph ({str(error).splitlines()[0]}): "
                "run with trainer.cuda_graphs=false"
            ) from error
        self.graph, self.static, self.outputs, self.key = graph, static, outputs, key
        self.captures += 1

    def release(self) -> None:
        """Drop the recording (its memory pool goes with the last tensor that points into it)."""
        self.graph, self.static, self.outputs = None, None, None
        self.zero_grad()
