"""PackNet: train, prune, retrain, freeze (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a
Single Network by Iterative Pruning")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clbench.models import ContinualModel
from clbench.streams import Stream, Task
from clbench.trainer import Trainer
from strategies.supermasks.base import SupermaskStrategy
from strategies.supermasks.layers import MaskedLayer, num_kept


class PackNet(SupermaskStrategy):
    """Task t trains every still-free weight (earlier tasks' weights are used but frozen), then keeps the
    ``1 - prune`` largest-magnitude of those free weights in each shared layer, zeroes and releases the
    rest for later tasks, and retrains the kept ones for ``retrain_epochs`` (None: as many epochs as the
    first phase). Task t's mask is every weight owned by tasks 0..t; an ``owner`` map (0 = free) holds
    them all. Per-task heads are task-private and not pruned."""

    name = "packnet"
    score_layout = "none"
    private_density = 1.0

    def __init__(self, prune: float = 0.75, retrain_epochs: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("weight_init", "default")
        super().__init__(density=1.0, **kwargs)
        if not 0.0 <= prune < 1.0:
            raise ValueError(f"strategy.prune must be in [0, 1), got {prune}")
        self.prune = prune
        self.retrain_epochs = retrain_epochs
        self.owner: dict[MaskedLayer, Tensor] = {}

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        self.owner = {layer: torch.zeros_like(layer.weight, dtype=torch.int16) for layer in self.layers}
        return model

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
        return self.weight_parameters(task.id)

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
