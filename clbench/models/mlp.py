"""Fully connected network (the Permuted MNIST model of GEM / GPM)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from clbench.models.heads import ContinualModel, MultiHead
from clbench.models.pretrained import apply_checkpoint


class MLP(ContinualModel):
    """Flatten -> [Linear -> ReLU] x len(hidden) -> heads. GPM's PMNIST net is ``hidden=[100, 100]``
    with ``bias=False``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        hidden: Sequence[int] = (100, 100),
        bias: bool = True,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size, bias=bias), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.heads = MultiHead(width, head_sizes, bias=bias)
        apply_checkpoint(self, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)
