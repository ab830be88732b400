"""The base every supermask strategy shares: layer swapping, per-task masks, task inference, storage.

SupSup, ExSSNeT, WSN and PackNet differ in how a task's mask is found and which weights it may train;
they share a model whose Linear / Conv2d layers are :class:`MaskedLayer` s and whose batch-norms are
per task, masks cached once a task is learned, evaluation with the task's own mask (GG), one-shot task
inference when no task id is given (Wortsman et al. 2020, "Supermasks in Superposition", Sec. 3.3), and
a guard that keeps every weight an earlier mask uses bit-identical while a task trains weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from clbench.frozen import FrozenPositions
from clbench.models import ContinualModel
from clbench.strategy import Strategy
from clbench.streams import Stream, Task, TaskIds
from clbench.trainer import Trainer
from strategies.supermasks.layers import MaskedLayer, TaskBatchNorm, convert_model, pack_bits, unpack_bits

INFERENCE = ("oneshot", "binary")


def output_entropy(logits: Tensor) -> Tensor:
    """Mean entropy of the softmax outputs, SupSup's task-inference objective."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


class SupermaskStrategy(Strategy):
    """Shared machinery of the supermask family; subclasses decide how a task's mask and weights train.

    Class attributes: ``score_layout`` (``per_task``, ``shared`` or ``none``), ``train_weights``
    (whether weights ever receive updates) and ``private_density`` (density of per-task heads; None:
    the strategy's density). Arguments common to all: ``density`` (fraction of weights a task's mask
    keeps), ``layer_density`` (``uniform`` or the ``er`` budget), ``weight_init`` (``signed_constant`` or
    ``default``), ``inference`` (``oneshot`` or ``binary``, used only when evaluation gives no task id),
    ``inference_batch_size`` (samples per inferred task id, in the runner's evaluation, where it is the
    chunk size, and in the reported task-inference accuracy) and ``task_oracle`` (give the task id at test
    time in the domain scenario too, SupSup's GG setting; recorded in the result as ``uses_task_oracle``).
    """

    scenarios: ClassVar[tuple[str, ...]] = ("task", "domain")
    score_layout: ClassVar[str] = "per_task"
    train_weights: ClassVar[bool] = False
    private_density: ClassVar[float | None] = None
    bias_mode: str = "refuse"  # what convert_model does with the model's biases: refuse | keep
    norm_mode: str = "per_task"  # and with its batch-norms: per_task (TaskBatchNorm) | keep

    def __init__(
        self,
        density: float = 0.1,
        layer_density: str = "uniform",
        weight_init: str = "signed_constant",
        inference: str = "oneshot",
        inference_batch_size: int = 1000,
        task_oracle: bool = False,
    ) -> None:
        super().__init__()
        if inference not in INFERENCE:
            raise ValueError(f"unknown strategy.inference {inference!r}: use one of {', '.join(INFERENCE)}")
        if inference_batch_size < 1:
            raise ValueError(f"strategy.inference_batch_size must be >= 1, got {inference_batch_size}")
        self.density = density
        self.layer_density = layer_density
        self.weight_init = weight_init
        self.inference = inference
        self.inference_batch_size = inference_batch_size
        self.uses_task_oracle = task_oracle  # type: ignore[misc]
        self.layers: list[MaskedLayer] = []
        self.norms: list[TaskBatchNorm] = []
        self.learned: list[int] = []
        self._guard = FrozenPositions()  # the weight phase's untrainable positions, written back after every step

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        """Swap the model's layers for masked ones and its batch-norms for per-task ones, in place."""
        super().setup(model, stream)
        self.layers = convert_model(
            model,
            len(stream),
            task_heads=stream.scenario == "task",
            density=self.density,
            density_rule=self.layer_density,
            scores=self.score_layout,
            weight_init=self.weight_init,
            train_weights=self.train_weights,
            private_density=self.private_density,
            biases=self.bias_mode,
            norms=self.norm_mode,
        )
        self.norms = [m for m in model.modules() if isinstance(m, TaskBatchNorm)]
        self.set_task(0)
        return model

    def set_task(self, task: int | None, alphas: Tensor | None = None) -> None:
        """Route every masked layer and batch-norm to ``task`` (None: mix the learned tasks by ``alphas``)."""
        for module in (*self.layers, *self.norms):
            module.task = task
            module.alphas = alphas
        for norm in self.norms:
            norm.mixed_tasks = self.learned

    def task_layers(self, task_id: int) -> list[MaskedLayer]:
        """The masked layers ``task_id`` uses (the body and its own or the shared head)."""
        return [layer for layer in self.layers if task_id in layer.owners]

    def score_parameters(self, task_id: int) -> list[nn.Parameter]:
        unique: dict[int, nn.Parameter] = {}
        for layer in self.task_layers(task_id):
            if len(layer.scores):
                score = layer.score(task_id)
                unique[id(score)] = score
        return list(unique.values())

    def weight_parameters(self, task_id: int) -> list[nn.Parameter]:
        return [layer.weight for layer in self.task_layers(task_id)]

    # -- training ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, task_ids: TaskIds) -> Tensor:
        if not isinstance(task_ids, int):
            raise ValueError(f"strategy {self.name!r} trains one task at a time (one mask per batch)")
        self.set_task(task_ids)
        return self.model(x, self.head_ids(task_ids))

    @contextlib.contextmanager
    def weight_phase(self, trainable: dict[MaskedLayer, Tensor]) -> Iterator[None]:
        """While inside, only the positions ``trainable[layer]`` (bool) of each layer's weight may change:
        their gradients pass, every other position is restored bit for bit after each optimizer step
        (momentum and weight decay would otherwise move them with a zero gradient)."""
        self._guard = FrozenPositions.of((layer.weight, mask) for layer, mask in trainable.items())
        for layer in trainable:
            layer.weight.requires_grad_(True)
        try:
            yield
        finally:
            for layer in trainable:
                layer.weight.requires_grad_(False)
                layer.weight.grad = None
            self._guard = FrozenPositions()

    def after_backward(self, task: Task) -> None:
        self._guard.mask_gradients()

    def after_step(self, task: Task) -> None:
        self._guard.restore()

    def after_task(self, task: Task) -> None:
        """Cache the task's masks once (evaluation never re-sorts scores) and mark the task learned."""
        for layer in self.task_layers(task.id):
            if task.id not in layer.masks:
                layer.cache_mask(task.id)
        if task.id not in self.learned:
            self.learned.append(task.id)
        self.set_task(task.id)

    # -- evaluation ----------------------------------------------------------------------------------
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        assert self.model is not None
        if task_id is None:
            task_id = self.infer_task(x)
        self.set_task(task_id)
        return self.model(x, self.head_ids(task_id))

    def inference_batch(self) -> int | None:
        return self.inference_batch_size

    def infer_task(self, x: Tensor) -> int:
        """The learned task whose mask best explains the batch ``x``: SupSup's one-shot algorithm
        (mix all masks with equal weights, take the task whose weight's entropy gradient is most
        negative) or its binary variant (keep the better half by the gradient until one is left)."""
        assert self.model is not None
        if len(self.learned) < 2:
            return self.learned[0] if self.learned else 0
        num = len(self.learned)
        # The runner evaluates under inference mode; the gradient w.r.t. the mixing weights needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()
            candidates = torch.ones(num, dtype=torch.bool, device=x.device)
            for _ in range(math.ceil(math.log2(num)) + 1):
                alphas = (candidates.float() / candidates.sum()).requires_grad_(True)
                self.set_task(None, alphas)
                (grad,) = torch.autograd.grad(output_entropy(self.model(x, None)), alphas)
                grad = grad.masked_fill(~candidates, float("inf"))
                if self.inference == "oneshot":
                    return self.learned[int(grad.argmin())]
                keep = math.ceil(int(candidates.sum()) / 2)
                candidates = torch.zeros_like(candidates)
                candidates[grad.topk(keep, largest=False).indices] = True
                if keep == 1:
                    break
        return self.learned[int(candidates.nonzero()[0])]

    def task_inference_accuracy(self) -> dict[str, Any]:
        """Percent of test batches (``inference_batch_size`` samples each) whose task is inferred right,
        over every learned task; weighted by batch size."""
        assert self.model is not None and self.stream is not None
        self.model.eval()
        per_task = []
        for task in self.stream:
            if task.id not in self.learned:
                continue
            correct = total = 0
            for start in range(0, task.test_index.numel(), self.inference_batch_size):
                index = task.test_index[start : start + self.inference_batch_size]
                with torch.no_grad():
                    x = self.stream.inputs("test", index, task.id)
                correct += int(self.infer_task(x) == task.id) * index.numel()
                total += index.numel()
            per_task.append(100.0 * correct / max(1, total))
        return {
            "method": self.inference,
            "batch_size": self.inference_batch_size,
            "accuracy": sum(per_task) / max(1, len(per_task)),
            "per_task": per_task,
            "units": "percent",
        }

    # -- reporting -----------------------------------------------------------------------------------
    def mask_storage(self) -> dict[str, Any]:
        """What the learned masks and the model cost to store: one bit per weight per task (packed into
        bytes per layer), and the float32 weights and the per-task batch-norm statistics once."""
        assert self.model is not None
        bits = [sum(layer.weight.numel() for layer in self.task_layers(t)) for t in self.learned]
        packed = [sum(pack_bits(layer.masks[t].bool()).numel() for layer in self.task_layers(t)) for t in self.learned]
        weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in self.layers)
        masked_ids = {id(layer.weight) for layer in self.layers} | {
            id(s) for layer in self.layers for s in layer.scores.values()
        }
        other_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in masked_ids)
        other_bytes += sum(b.numel() * b.element_size() for b in self.model.buffers())
        return {
            "tasks": list(self.learned),
            "mask_bits_per_task": bits,
            "mask_bytes_per_task_packed": packed,
            "mask_bytes_total_packed": sum(packed),
            "weight_bytes_float32": weight_bytes,
            "other_bytes": other_bytes,
            "total_model_bytes": weight_bytes + sum(packed) + other_bytes,
            "note": "scores are training state, not needed at test time, and not counted",
        }

    def extra_results(self) -> dict[str, Any]:
        results: dict[str, Any] = {"mask_storage": self.mask_storage()}
        assert self.stream is not None
        if self.stream.scenario != "task" and not self.uses_task_oracle:
            results["task_inference"] = self.task_inference_accuracy()
        return results

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        masks = [{t: pack_bits(m.bool()) for t, m in layer.masks.items()} for layer in self.layers]
        return {"model": self.model.state_dict(), "masks": masks, "learned": list(self.learned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None
        self.model.load_state_dict(state["model"])
        for layer, packed in zip(self.layers, state["masks"], strict=True):
            for t, bits in sorted(packed.items()):
                layer.set_mask(t, unpack_bits(bits.to(layer.weight.device), layer.weight.shape))
        self.learned = list(state["learned"])
        self.set_task(self.learned[-1] if self.learned else 0)


@contextlib.contextmanager
def trainer_lr(trainer: Trainer, lr: float | None) -> Iterator[None]:
    """Run a phase with its own learning rate (ExSSNeT's weight phase), restoring the trainer's after."""
    saved = trainer.lr
    if lr is not None:
        trainer.lr = lr
    try:
        yield
    finally:
        trainer.lr = saved


def choose_by_variant(accs: Sequence[float], chance: float, variant: str) -> list[int]:
    """ExSSNeT's KKT choice over earlier tasks' k-NN accuracies: ``best`` (the argmax if it beats
    chance), ``all`` (every task that beats chance) or ``always`` (the argmax regardless)."""
    if not accs:
        return []
    best = max(range(len(accs)), key=lambda i: accs[i])
    if variant == "best":
        return [best] if accs[best] > chance else []
    if variant == "all":
        return [i for i, a in enumerate(accs) if a > chance]
    if variant == "always":
        return [best]
    raise ValueError(f"unknown strategy.knn {variant!r}: use off, best, all or always")
