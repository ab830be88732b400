"""ExSSNeT: SupSup's masks plus exclusive weight training and k-NN knowledge transfer (Yadav & Bansal
2023, "Exclusive Supermask Subnetwork Training for Continual Learning"; official code
prateeky2806/exessnet)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from clbench.streams import Task
from clbench.trainer import Trainer
from strategies.supermasks.base import choose_by_variant, trainer_lr
from strategies.supermasks.supsup import SupSup

KNN_VARIANTS = ("off", "best", "all", "always")


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int) -> float:
    """Accuracy (fraction) of a k-nearest-neighbour majority vote under the Euclidean distance."""
    k = min(k, train_x.shape[0])
    neighbours = torch.cdist(test_x, train_x).topk(k, largest=False).indices
    votes = train_y[neighbours].mode(dim=1).values
    return float((votes == test_y).float().mean())


class ExSSNeT(SupSup):
    """Per task: (1) KKT: score each earlier task's mask with a k-NN classifier on the new task's
    embeddings and start the new scores from the chosen tasks' scores (``knn``: ``best`` / ``all`` /
    ``always`` / ``off``); (2) learn the task's supermask as SupSup; (3) train, for ``weight_epochs`` at
    ``weight_lr``, only the weights its mask selects and no earlier mask uses, so every earlier task's
    function is unchanged.

    ``knn_k`` neighbours (the official ``num_topk``), ``knn_fraction`` of the new task's training set
    embedded, of which 66 % fit the k-NN and the rest score it, as in the official ``findSimilarTasks``.
    ``weight_epochs=None`` trains the weights for as many epochs as the masks.
    """

    name = "exssnet"
    train_weights = False

    def __init__(
        self,
        density: float = 0.1,
        weight_epochs: int | None = None,
        weight_lr: float | None = None,
        knn: str = "best",
        knn_k: int = 200,
        knn_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(density=density, **kwargs)
        if knn not in KNN_VARIANTS:
            raise ValueError(f"unknown strategy.knn {knn!r}: use one of {', '.join(KNN_VARIANTS)}")
        if not 0.0 < knn_fraction <= 1.0:
            raise ValueError(f"strategy.knn_fraction must be in (0, 1], got {knn_fraction}")
        self.weight_epochs = weight_epochs
        self.weight_lr = weight_lr
        self.knn = knn
        self.knn_k = knn_k
        self.knn_fraction = knn_fraction
        self.transfers: list[dict[str, Any]] = []

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.set_task(task.id)
        if self.knn != "off" and self.learned:
            self.transfer_scores(task)
        trainer.fit(self, [task], params=self.score_parameters(task.id))
        layers = self.task_layers(task.id)
        used_before = {layer: layer.used.clone() for layer in layers}
        for layer in layers:
            layer.cache_mask(task.id)
        epochs = trainer.epochs if self.weight_epochs is None else self.weight_epochs
        if epochs > 0:
            exclusive = {layer: layer.masks[task.id].bool() & ~used_before[layer] for layer in layers}
            with self.weight_phase(exclusive), trainer_lr(trainer, self.weight_lr):
                trainer.fit(self, [task], epochs=epochs, params=self.weight_parameters(task.id))

    @torch.no_grad()
    def embeddings(self, task: Task, positions: Tensor, batch_size: int = 500) -> Tensor:
        """Backbone features of ``task``'s training samples at ``positions`` under the active mask."""
        assert self.model is not None and self.stream is not None
        index = task.train_index[positions]
        chunks = [
            self.model.features(self.stream.inputs("train", index[s : s + batch_size], task.id))
            for s in range(0, index.numel(), batch_size)
        ]
        return torch.cat(chunks).flatten(1)

    def transfer_scores(self, task: Task) -> None:
        """KKT: initialise the new task's scores from the earlier tasks whose masks give embeddings of the
        new task that a k-NN classifies above chance (official ``findSimilarTasks`` + ``score_transfer``)."""
        assert self.model is not None
        count = max(2, math.ceil(task.num_train * self.knn_fraction))
        positions = torch.randperm(task.num_train, device=task.train_index.device)[:count]
        labels = task.train_targets[positions]
        split = int(count * 0.66)
        self.model.eval()
        accs = []
        for earlier in self.learned:
            self.set_task(earlier)
            feats = self.embeddings(task, positions)
            accs.append(knn_accuracy(feats[:split], labels[:split], feats[split:], labels[split:], self.knn_k))
        self.model.train()
        chosen = [self.learned[i] for i in choose_by_variant(accs, 1.0 / task.num_outputs, self.knn)]
        self.set_task(task.id)
        if chosen:
            with torch.no_grad():
                for layer in self.task_layers(task.id):
                    if len(layer.owners) > 1:
                        layer.score(task.id).copy_(torch.stack([layer.score(t) for t in chosen]).mean(0))
        self.transfers.append({"task": task.id, "knn_acc": accs, "from_tasks": chosen})

    def extra_results(self) -> dict[str, Any]:
        return {**super().extra_results(), "knn_transfer": {"variant": self.knn, "choices": self.transfers}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "transfers": self.transfers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.transfers = list(state.get("transfers", []))
