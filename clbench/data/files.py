"""Real datasets read from files under a data root: torchvision's layouts, with download when online.

Nothing here reaches the network unless ``download=True``; a missing file raises
:class:`DatasetMissingError` naming the path clbench looked at and the switch that downloads it.
"""

from __future__ import annotations

import gzip
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from clbench.data.base import DatasetMissingError, ImageDataset, stratified_split, to_uint8_images

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _missing(name: str, path: Path, download_hint: str = "stream.download=true") -> DatasetMissingError:
    return DatasetMissingError(
        f"{name} not found at {path}: put the files there, point stream.root at them, or set {download_hint} "
        "on a machine with internet access"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():
                return candidate
    return None


def _load_idx_dataset(name: str, folders: list[Path], class_names: tuple[str, ...]) -> ImageDataset:
    paths = {key: _find_idx(folders, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in paths.values()):
        raise _missing(name, folders[0])
    arrays = {key: read_idx(path) for key, path in paths.items()}  # type: ignore[arg-type]
    return ImageDataset(
        name=name,
        x_train=to_uint8_images(arrays["train_images"]),
        y_train=torch.as_tensor(arrays["train_labels"].astype(np.int64)),
        x_test=to_uint8_images(arrays["test_images"]),
        y_test=torch.as_tensor(arrays["test_labels"].astype(np.int64)),
        class_names=class_names,
    )


def _torchvision_download(dataset_cls, root: Path, **kwargs) -> None:
    for train in (True, False):
        dataset_cls(root=str(root), train=train, download=True, **kwargs)


@lru_cache(maxsize=2)
def load_mnist(root: str = "data", download: bool = False) -> ImageDataset:
    """Full MNIST (60k/10k) in torchvision's layout ``<root>/MNIST/raw``."""
    base = Path(root).expanduser()
    if download:
        from torchvision.datasets import MNIST

        _torchvision_download(MNIST, base)
    return _load_idx_dataset("mnist", [base / "MNIST" / "raw", base], tuple(str(c) for c in range(10)))


@lru_cache(maxsize=2)
def load_fashion_mnist(root: str = "data", download: bool = False) -> ImageDataset:
    """Full Fashion-MNIST (60k/10k): torchvision's ``<root>/FashionMNIST/raw``, else Debian's
    ``dataset-fashion-mnist`` package files under /usr/share/datasets/fashion-mnist."""
    base = Path(root).expanduser()
    if download:
        from torchvision.datasets import FashionMNIST

        _torchvision_download(FashionMNIST, base)
    folders = [base / "FashionMNIST" / "raw", base, DEBIAN_FASHION_MNIST]
    try:
        return _load_idx_dataset("fashion_mnist", folders, FASHION_CLASSES)
    except DatasetMissingError:
        raise DatasetMissingError(
            f"fashion_mnist not found at {folders[0]} nor {DEBIAN_FASHION_MNIST}: run "
            "`apt-get install -y dataset-fashion-mnist`, put the IDX files under stream.root, "
            "or set stream.download=true on a machine with internet access"
        ) from None


def _cifar(name: str, cls_name: str, folder: str, root: str, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    base = Path(root).expanduser()
    dataset_cls = getattr(tvd, cls_name)
    if not (base / folder).exists() and not download:
        raise _missing(name, base / folder)
    splits = [dataset_cls(root=str(base), train=train, download=download) for train in (True, False)]
    train, test = splits
    return ImageDataset(
        name=name,
        x_train=to_uint8_images(train.data, channels_last=True),
        y_train=torch.as_tensor(train.targets, dtype=torch.int64),
        x_test=to_uint8_images(test.data, channels_last=True),
        y_test=torch.as_tensor(test.targets, dtype=torch.int64),
        class_names=tuple(train.classes),
    )


@lru_cache(maxsize=2)
def load_cifar10(root: str = "data", download: bool = False) -> ImageDataset:
    """CIFAR-10 through torchvision (``<root>/cifar-10-batches-py``)."""
    return _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", root, download)


@lru_cache(maxsize=2)
def load_cifar100(root: str = "data", download: bool = False) -> ImageDataset:
    """CIFAR-100 through torchvision (``<root>/cifar-100-python``), classes in their natural order."""
    return _cifar("cifar100", "CIFAR100", "cifar-100-python", root, download)


@lru_cache(maxsize=2)
def load_svhn(root: str = "data", download: bool = False) -> ImageDataset:
    """SVHN (cropped digits) through torchvision (``<root>/train_32x32.mat``, ``test_32x32.mat``)."""
    from torchvision.datasets import SVHN

    base = Path(root).expanduser()
    if not (base / "train_32x32.mat").exists() and not download:
        raise _missing("svhn", base / "train_32x32.mat")
    train, test = (SVHN(root=str(base), split=s, download=download) for s in ("train", "test"))
    return ImageDataset(
        name="svhn",
        x_train=to_uint8_images(train.data),
        y_train=torch.as_tensor(train.labels, dtype=torch.int64),
        x_test=to_uint8_images(test.data),
        y_test=torch.as_tensor(test.labels, dtype=torch.int64),
        class_names=tuple(str(c) for c in range(10)),
    )


def _read_images(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@lru_cache(maxsize=2)
def load_tinyimagenet(root: str = "data", download: bool = False) -> ImageDataset:
    """TinyImageNet-200 (64x64, 100k train / 10k val used as test) from ``<root>/tiny-imagenet-200``;
    ``download=True`` fetches it with Avalanche's dataset class."""
    base = Path(root).expanduser() / "tiny-imagenet-200"
    if download and not base.exists():
        from avalanche.benchmarks.datasets import TinyImagenet

        TinyImagenet(root=str(base.parent), download=True)
    if not (base / "wnids.txt").exists():
        raise _missing("tinyimagenet", base)
    wnids = (base / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        files = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    annotations = [line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines()]
    test_paths = [base / "val" / "images" / name for name, _ in annotations]
    test_labels = [index[w] for _, w in annotations]
    return ImageDataset(
        name="tinyimagenet",
        x_train=to_uint8_images(_read_images(train_paths), channels_last=True),
        y_train=torch.as_tensor(train_labels, dtype=torch.int64),
        x_test=to_uint8_images(_read_images(test_paths), channels_last=True),
        y_test=torch.as_tensor(test_labels, dtype=torch.int64),
        class_names=tuple(wnids),
    )


@lru_cache(maxsize=2)
def load_notmnist(root: str = "data", test_fraction: float = 0.15, split_seed: int = 0) -> ImageDataset:
    """notMNIST (letters A-J, 28x28) from ``<root>/notMNIST_small/<letter>/*.png``, as 5-datasets uses it.

    There is no canonical download; unreadable files (the set ships a few) are skipped, and the
    train/test split is class-stratified and fixed by ``split_seed``.
    """
    from PIL import Image, UnidentifiedImageError

    base = Path(root).expanduser() / "notMNIST_small"
    letters = "ABCDEFGHIJ"
    if not all((base / letter).is_dir() for letter in letters):
        raise DatasetMissingError(
            f"notmnist not found at {base}: unpack notMNIST_small.tar.gz there (folders A-J of PNGs) "
            "or point stream.root at its parent"
        )
    images, labels = [], []
    for label, letter in enumerate(letters):
        for path in sorted((base / letter).glob("*.png")):
            try:
                images.append(np.asarray(Image.open(path).convert("L")))
            except (OSError, UnidentifiedImageError):
                continue
            labels.append(label)
    y = np.asarray(labels)
    train, test = stratified_split(y, test_fraction, split_seed)
    x = to_uint8_images(np.stack(images))
    targets = torch.as_tensor(y, dtype=torch.int64)
    return ImageDataset("notmnist", x[train], targets[train], x[test], targets[test], tuple(letters))
