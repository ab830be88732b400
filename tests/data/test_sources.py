"""Dataset sources: bundled data loads, file loaders read IDX files and fail with the path offline."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.data import DatasetMissingError, load_cifar100, load_digits, load_mnist, load_mnist5k, resize_images
from clbench.data.files import DEBIAN_FASHION_MNIST, load_fashion_mnist, read_idx


def test_mnist5k_is_4000_train_1000_test_stratified():
    data = load_mnist5k()
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.x_train.dtype == torch.uint8
    assert torch.bincount(data.y_test).tolist() == [100] * 10


def test_digits_are_rescaled_to_uint8():
    data = load_digits()
    assert data.x_train.max() == 255 and data.input_shape == (1, 8, 8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28))
    labels = np.arange(7) % 10
    for stem, array in [
        ("train-images-idx3-ubyte", images),
        ("train-labels-idx1-ubyte", labels),
        ("t10k-images-idx3-ubyte", images[:3]),
        ("t10k-labels-idx1-ubyte", labels[:3]),
    ]:
        _write_idx(raw / f"{stem}.gz", array)
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte.gz"), images)
    data = load_mnist(str(tmp_path))
    assert data.x_train.shape == (7, 1, 28, 28) and data.y_test.tolist() == [0, 1, 2]


def test_missing_files_name_the_path_and_the_switch(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"cifar-100-python.*stream.download=true"):
        load_cifar100(str(tmp_path / "empty"))
    with pytest.raises(DatasetMissingError, match="MNIST"):
        load_mnist(str(tmp_path / "empty"))


def test_fashion_mnist_found_in_debian_package(tmp_path):
    # CI installs Debian's dataset-fashion-mnist (.ci/run); the README says so too.
    assert DEBIAN_FASHION_MNIST.exists(), "run `apt-get install -y dataset-fashion-mnist`"
    data = load_fashion_mnist(str(tmp_path))
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)


def test_resize_pads_grey_28_to_rgb_32():
    x = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    y = resize_images(x, (3, 32, 32))
    assert y.shape == (2, 3, 32, 32) and y[:, :, 2:30, 2:30].eq(200).all() and y[:, :, :2].eq(0).all()
