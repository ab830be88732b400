"""Output heads and the backbone + heads model every clbench model is."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MultiHead(nn.Module):
    """One linear head per task (task scenario) or a single shared head (domain / class scenarios).

    ``forward(features, task_ids)`` takes an int (whole batch one task: only that head runs) or a [B]
    tensor (mixed batch, e.g. joint training): then every head runs, narrower heads are padded with
    -inf so a padded logit never wins or carries loss, and each sample gets its own task's row.
    """

    def __init__(self, in_features: int, head_sizes: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.head_sizes = list(head_sizes)
        self.heads = nn.ModuleList(nn.Linear(in_features, size, bias=bias) for size in self.head_sizes)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, features: Tensor, task_ids: int | Tensor | None = None) -> Tensor:
        if len(self.heads) == 1 or task_ids is None:
            return self.heads[0](features)
        if isinstance(task_ids, int):
            return self.heads[task_ids](features)
        width = max(self.head_sizes)
        outputs = []
        for head in self.heads:
            out = head(features)
            if out.shape[1] < width:
                out = nn.functional.pad(out, (0, width - out.shape[1]), value=float("-inf"))
            outputs.append(out)
        stacked = torch.stack(outputs)  # [heads, B, width]
        return stacked[task_ids, torch.arange(features.shape[0], device=features.device)]


class ContinualModel(nn.Module):
    """A backbone (``features``) and :class:`MultiHead` (``heads``); ``forward(x, task_ids)``."""

    heads: MultiHead

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, task_ids: int | Tensor | None = None) -> Tensor:
        return self.heads(self.features(x), task_ids)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's body state in this model's key names (``model.checkpoint``); clbench's own files
        already use them. A wrapper of another library's network maps that library's names here."""
        return state

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the heads (what every task shares)."""
        head_ids = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]


def reset_parameters(module: nn.Module) -> None:
    """Re-draw every parameter with its layer's own initialiser (a fresh random-init model)."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()
