"""ImageDataset's normalisation statistics."""

import numpy as np
import pytest
import torch

from clbench.data.base import ImageDataset, channel_stats


def reference_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3), ddof=1)


def test_uint8_channel_stats_are_exact_per_channel():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 7, 5), dtype=torch.uint8, generator=generator)
    images[:, 1] //= 4  # channels with different statistics
    images[:, 2] = 255 - images[:, 2] // 2
    mean, std = channel_stats(images)
    ref_mean, ref_std = reference_stats(images.numpy())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12)


def test_float_images_keep_their_units():
    images = torch.rand(50, 2, 4, 4)
    mean, std = channel_stats(images)
    x = images.double().numpy()
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3), ddof=1), rtol=1e-12)


def test_constant_channel_gets_a_floor_not_zero():
    images = torch.full((10, 1, 3, 3), 7, dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert mean[0] == pytest.approx(7 / 255)
    assert std[0] == pytest.approx(1e-6)


def test_dataset_computes_its_stats_from_training_images_only():
    x_train = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    x_train[:2] = 255
    x_test = torch.full((3, 1, 2, 2), 255, dtype=torch.uint8)
    data = ImageDataset("toy", x_train, torch.zeros(4, dtype=torch.long), x_test, torch.zeros(3), ("a",))
    assert data.mean[0] == pytest.approx(0.5)
    assert data.std[0] == pytest.approx(np.std([1.0] * 8 + [0.0] * 8, ddof=1))
