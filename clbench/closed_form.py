"""Closed-form training steps for ReLU MLPs (``trainer.closed_form``): gradients written out, no autograd.

On a CPU a small-batch step of an MLP is dominated by per-operation overhead, and autograd adds its own:
recording the graph in the forward pass, then walking it node by node. For clbench's :class:`MLP`
(Flatten, then Linear + ReLU layers, then linear heads) trained with plain cross-entropy the backward
pass is a handful of matrix products that can be written down directly:

    delta_head = (softmax(logits) - onehot(y)) / B
    grad W_l = delta_l^T h_{l-1},  grad b_l = sum_rows(delta_l),  delta_{l-1} = (delta_l W_l) * [h_{l-1} > 0]

At batch 10 (GPM's PMNIST protocol, MLP 784-100-100-10) the hand-written step takes about a third less
time than the autograd one on this project's 2-core CPU (152 vs 237 us per step without projection,
``benchmarks/results/gpm_step_floor.md``). The step leaves ``.grad`` of every parameter the forward used,
exactly as ``loss.backward()`` after ``zero_grad(set_to_none=True)`` would (up to float rounding), so the
strategy's ``after_backward`` / ``after_step`` and the optimizer run unchanged (under ``torch.no_grad``: the
trainer runs a closed-form fit's whole step loop without autograd, saving two grad-mode switches a step).

A strategy opts in with ``closed_form_safe = True`` in its own class (not inherited) when its training
loss is ``Strategy.loss`` (cross-entropy) on ``Strategy.forward`` (the model's own forward) and its
hooks need nothing autograd provides beyond ``.grad``: no module or tensor hooks. A strategy that
catches per-layer factors with hooks (GPM's projection) gets them from ``Strategy.linear_gradient``
instead, called for every linear layer with its input and output gradient, and may return that layer's
gradient itself (GPM: projected from the factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.models.heads import ContinualModel
from clbench.models.mlp import MLP
from clbench.strategy import Batch, Strategy

if TYPE_CHECKING:
    from clbench.optim import FitOptimizer
    from clbench.streams import Task

BODY_TYPES = (nn.Flatten, nn.Linear, nn.ReLU)


def closed_form_obstacle(model: ContinualModel, strategy: Strategy, amp: str | None, compiled: bool) -> str | None:
    """Why a closed-form step cannot train ``model`` with ``strategy`` (None: it can)."""
    if not strategy.declares("closed_form_safe"):
        return f"strategy {strategy.name!r} does not declare closed_form_safe"
    if type(strategy).loss is not Strategy.loss or type(strategy).forward is not Strategy.forward:
        return f"strategy {strategy.name!r} overrides its loss or forward pass"
    if type(model) is not MLP:
        return f"the model is a {type(model).__name__}, not clbench's MLP"
    if any(not isinstance(m, BODY_TYPES) for m in model.body):
        return "the MLP body holds layers other than Flatten, Linear and ReLU"
    if amp is not None:
        return "trainer.amp is set"
    if compiled:
        return "trainer.compile is set"
    return None


def use_closed_form(
    setting: bool | str,
    model: ContinualModel,
    strategy: Strategy,
    device: torch.device,
    amp: str | None,
    compiled: bool,
) -> bool:
    """Resolve ``trainer.closed_form``: ``auto`` on a CPU where it applies (on a GPU, whole-step CUDA graphs
    remove the per-operation overhead instead); ``true`` demands it (a one-line error naming why it cannot
    apply); ``false`` never."""
    obstacle = closed_form_obstacle(model, strategy, amp, compiled)
    if setting == "auto":
        return device.type == "cpu" and obstacle is None
    if setting and obstacle is not None:
        raise ValueError(f"trainer.closed_form=true cannot apply: {obstacle}; set trainer.closed_form=false")
    return bool(setting)


@dataclass
class ClosedFormStep:
    """The forward pass and gradients of ``model`` (a :class:`MLP`) on one batch under cross-entropy.

    Built per ``fit`` by :meth:`for_fit` with the fit's head resolved once (a fit whose batches mix tasks
    with per-task heads has no single head: it takes autograd steps). It keeps the layers' parameter
    tensors (updated in place by the optimizer) to spare module attribute lookups in every step.
    ``__call__`` writes the gradients and returns the logits (no autograd history). It computes no loss:
    the trainer reads each step's cross-entropy and prediction back from the kept logits once per block of
    steps, in a few large operations instead of five small ones per step."""

    model: MLP
    strategy: Strategy
    head: tuple[nn.Linear, Tensor, Tensor | None]

    def __post_init__(self) -> None:
        self.body = [(m, m.weight, m.bias) for m in self.model.body if isinstance(m, nn.Linear)]
        self.layers = [*self.body, self.head]
        self.custom_gradients = type(self.strategy).linear_gradient is not Strategy.linear_gradient
        self._minus_one: dict[tuple[int, torch.device], Tensor] = {}

    @classmethod
    def for_fit(cls, model: MLP, strategy: Strategy, task_ids: int | Tensor) -> ClosedFormStep | None:
        """The step for a fit on ``task_ids`` (an int, or every sample's id); None where those batches would
        mix tasks with per-task heads (then no single head is trained)."""
        heads = [(m, m.weight, m.bias) for m in model.heads.heads]
        chosen = strategy.head_ids(task_ids) if len(heads) > 1 else None
        if chosen is None:
            return cls(model, strategy, heads[0])
        return cls(model, strategy, heads[chosen]) if isinstance(chosen, int) else None

    def minus_one(self, rows: int, device: torch.device) -> Tensor:
        """A cached ``[rows, 1]`` column of -1 (subtracts the one-hot target in one scatter)."""
        key = (rows, device)
        if key not in self._minus_one:
            self._minus_one[key] = torch.full((rows, 1), -1.0, device=device)
        return self._minus_one[key]

    def __call__(self, batch: Batch, absent: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """Write the gradients of the mean cross-entropy on ``batch`` (logits of ``absent`` classes pushed
        to the minimum, as the trainer's autograd step does) into ``.grad``; return the logits, written
        into ``out`` when given. Runs without autograd whether or not the caller disabled it."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._step(batch, absent, out)
        return self._step(batch, absent, out)

    def train_step(
        self, batch: Batch, task: Task, absent: Tensor | None, optimizer: FitOptimizer, logits: Tensor
    ) -> None:
        """One training step as the trainer's autograd step takes it (the same hooks around the same
        optimizer update), with the gradients written out; the logits go into ``logits`` (the step's rows
        of the block's buffer, see :class:`KeptLogits`). The trainer runs it under ``torch.no_grad``."""
        optimizer.zero_grad(set_to_none=True)
        self(batch, absent, logits)
        self.strategy.after_backward(task)
        optimizer.step()
        self.strategy.after_step(task)

    def _step(self, batch: Batch, absent: Tensor | None, out: Tensor | None) -> Tensor:
        layers = self.layers
        activations = [batch.x.flatten(1)]  # each layer's input
        for _, weight, bias in self.body:
            activations.append(F.linear(activations[-1], weight, bias).relu_())
        logits = F.linear(activations[-1], self.head[1], self.head[2])
        if absent is not None:
            logits.masked_fill_(absent, torch.finfo(logits.dtype).min)
        if out is not None:
            logits = out.copy_(logits)
        rows, target = batch.y.shape[0], batch.y.unsqueeze(1)
        delta = logits.softmax(dim=1).scatter_add_(1, target, self.minus_one(rows, logits.device)).div_(rows)
        for depth in range(len(layers) - 1, -1, -1):
            module, weight, bias = layers[depth]
            inputs = activations[depth]
            given = self.strategy.linear_gradient(module, inputs, delta, batch) if self.custom_gradients else None
            if given is not None:
                weight.grad = given if bias is None else given[:, :-1].contiguous()
                if bias is not None:
                    bias.grad = given[:, -1].contiguous()
            else:
                if weight.requires_grad:
                    weight.grad = delta.T @ inputs
                if bias is not None and bias.requires_grad:
                    bias.grad = delta.sum(dim=0)
            if depth > 0:  # through W, then ReLU's gate (its output is the next layer's input)
                delta = torch.ops.aten.threshold_backward(delta @ weight, inputs, 0)
        return logits


@dataclass
class KeptLogits:
    """One epoch's closed-form steps keep their logits here, a block of steps at a time; ``settle`` turns the
    kept ones into each step's loss (the mean cross-entropy over its rows, as ``Strategy.loss``) and
    predicted classes in a few large operations, instead of five small ones in every step.

    ``targets`` are the epoch's targets in step order; ``step_losses`` ([steps]) and ``predictions``
    ([samples]) are the epoch's outputs, written in place. Every step has ``batch_size`` rows but possibly
    the epoch's last, whose loss is the mean over its own rows."""

    batch_size: int
    targets: Tensor
    step_losses: Tensor
    predictions: Tensor
    buffer: Tensor | None = None
    first: int = 0  # the block's first step
    settled: int = 0  # steps before this one are stored

    def start_block(self, step: int, rows: int, head_weight: Tensor) -> None:
        """Settle the previous block; keep room for ``rows`` logits from step ``step`` on."""
        self.settle(step)
        self.buffer = head_weight.new_empty((rows, head_weight.shape[0]))
        self.first = step

    def rows(self, chosen: slice) -> Tensor:
        """The buffer's rows for the step whose samples are ``chosen`` (epoch positions)."""
        assert self.buffer is not None, "start_block must come first"
        offset = self.first * self.batch_size
        return self.buffer[chosen.start - offset : chosen.stop - offset]

    def settle(self, stop: int) -> None:
        """Store the loss and predictions of the kept steps before ``stop`` (all in the current block)."""
        if self.buffer is None or stop <= self.settled:
            return
        size = self.batch_size
        lo, hi = self.settled * size, min(stop * size, self.targets.shape[0])
        offset = self.first * size
        logits = self.buffer[lo - offset : hi - offset]
        per_sample = F.cross_entropy(logits, self.targets[lo:hi], reduction="none")
        self.predictions[lo:hi] = logits.argmax(dim=1)
        count = stop - self.settled
        padded = per_sample.new_zeros(count * size)
        padded[: hi - lo] = per_sample
        sums = padded.view(count, size).sum(dim=1)
        self.step_losses[self.settled : stop - 1] = sums[:-1] / size
        self.step_losses[stop - 1] = sums[-1] / (hi - lo - (count - 1) * size)  # the last step's own rows
        self.settled = stop
