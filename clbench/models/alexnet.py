"""The 5-layer AlexNet of GPM's CIFAR-100 protocol (Saha et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from clbench.models.heads import ContinualModel, MultiHead
from clbench.models.pretrained import apply_checkpoint


class AlexNet(ContinualModel):
    """Conv 64/128/256 (kernels 4/3/2, no bias) -> fc 2048/2048 -> heads.

    Every block runs layer -> batch-norm -> ReLU -> dropout (conv blocks then max-pool), the order of
    GPM's ``AlexNet.forward``; the heads read the last fc block's dropped-out ReLU outputs.

    Batch-norm keeps no running statistics (``track_running_stats=False``), as in GPM, so evaluation
    normalises with batch statistics and no task's statistics drift under later tasks. Dropout 0.2 after
    the first two conv blocks and 0.5 after the rest.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        channels: Sequence[int] = (64, 128, 256),
        kernels: Sequence[int] = (4, 3, 2),
        hidden: Sequence[int] = (2048, 2048),
        dropout: Sequence[float] = (0.2, 0.5),
        track_running_stats: bool = False,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        in_channels = input_shape[0]
        blocks: list[nn.Module] = []
        for i, (out_channels, kernel) in enumerate(zip(channels, kernels, strict=True)):
            p = dropout[0] if i < len(channels) - 1 else dropout[1]
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel, bias=False),
                nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.Dropout(p),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.conv = nn.Sequential(*blocks, nn.Flatten())
        with torch.no_grad():
            width = self.conv(torch.zeros(2, *input_shape)).shape[1]
        fc: list[nn.Module] = []
        for size in hidden:
            # GPM's order (main_cifar100.py): fc -> bn -> relu -> dropout, as in the conv blocks.
            fc += [
                nn.Linear(width, size, bias=False),
                nn.BatchNorm1d(size, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.Dropout(dropout[1]),
            ]
            width = size
        self.fc = nn.Sequential(*fc)
        self.heads = MultiHead(width, head_sizes, bias=False)
        apply_checkpoint(self, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))
