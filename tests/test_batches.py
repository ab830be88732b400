"""A fit's samples and batches: the union of tasks, one shuffle per epoch, and inputs made a block at a time
that each step slices exactly its own rows from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clbench.batches import TrainingSet, block_threading, prefetch_steps


def task(task_id: int, index: list[int]) -> SimpleNamespace:
    train_index = torch.tensor(index)
    return SimpleNamespace(id=task_id, train_index=train_index, train_targets=train_index % 7, num_train=len(index))


def test_one_task_is_used_as_is_and_several_are_joined_with_each_samples_task_id():
    first, second = task(0, [4, 5, 6]), task(3, [10, 11])
    alone = TrainingSet.of([first])
    assert alone.index is first.train_index and alone.targets is first.train_targets and alone.task_ids == 0
    joint = TrainingSet.of([first, second])
    assert joint.index.tolist() == [4, 5, 6, 10, 11] and joint.targets.tolist() == [4, 5, 6, 3, 4]
    assert joint.task_ids.tolist() == [0, 0, 0, 3, 3]
    assert joint.ids(slice(2, 4)).tolist() == [0, 3] and alone.ids(slice(0, 2)) == 0


def test_a_shuffle_is_one_permutation_from_the_generator_applied_to_every_field():
    joint = TrainingSet.of([task(0, [4, 5, 6]), task(3, [10, 11, 12, 13])])
    shuffled = joint.shuffled(torch.Generator().manual_seed(5))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shuffled.index, joint.index[order])
    assert torch.equal(shuffled.targets, shuffled.index % 7)  # each sample keeps its target ...
    assert torch.equal(shuffled.task_ids, (shuffled.index >= 10).long() * 3)  # ... and its task id


def test_batches_slice_blocks_made_once_per_block_steps():
    data = TrainingSet.of([task(2, list(range(100, 123)))])  # 23 samples: batches 5, 5, 5, 5, 3
    made = []

    def prepare(index, ids):
        made.append((index.tolist(), ids))
        return index.float() * 2, index + 1000

    yielded = list(data.batches(batch_size=5, block_steps=2, prepare=prepare))
    assert [len(index) for index, _ in made] == [10, 10, 3] and all(ids == 2 for _, ids in made)
    assert [step for step, *_ in yielded] == [0, 1, 2, 3, 4] and data.steps(5) == 5
    assert [rows for *_, rows in yielded] == [10, 0, 10, 0, 3]
    seen = []
    for _, chosen, batch, _ in yielded:
        assert torch.equal(batch.index, data.index[chosen]) and torch.equal(batch.y, data.targets[chosen])
        assert torch.equal(batch.x, batch.index.float() * 2) and torch.equal(batch.aux, batch.index + 1000)
        assert batch.task_ids == 2
        seen += batch.index.tolist()
    assert seen == list(range(100, 123))


def test_a_block_holds_as_many_batches_as_fit_in_prefetch_mb():
    # an MNIST image is 784 fp32 values (3,136 bytes); batch 64 is 200,704 bytes; 16 MiB hold 83.6 batches
    assert prefetch_steps(16.0, [1, 28, 28], 64) == 83
    assert prefetch_steps(0.0, [1, 28, 28], 64) == 1  # 0: batch by batch
    assert prefetch_steps(0.2, [1, 28, 28], 64) == 1  # less than one batch still makes one


@pytest.mark.parametrize(("setting", "device", "inside"), [(1, "cpu", 1), (None, "cpu", None), (1, None, None)])
def test_block_threads_apply_inside_the_block_only(setting, device, inside):
    steps = torch.get_num_threads()
    torch.set_num_threads(2)  # not the block's 1, so a block that leaks its setting shows (conftest sets 1)
    try:
        with block_threading(setting, None if device is None else torch.device(device)):
            assert torch.get_num_threads() == (2 if inside is None else inside)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(steps)
