"""Synthetic image datasets of any shape, generated on the spot for tests and timing runs."""

from __future__ import annotations

from functools import lru_cache

import torch

from clbench.data.base import ImageDataset


@lru_cache(maxsize=8)
def load_synthetic(
    num_classes: int = 10,
    shape: tuple[int, int, int] | list[int] = (1, 28, 28),
    train_per_class: int = 200,
    test_per_class: int = 50,
    noise: float = 0.35,
    seed: int = 0,
) -> ImageDataset:
    """Class-prototype images plus pixel noise, quantised to uint8.

    Each class has a random smooth prototype; samples add Gaussian noise of ``noise`` (in [0, 1] units),
    so a linear model learns the task but not trivially, and accuracy responds to interference.
    """
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand(num_classes, channels, max(2, height // 4), max(2, width // 4), generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        images = prototypes[labels] + noise * torch.randn(len(labels), *shape, generator=generator)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    x_train, y_train = sample(train_per_class)
    x_test, y_test = sample(test_per_class)
    return ImageDataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(str(c) for c in range(num_classes)),
    )
