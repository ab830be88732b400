"""miniImageNet (100 classes of 84x84 ImageNet images) from arrays on disk, for GPM's 20-task protocol.

Layout read (no download exists; build it once from the usual miniImageNet release):
``<root>/miniimagenet/train.npz`` and ``<root>/miniimagenet/test.npz``, each with ``x`` (uint8
``[N, 84, 84, 3]`` or ``[N, 3, 84, 84]``) and ``y`` (int labels 0..99), and optionally ``class_names``.
GPM / TRGP split every class's 600 images into 500 train / 100 test before making 20 tasks of 5 classes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from clbench.data.base import DatasetMissingError, ImageDataset, to_uint8_images


@lru_cache(maxsize=1)
def load_miniimagenet(root: str = "data", download: bool = False) -> ImageDataset:
    """Read ``<root>/miniimagenet/{train,test}.npz`` (see the module docstring for the layout)."""
    base = Path(root).expanduser() / "miniimagenet"
    paths = {split: base / f"{split}.npz" for split in ("train", "test")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise DatasetMissingError(
            f"miniImageNet not found at {', '.join(missing)}: write train.npz / test.npz with arrays x (uint8 "
            "[N, 84, 84, 3]) and y (labels 0..99) there (see clbench/data/miniimagenet.py), or point stream.root "
            "at a folder holding miniimagenet/; clbench cannot download it"
        )
    arrays = {split: np.load(path, allow_pickle=False) for split, path in paths.items()}
    images = {}
    for split, data in arrays.items():
        x = data["x"]
        images[split] = to_uint8_images(x, channels_last=x.ndim == 4 and x.shape[-1] == 3)
    labels = {split: torch.as_tensor(data["y"], dtype=torch.int64) for split, data in arrays.items()}
    num_classes = int(max(labels["train"].max(), labels["test"].max())) + 1
    names = arrays["train"]["class_names"].tolist() if "class_names" in arrays["train"] else None
    return ImageDataset(
        name="miniimagenet",
        x_train=images["train"],
        y_train=labels["train"],
        x_test=images["test"],
        y_test=labels["test"],
        class_names=tuple(str(n) for n in names) if names else tuple(str(c) for c in range(num_classes)),
    )
