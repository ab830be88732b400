"""Reduced ResNet-18 (20 base filters) of GEM / GPM for 5-datasets and miniImageNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.models.heads import ContinualModel, MultiHead
from clbench.models.pretrained import apply_checkpoint


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch-norm and a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, track_running_stats: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, track_running_stats=track_running_stats),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(ContinualModel):
    """ResNet-18 with ``nf`` base filters (20 in GEM / GPM), stages of 2 blocks at nf, 2nf, 4nf, 8nf.

    ``stem_stride=2`` is GPM's miniImageNet (84x84) setting; 1 for 32x32 inputs. Features are the last
    stage average-pooled by 2 and flattened, as in the reference code.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        nf: int = 20,
        stem_stride: int = 1,
        track_running_stats: bool = False,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], nf, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf, track_running_stats=track_running_stats)
        blocks: list[nn.Module] = []
        in_planes = nf
        for stage, planes in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, track_running_stats))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        with torch.no_grad():
            width = self.features(torch.zeros(2, *input_shape)).shape[1]
        self.heads = MultiHead(width, head_sizes, bias=False)
        apply_checkpoint(self, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.avg_pool2d(out, 2).flatten(1)
