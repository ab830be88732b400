"""PackNet: train, prune, retrain, freeze (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a
Single Network by Iterative Pruning"; official code arunmallya/packnet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clbench.models import ContinualModel
from clbench.streams import Stream, Task, TaskIds
from clbench.trainer import Trainer
from strategies.supermasks.base import SupermaskStrategy
from strategies.supermasks.layers import MaskedLayer, num_kept

SHARED_PARAMS = ("first_task", "per_task_norms")


class PackNet(SupermaskStrategy):
    """Task t trains every still-free weight (earlier tasks' weights are used but frozen), then keeps the
    ``1 - prune`` largest-magnitude of those free weights in each shared layer, zeroes and releases the
    rest for later tasks, and retrains the kept ones for ``retrain_epochs`` (None: as many epochs as the
    first phase). Task t's mask is every weight owned by tasks 0..t; an ``owner`` map (0 = free) holds
    them all. Per-task heads are task-private and not pruned.

    ``shared_params`` decides the parameters that are not masked weights. ``first_task`` (the default, the
    paper's and the official code's): the model's biases and batch-norms (affine, with their running
    statistics where the model keeps them) are trained with the first task and frozen afterwards (the
    official ``train_biases`` / ``train_bn`` off after the first task; its batch-norms then run in eval
    mode). ``per_task_norms``: no biases (a model with biases is refused) and one non-affine batch-norm per
    task, as SupSup's ``MultitaskNonAffineBN``: an addition to PackNet that gives every task its own
    normalisation statistics.
    """

    name = "packnet"
    score_layout = "none"
    private_density = 1.0

    def __init__(
        self,
        prune: float = 0.75,
        retrain_epochs: int | None = None,
        shared_params: str = "first_task",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("weight_init", "default")
        super().__init__(density=1.0, **kwargs)
        if not 0.0 <= prune < 1.0:
            raise ValueError(f"strategy.prune must be in [0, 1), got {prune}")
        if shared_params not in SHARED_PARAMS:
            raise ValueError(f"unknown strategy.shared_params {shared_params!r}: use one of {', '.join(SHARED_PARAMS)}")
        self.prune = prune
        self.retrain_epochs = retrain_epochs
        self.shared_params = shared_params
        if shared_params == "first_task":
            self.bias_mode, self.norm_mode = "keep", "keep"
        self.owner: dict[MaskedLayer, Tensor] = {}
        self.kept_norms: list[nn.Module] = []

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        self.owner = {layer: torch.zeros_like(layer.weight, dtype=torch.int16) for layer in self.layers}
        self.kept_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return model

    def bias_parameters(self, task_id: int, shared: bool) -> list[nn.Parameter]:
        """The biases of ``task_id``'s layers: of the shared ones, or of its own head (trained with its task)."""
        layers = [layer for layer in self.task_layers(task_id) if (len(layer.owners) > 1) == shared]
        return [layer.bias for layer in layers if layer.bias is not None]

    def first_task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """The shared biases and the batch-norm parameters that only the first task trains."""
        return self.bias_parameters(task_id, shared=True) + [p for m in self.kept_norms for p in m.parameters()]

    def forward(self, x: Tensor, task_ids: TaskIds) -> Tensor:
        if self.learned:  # after the first task the kept batch-norms are frozen: statistics included
            for norm in self.kept_norms:
                norm.eval()
        return super().forward(x, task_ids)

    def owned_up_to(self, layer: MaskedLayer, task_id: int) -> Tensor:
        """Task ``task_id``'s mask: the weights owned by tasks 0..task_id."""
        owner = self.owner[layer]
        return (owner >= 1) & (owner <= task_id + 1)

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.set_task(task.id)
        layers = self.task_layers(task.id)
        for layer in layers:
            layer.train_mask = torch.ones_like(layer.weight)
        with self.weight_phase({layer: self.owner[layer] == 0 for layer in layers}):
            trainer.fit(self, [task])
        with torch.no_grad():
            for layer in layers:
                self.assign(layer, task.id)
        epochs = trainer.epochs if self.retrain_epochs is None else self.retrain_epochs
        if epochs > 0:
            with self.weight_phase({layer: self.owner[layer] == task.id + 1 for layer in layers}):
                trainer.fit(self, [task], epochs=epochs)

    def assign(self, layer: MaskedLayer, task_id: int) -> None:
        """Give ``task_id`` the largest free weights of ``layer`` and zero the released ones."""
        owner = self.owner[layer]
        free = owner == 0
        keep = free.clone()
        if len(layer.owners) > 1 and self.prune > 0:
            magnitude = layer.weight.detach().abs().masked_fill(~free, -1.0).flatten()
            kept = num_kept(int(free.sum()), 1.0 - self.prune)
            keep = torch.zeros_like(free).flatten()
            keep[magnitude.topk(kept).indices] = True
            keep = keep.view_as(free) & free
        owner[keep] = task_id + 1
        layer.weight.data[free & ~keep] = 0.0
        layer.train_mask = self.owned_up_to(layer, task_id).to(layer.weight.dtype)

    def after_task(self, task: Task) -> None:
        for layer in self.task_layers(task.id):
            layer.set_mask(task.id, self.owned_up_to(layer, task.id))
            layer.train_mask = None
        super().after_task(task)

    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        own = [*self.weight_parameters(task.id), *self.bias_parameters(task.id, shared=False)]
        return own if self.learned else [*own, *self.first_task_parameters(task.id)]

    def mask_storage(self) -> dict[str, Any]:
        storage = super().mask_storage()
        bits_per_owner = max(1, (len(self.learned)).bit_length())
        storage["owner_map_bits"] = sum(layer.weight.numel() for layer in self.layers) * bits_per_owner
        storage["note"] += "; PackNet's masks are nested, so an owner map of owner_map_bits also stores them all"
        return storage

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "owner": [self.owner[layer] for layer in self.layers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for layer, owner in zip(self.layers, state["owner"], strict=True):
            self.owner[layer] = owner.to(layer.weight.device)
