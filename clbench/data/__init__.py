"""Dataset sources: each returns a whole :class:`ImageDataset` of uint8 tensors."""

from clbench.data.base import DatasetMissingError, ImageDataset, resize_images
from clbench.data.bundled import load_digits, load_mnist5k
from clbench.data.files import (
    load_cifar10,
    load_cifar100,
    load_fashion_mnist,
    load_mnist,
    load_notmnist,
    load_svhn,
    load_tinyimagenet,
)
from clbench.data.synthetic import load_synthetic

__all__ = [
    "DatasetMissingError",
    "ImageDataset",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist5k",
    "load_notmnist",
    "load_svhn",
    "load_synthetic",
    "load_tinyimagenet",
    "resize_images",
]
