"""Group masking: the classes absent from the fitted tasks, or from each batch where the stream asks."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from clbench.masking import absent_classes, batch_absent, mask_absent


def stream(masks: bool = True, per_batch: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        mask_absent_classes=masks, mask_per_batch=per_batch, head_sizes=[6], device=torch.device("cpu")
    )


def test_a_fit_masks_the_classes_none_of_its_tasks_contain():
    tasks = [SimpleNamespace(classes=(1, 3)), SimpleNamespace(classes=(4,))]
    assert absent_classes(stream(), tasks).tolist() == [True, False, True, False, False, True]
    assert absent_classes(stream(masks=False), tasks) is None


def test_per_batch_masking_masks_the_classes_without_a_sample_in_the_batch():
    absent = torch.tensor([True, False, True, False, False, True])
    y = torch.tensor([3, 3, 1])
    assert batch_absent(stream(), absent, y) is absent  # by task: the fit's mask, unchanged
    assert batch_absent(stream(per_batch=True), absent, y).tolist() == [True, False, True, False, True, True]
    assert batch_absent(stream(per_batch=True), None, y) is None
    assert batch_absent(None, absent, y) is absent


def test_mask_absent_pushes_absent_logits_to_the_minimum_out_of_place():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    masked = mask_absent(logits, torch.tensor([True, False, True]))
    assert masked.tolist() == [[torch.finfo(torch.bfloat16).min, 2.0, torch.finfo(torch.bfloat16).min]]
    assert logits.tolist() == [[1.0, 2.0, 3.0]]  # the caller's tensor is left as it was
    assert mask_absent(logits, None) is logits
