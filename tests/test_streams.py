"""Streams: tasks are views (no copies), targets follow the scenario, transforms are per task."""

import pytest
import torch

from clbench.data import load_digits, load_synthetic
from clbench.streams import multi_dataset_stream, permuted_stream, rotated_stream, split_stream


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_split_tasks_are_disjoint_and_local_in_task_scenario(digits):
    stream = split_stream(digits, num_tasks=5, classes_per_task=2, scenario="task")
    assert stream.head_sizes == [2] * 5
    seen = set()
    for task in stream:
        labels = digits.y_train[task.train_index]
        assert set(labels.tolist()) == set(task.classes)
        assert not seen & set(task.classes)
        seen |= set(task.classes)
        assert set(task.train_targets.tolist()) == {0, 1}
        assert torch.equal(task.train_targets, (labels == task.classes[1]).long())


def test_split_class_scenario_uses_global_positions(digits):
    stream = split_stream(digits, num_tasks=5, classes_per_task=2, scenario="class", shuffle_classes=True, seed=3)
    assert stream.head_sizes == [10]
    order = stream.info["class_order"]
    for task in stream:
        labels = digits.y_test[task.test_index]
        expected = torch.tensor([order.index(c) for c in labels.tolist()])
        assert torch.equal(task.test_targets, expected)
        assert set(task.test_targets.tolist()) == {2 * task.id, 2 * task.id + 1}


def test_too_many_tasks_names_the_fix(digits):
    with pytest.raises(ValueError, match=r"lower stream\.num_tasks"):
        split_stream(digits, num_tasks=6, classes_per_task=2)


def test_val_split_is_held_out_of_train(digits):
    stream = split_stream(digits, num_tasks=5, classes_per_task=2, val_fraction=0.2)
    for task in stream:
        assert not set(task.val_index.tolist()) & set(task.train_index.tolist())
        assert abs(len(task.val_index) / (len(task.val_index) + task.num_train) - 0.2) < 0.02


def test_permuted_tasks_share_storage_and_permute_pixels(digits):
    stream = permuted_stream(digits, num_tasks=100, seed=0)
    assert all(task.train_index.data_ptr() == stream.tasks[0].train_index.data_ptr() for task in stream)
    assert stream.x_train.data_ptr() == digits.x_train.data_ptr()
    assert stream.permutations.shape == (100, 64)
    index = stream.tasks[0].test_index[:5]
    raw = (digits.x_test[index].float() / 255.0).flatten(1)
    expected = (raw[:, stream.permutations[7]] - digits.mean[0]) / digits.std[0]
    assert torch.allclose(stream.inputs("test", index, 7).flatten(1), expected, atol=1e-6)


def test_mixed_batch_inputs_match_per_task_inputs(digits):
    stream = permuted_stream(digits, num_tasks=3, seed=1)
    index = torch.arange(6)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0])
    mixed = stream.inputs("train", index, task_ids)
    for k in range(6):
        single = stream.inputs("train", index[k : k + 1], int(task_ids[k]))
        assert torch.allclose(mixed[k], single[0])


@pytest.mark.parametrize("make", [permuted_stream, rotated_stream])
def test_inputs_written_into_out_are_the_returned_inputs(digits, make):
    """Evaluation writes a chunk spanning several tasks part by part into one buffer (``out=``)."""
    stream = make(digits, num_tasks=3, seed=1)
    index = torch.arange(10)
    buffer = torch.full((20, *stream.input_shape), float("nan"))
    for task_id, rows in ((1, slice(0, 10)), (2, slice(10, 20))):
        written = stream.inputs("test", index, task_id, out=buffer[rows])
        assert written.data_ptr() == buffer[rows].data_ptr()
        assert torch.equal(buffer[rows], stream.inputs("test", index, task_id))


def test_rotation_by_90_degrees_is_a_quarter_turn(digits):
    stream = rotated_stream(digits, num_tasks=2, angles=[0.0, 90.0])
    index = torch.arange(4)
    upright = stream.inputs("test", index, 0)
    turned = stream.inputs("test", index, 1)
    background = (0.0 - digits.mean[0]) / digits.std[0]
    assert torch.allclose(upright, (digits.x_test[:4].float() / 255 - digits.mean[0]) / digits.std[0], atol=1e-5)
    candidates = [torch.rot90(upright, k, dims=(2, 3)) for k in (1, -1)]
    assert any(torch.allclose(turned, c, atol=1e-4) for c in candidates)
    assert not torch.allclose(turned, upright)
    assert background < 0  # zero fill is black, below the mean


def test_multi_dataset_resizes_and_offsets():
    small = load_synthetic(num_classes=4, shape=(1, 28, 28), train_per_class=5, test_per_class=2, seed=1)
    large = load_synthetic(num_classes=3, shape=(3, 32, 32), train_per_class=5, test_per_class=2, seed=2)
    stream = multi_dataset_stream([small, large], shape=(3, 32, 32), scenario="class")
    assert stream.input_shape == (3, 32, 32)
    assert stream.head_sizes == [7]
    first, second = stream.tasks
    assert second.train_index.min() == len(small.y_train)
    assert set(second.train_targets.tolist()) == {4, 5, 6}
    padded = stream.x_train[first.train_index[0]]
    assert padded[:, :2].sum() == 0 and torch.equal(padded[0, 2:30, 2:30], small.x_train[0, 0])
    task_stream = multi_dataset_stream([small, large], shape=(3, 32, 32), scenario="task")
    assert task_stream.head_sizes == [4, 3]


def test_unknown_scenario_is_rejected(digits):
    with pytest.raises(ValueError, match="scenario"):
        split_stream(digits, num_tasks=5, scenario="instance")


def test_order_seed_moves_each_task_with_its_transform(digits):
    plain = permuted_stream(digits, num_tasks=4, seed=5)
    shuffled = permuted_stream(digits, num_tasks=4, seed=5, order_seed=2)
    order = shuffled.info["task_order"]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    index = torch.arange(3)
    for new, old in enumerate(order):
        assert shuffled.tasks[new].id == new
        assert torch.equal(shuffled.inputs("test", index, new), plain.inputs("test", index, old))
    split = split_stream(digits, num_tasks=5, classes_per_task=2, order_seed=1)
    assert sorted(t.classes for t in split) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [t.classes for t in split] != sorted(t.classes for t in split)


def test_permuted_class_scenario_gives_each_task_new_outputs(digits):
    stream = permuted_stream(digits, num_tasks=3, scenario="class", seed=0)
    assert stream.head_sizes == [30]
    for task in stream:
        assert set(task.test_targets.tolist()) == set(range(10 * task.id, 10 * task.id + 10))
        assert task.classes == tuple(range(10 * task.id, 10 * task.id + 10))
    domain = permuted_stream(digits, num_tasks=3, scenario="domain", seed=0)
    assert all(set(task.test_targets.tolist()) == set(range(10)) for task in domain)
