"""SPU, Selective Parameter Update (Zhang, Janson, Aljundi & Elhoseiny, "Overcoming Generic Knowledge Loss with
Selective Parameter Update", CVPR 2024, arXiv 2308.12462): a pretrained model learns each new task by updating only
a sparse, task-relevant set of weights in the first linear layer of every transformer MLP block, so the generic
knowledge from pretraining (measured on a control set, :mod:`clbench.control`) survives.

Sources. The paper's abstract and method overview, the authors' project page and their official code
(github.com/wx-zhang/spu: ``trainer/spu.py``, ``trainer/finetune.py``, ``config/baseline/spu.yaml``,
``config/base.yaml``, ``dataset/cifar100.py``). The full text of the paper was not available here, so where the
paper's words and the code could differ, this file follows the code, and says so.

Per task (:meth:`SPU.fit_task`):

1. Localisation. The candidates are the weights of the linear layers named by ``layers`` (``fc1``: the first
   layer of each ViT MLP block, ``blocks.<i>.mlp.fc1``; the code's ``edit_layer: c_fc``). A plain MLP is one MLP
   block, so the default list also names clbench's MLP's first layer (``body.1``); any list of names or name
   suffixes works (``strategy.layers=[body.1,body.3]``). Every other body weight stays fixed for the whole stream.
2. Score (the paper's gradient-based scoring function; :func:`gradient_scores`). On the task's training data,
   s_ij = |sum over batches b of d L_b / d W_ij|, the magnitude of the accumulated gradient, with L_b the batch
   mean of ``score``: ``output_norm`` (the code's choice: the squared L2 norm of the model's output, ||f(x)||^2,
   MAS-like and label-free) or ``loss`` (the training cross-entropy). As in the code: the model in train mode;
   the first ``score_batches`` fraction of the task's batches (code: ``score_batch_percentage: 0.25``), continued
   past it while any candidate's accumulated gradient is still exactly zero (the code's stop rule, < 1e-12). Each
   batch's gradient counts once; the code never zeroes ``.grad`` between its batches and adds the running total
   each time, which weights batch b of B by (B - b + 1): taken as unintended, since the paper and the project page
   describe a plain accumulation.
3. Selection. Per layer, the top ``fraction`` of its weights by score (k = floor(fraction * numel), the code's
   ``selection_rate: 0.1``; per layer, not global, as the code's per-tensor top-k). ``selection: random`` draws k
   weights per layer uniformly instead (the issue's ablation: a random mask of the same size).
4. Update. Only the selected weights change: their gradients are masked after every backward pass (the code's
   ``param.grad = mask * param.grad``), and after every optimizer step the unselected weights are written back
   from a copy taken at the start of the task. The write-back is a choice of ours: the code's AdamW applies its
   decoupled weight decay (0.2) to the unselected weights too (they shrink by lr * wd per step); here momentum,
   Adam's moments and weight decay can never move an unselected weight (bit-identical, tested). The biases of the
   localised layers are updated in full (the code's ``full_update_param: ['bias', ...]``; ``update_bias``), and so
   is the classifier: the code updates CLIP's projection into the text space (``visual.proj``) in full and, its
   ``c_fc`` filter matching both towers, the text tower's MLP layers as well; here the heads, which play the
   classifier's part, are trained in full (every head: in the task scenario an old task's head learns from its
   replayed samples, and a head that gets no gradient is not stepped).
5. Replay (the paper's protocol uses a buffer; ``buffer_size: 0`` is the buffer-free variant). A task-balanced
   buffer of ``buffer_size`` training samples: after each task, every stored task is cut to
   ``buffer_size // tasks`` random samples and the new task adds as many (the code's ``update_buffer``). During a
   task, each step also draws a batch of ``replay_batch_size`` (null: the trainer's) from the buffer, cycling
   through it in a fresh random order, and the loss is the cross-entropy over the current and the replayed samples
   together (the code concatenates the two batches); replay starts at epoch ``replay_from_epoch`` of the task (the
   code: from the second epoch, ``epoch > 0``). The score in step 2 uses the current task only (as the code).

Choices where the sources are silent: the replayed samples keep their own task's head in the task scenario; the
mask is recomputed from scratch for every task (the code overwrites it), so a weight selected for an earlier task
may be left alone later; ``kept_bytes`` counts the buffer as indices (the images stay in the stream's pool).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.frozen import FrozenPositions
from clbench.models import ContinualModel
from clbench.schema import AtLeast, Range
from clbench.strategy import Batch, Strategy
from clbench.streams import Stream, Task
from clbench.trainer import Trainer

SELECTIONS = ("score", "random")
SCORES = ("output_norm", "loss")
ZERO = 1e-12  # the official code's threshold for a gradient that has not been seen yet


def candidate_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Linear]:
    """The body's linear layers whose dotted name is one of ``layers`` or ends with ``.<one of them>`` (``fc1``
    matches ``blocks.3.mlp.fc1``); the heads are never candidates. A one-line error lists the linear layers there
    are when nothing matches."""
    heads = getattr(model, "heads", None)
    head_modules = {id(m) for m in heads.modules()} if isinstance(heads, nn.Module) else set()
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in head_modules
    }
    chosen = {name: module for name, module in linear.items() if any(_matches(name, wanted) for wanted in layers)}
    if not chosen:
        raise ValueError(
            f"strategy.layers={list(layers)} matches no linear layer of {type(model).__name__}; its linear layers are "
            f"{', '.join(linear) or 'none'}: set strategy.layers to some of them"
        )
    return chosen


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith(f".{wanted}")


def top_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """A bool mask of the floor(fraction * numel) largest ``scores`` (ties broken by ``torch.topk``)."""
    k = int(scores.numel() * fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k).indices] = True
    return mask.view_as(scores)


def random_mask(like: Tensor, fraction: float) -> Tensor:
    """A bool mask of floor(fraction * numel) entries drawn uniformly (torch's global generator, seeded by the run)."""
    k = int(like.numel() * fraction)
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    mask[torch.randperm(like.numel(), device=like.device)[:k]] = True
    return mask.view_as(like)


class SPU(Strategy):
    """Selective Parameter Update: per task, train only the top-``fraction`` weights (by a gradient score on the
    task's data) of the localised layers, their biases and the heads, with a task-balanced replay buffer. See the
    module docstring for the paper's steps and every choice made here."""

    name = "spu"

    def __init__(
        self,
        fraction: Annotated[float, Range(0, 1, low_open=True)] = 0.1,
        layers: Sequence[str] = ("fc1", "body.1"),
        selection: str = "score",
        score: str = "output_norm",
        score_batches: Annotated[float, Range(0, 1, low_open=True)] = 0.25,
        update_bias: bool = True,
        buffer_size: Annotated[int, AtLeast(0)] = 200,
        replay_batch_size: Annotated[int, AtLeast(1)] | None = None,
        replay_from_epoch: Annotated[int, AtLeast(0)] = 1,
    ) -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"unknown strategy.selection {selection!r}: use one of {', '.join(SELECTIONS)}")
        if score not in SCORES:
            raise ValueError(f"unknown strategy.score {score!r}: use one of {', '.join(SCORES)}")
        if not 0 < fraction <= 1 or not 0 < score_batches <= 1:
            raise ValueError(
                f"strategy.fraction and strategy.score_batches must be in (0, 1], got {fraction}, {score_batches}"
            )
        if isinstance(layers, str) or not layers:
            raise ValueError(f"strategy.layers must be a non-empty list of layer names, got {layers!r}")
        self.fraction, self.layers = float(fraction), [str(name) for name in layers]
        self.selection, self.score = selection, score
        self.score_batches, self.update_bias = float(score_batches), bool(update_bias)
        self.buffer_size, self.replay_batch_size = int(buffer_size), replay_batch_size
        self.replay_from_epoch = int(replay_from_epoch)
        # kept between tasks (state_dict): the replay buffer (pool positions, targets, task ids) and the masks
        self.buffer_index = torch.zeros(0, dtype=torch.long)
        self.buffer_targets = torch.zeros(0, dtype=torch.long)
        self.buffer_tasks = torch.zeros(0, dtype=torch.long)
        self.masks: dict[str, Tensor] = {}  # the last task's masks, by layer name
        self.selected: list[dict[str, float]] = []  # per task: fraction selected, overlap with the previous mask
        # during a task only
        self._candidates: dict[str, nn.Linear] = {}
        self._frozen = FrozenPositions()  # the unselected weights, written back after every step
        self._step = 0
        self._replay_start = 0
        self._replay_order: Tensor | None = None
        self._replay_next = 0
        self._replay_batch = 1

    # -- set-up ------------------------------------------------------------------------------------------------
    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        self._candidates = candidate_layers(model, self.layers)  # before training: a bad name is exit code 2
        device = stream.device
        self.buffer_index = self.buffer_index.to(device)
        self.buffer_targets = self.buffer_targets.to(device)
        self.buffer_tasks = self.buffer_tasks.to(device)
        return model

    def parameters(self, task: Task) -> list[nn.Parameter]:
        """The localised layers (masked to the selection during the task), their biases and every head."""
        assert self.model is not None
        params: list[nn.Parameter] = []
        for layer in self._candidates.values():
            params.append(layer.weight)
            if self.update_bias and layer.bias is not None:
                params.append(layer.bias)
        return [*params, *self.model.heads.parameters()]

    # -- per task ----------------------------------------------------------------------------------------------
    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.model is not None
        previous = self.masks
        if self.selection == "score":
            scores = gradient_scores(self, task, trainer.batch_size)
            self.masks = {name: top_fraction_mask(value, self.fraction) for name, value in scores.items()}
        else:
            self.masks = {name: random_mask(layer.weight, self.fraction) for name, layer in self._candidates.items()}
        self.selected.append(self._selection_record(previous))
        self._frozen = FrozenPositions.of((layer.weight, self.masks[name]) for name, layer in self._candidates.items())
        self._step, self._replay_order, self._replay_next = 0, None, 0
        self._replay_start = self.replay_from_epoch * math.ceil(task.num_train / trainer.batch_size)
        self._replay_batch = self.replay_batch_size or trainer.batch_size
        trainer.fit(self, [task])

    def _selection_record(self, previous: dict[str, Tensor]) -> dict[str, float]:
        total = sum(mask.numel() for mask in self.masks.values())
        chosen = sum(int(mask.sum()) for mask in self.masks.values())
        record = {"selected_fraction": chosen / total}
        if previous:
            shared = sum(int((mask & previous[name]).sum()) for name, mask in self.masks.items())
            record["overlap_with_previous"] = shared / max(1, chosen)
        return record

    def after_backward(self, task: Task) -> None:
        self._frozen.mask_gradients()

    def after_step(self, task: Task) -> None:
        self._frozen.restore()
        self._step += 1

    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        if self.buffer_index.numel() == 0 or self._step < self._replay_start:
            return F.cross_entropy(output, y)
        assert self.model is not None and self.stream is not None
        chosen = self._next_replay()
        task_ids = self.buffer_tasks[chosen]
        x = self.stream.inputs("train", self.buffer_index[chosen], task_ids)
        replay_output = self.model(x, self.head_ids(task_ids))
        total = F.cross_entropy(output, y, reduction="sum") + F.cross_entropy(
            replay_output, self.buffer_targets[chosen], reduction="sum"
        )
        return total / (y.numel() + chosen.numel())

    def _next_replay(self) -> Tensor:
        """The next replay batch's buffer positions: through the buffer in a random order, a new order per pass
        (the official code's shuffled buffer loader, restarted when exhausted)."""
        size = self.buffer_index.numel()
        if self._replay_order is None or self._replay_next >= size:
            self._replay_order = torch.randperm(size, device=self.buffer_index.device)
            self._replay_next = 0
        chosen = self._replay_order[self._replay_next : self._replay_next + self._replay_batch]
        self._replay_next += self._replay_batch
        return chosen

    def after_task(self, task: Task) -> None:
        self._frozen, self._replay_order = FrozenPositions(), None
        if self.buffer_size > 0:
            self._update_buffer(task)

    def _update_buffer(self, task: Task) -> None:
        """Task-balanced: each stored task keeps ``buffer_size // tasks`` random samples, the new task adds as many."""
        tasks = int(self.buffer_tasks.unique().numel()) + 1
        per_task = self.buffer_size // tasks
        keep = []
        for old in self.buffer_tasks.unique().tolist():
            positions = torch.nonzero(self.buffer_tasks == old).flatten()
            keep.append(positions[torch.randperm(positions.numel(), device=positions.device)[:per_task]])
        kept = torch.cat(keep) if keep else self.buffer_index.new_zeros(0)
        new = torch.randperm(task.num_train, device=task.train_index.device)[:per_task]
        self.buffer_index = torch.cat([self.buffer_index[kept], task.train_index[new]])
        self.buffer_targets = torch.cat([self.buffer_targets[kept], task.train_targets[new]])
        self.buffer_tasks = torch.cat([self.buffer_tasks[kept], torch.full_like(new, task.id)])

    # -- results and state -------------------------------------------------------------------------------------
    def extra_results(self) -> dict[str, Any]:
        assert self.model is not None
        candidates = sum(layer.weight.numel() for layer in self._candidates.values())
        # per layer floor(fraction * numel), as top_fraction_mask and random_mask select (not floor of the sum)
        selected = sum(int(layer.weight.numel() * self.fraction) for layer in self._candidates.values())
        biases = sum(
            layer.bias.numel() for layer in self._candidates.values() if self.update_bias and layer.bias is not None
        )
        heads = sum(p.numel() for p in self.model.heads.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {
            "spu": {
                "layers": list(self._candidates),
                "selection": self.selection,
                "score": self.score,
                "candidate_weights": candidates,
                "selected_weights_per_task": selected,
                "trained_fraction_of_model": (selected + biases + heads) / total,
                "per_task": self.selected,
                "buffer_size": int(self.buffer_index.numel()),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        return {
            "model": self.model.state_dict(),
            "buffer": (self.buffer_index, self.buffer_targets, self.buffer_tasks),
            "masks": dict(self.masks),
            "selected": list(self.selected),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None
        self.model.load_state_dict(state["model"])
        self.buffer_index, self.buffer_targets, self.buffer_tasks = state["buffer"]
        self.masks = dict(state["masks"])
        self.selected = list(state["selected"])

    def kept_bytes(self) -> int:
        buffer = (self.buffer_index, self.buffer_targets, self.buffer_tasks)
        return sum(t.numel() * t.element_size() for t in (*buffer, *self.masks.values()))


def gradient_scores(strategy: SPU, task: Task, batch_size: int) -> dict[str, Tensor]:
    """Per localised layer, s = |sum over batches of the gradient of the batch-mean score loss| on ``task``'s
    training data (module docstring, step 2): the first ``score_batches`` of the batches, then on while any entry's
    accumulated gradient is still below 1e-12 in magnitude. The model's parameters are left as they were."""
    model = strategy.model
    assert model is not None
    weights = {name: layer.weight for name, layer in strategy._candidates.items()}
    accumulated = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    num_batches = math.ceil(task.num_train / batch_size)
    enough = max(1, math.ceil(strategy.score_batches * num_batches))
    was_training = model.training
    model.train()
    for count, (x, y) in enumerate(strategy.stream.train_batches(task, batch_size), start=1):
        output = model(x, strategy.head_ids(task.id))
        loss = output.pow(2).sum(dim=1).mean() if strategy.score == "output_norm" else F.cross_entropy(output, y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads, strict=True):
            accumulated[name].add_(grad)
        if count >= enough and all(bool((value.abs() >= ZERO).all()) for value in accumulated.values()):
            break
    model.train(was_training)
    return {name: value.abs() for name, value in accumulated.items()}
