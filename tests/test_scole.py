"""SCoLe streams: re-occurring classes, group masking, one evaluation set, accumulation summary."""

import math

import numpy as np
import pytest
import torch

from clbench.data import load_digits
from clbench.models import MLP
from clbench.scole import accumulation_summary, class_probabilities, scole_stream
from clbench.trainer import Trainer
from strategies.finetune import Finetune


def test_tasks_draw_few_classes_that_reoccur():
    stream = scole_stream(load_digits(), num_tasks=50, classes_per_task=2, seed=0)
    assert all(len(task.classes) == 2 and len(set(task.classes)) == 2 for task in stream)
    counts = np.bincount([c for task in stream for c in task.classes], minlength=10)
    assert counts.sum() == 100 and (counts >= 2).all()  # every class comes back
    for task in stream:
        assert set(task.train_targets.tolist()) == set(task.classes)
    assert len(stream.evaluation_tasks) == 1 and not stream.square
    assert stream.evaluation_tasks[0].test_index.numel() == len(load_digits().y_test)


def test_decaying_distribution_lowers_entropy():
    uniform = class_probabilities(10, "uniform", 0.0)
    decaying = class_probabilities(10, "decaying", 3.0)
    entropy = lambda p: float(-(p * np.log(p)).sum())  # noqa: E731
    assert entropy(uniform) == pytest.approx(math.log(10))
    assert entropy(decaying) < entropy(uniform) - 0.1
    assert decaying[0] > decaying[-1] and decaying.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distribution"):
        class_probabilities(10, "zipf", 1.0)


def test_group_mask_covers_exactly_the_absent_classes():
    stream = scole_stream(load_digits(), num_tasks=3, classes_per_task=3, seed=1)
    trainer = Trainer()
    trainer.attach(stream, seed=0)
    absent = trainer._absent_classes([stream.tasks[0]])
    assert set(torch.nonzero(~absent).flatten().tolist()) == set(stream.tasks[0].classes)


def test_accumulation_summary_by_hand():
    summary = accumulation_summary([10.0, 30.0, 50.0, 40.0])
    assert summary["acc_first"] == 10.0 and summary["acc_final"] == 40.0 and summary["acc_best"] == 50.0
    assert summary["acc_mean_over_time"] == pytest.approx(32.5) and summary["accumulation_gain"] == 30.0


def test_scole_run_records_curve_and_per_class_accuracy(run_tiny):
    result = run_tiny(
        ["stream=scole_mnist5k", "stream.num_tasks=12", "stream.samples_per_class=40", "trainer.epochs=1"]
    )
    assert result["status"] == "completed"
    assert np.array(result["acc_matrix"]).shape == (12, 1)
    assert result["acc_over_time"] == [row[0] for row in result["acc_matrix"]]
    per_class = np.array(result["class_acc"], dtype=float)
    assert per_class.shape == (12, 10)
    counts = np.bincount(_mnist5k_test_labels(), minlength=10)
    final_from_classes = float(np.nansum(per_class[-1] * counts) / counts.sum())
    assert final_from_classes == pytest.approx(result["acc_over_time"][-1])
    assert set(result["metrics"]) >= {"acc_first", "acc_final", "accumulation_gain"}
    assert result["paths"]["curve"].endswith("acc_over_time.png")


def _mnist5k_test_labels() -> np.ndarray:
    from clbench.data import load_mnist5k

    return load_mnist5k().y_test.numpy()


def test_official_distribution_is_the_linear_decrease_to_the_power_then_shuffled():
    # get_probability for 10 classes: (1 - 0.05 c) normalised, squared (entropy_decrease 2), normalised,
    # then shuffled by the seed's legacy NumPy generator
    linear = 1.0 - 0.05 * np.arange(10)
    powered = (linear / linear.sum()) ** 2
    expected = (powered / powered.sum())[np.random.RandomState(3).permutation(10)]
    official = class_probabilities(10, "official", entropy_decrease=2.0, seed=3)
    np.testing.assert_allclose(official, expected, rtol=1e-12)
    assert not (np.diff(official) <= 0).all()  # shuffled: frequency does not follow the label
    np.testing.assert_allclose(class_probabilities(10, "official", entropy_decrease=0.0), np.full(10, 0.1))
    hundred = class_probabilities(100, "official", entropy_decrease=1.0, seed=0)
    assert hundred.min() == pytest.approx((1 - 0.01 * 99) / (1 - 0.01 * np.arange(100)).sum())  # slope 0.01
    with pytest.raises(ValueError, match=r"stream\.factor below"):
        class_probabilities(30, "official", entropy_decrease=1.0)  # 1 - 0.05 * 29 < 0


def test_official_stream_draws_by_the_official_distribution():
    stream = scole_stream(load_digits(), num_tasks=4, distribution="official", entropy_decrease=3.0, seed=5)
    expected = class_probabilities(10, "official", entropy_decrease=3.0, seed=5)
    np.testing.assert_allclose(stream.info["class_probabilities"], expected)
    assert stream.info["masking"] == "task" and not stream.mask_per_batch


@pytest.mark.parametrize("closed_form", [True, False])
def test_batch_masking_masks_the_classes_absent_from_each_batch(closed_form):
    # one sample per batch: with the batch's own class the only one left, every step's loss is 0 and nothing
    # moves; masked per task (2 classes) the model learns
    moved = {}
    for masking in ("task", "batch"):
        stream = scole_stream(load_digits(), num_tasks=1, classes_per_task=2, samples_per_class=8, masking=masking)
        torch.manual_seed(0)
        model = MLP(stream.input_shape, stream.head_sizes, hidden=[8])
        before = [p.detach().clone() for p in model.parameters()]
        strategy = Finetune()
        strategy.setup(model, stream)
        trainer = Trainer(epochs=1, batch_size=1, lr=0.1, progress=False, closed_form=closed_form)
        trainer.attach(stream, seed=0)
        trainer.fit(strategy, [stream.tasks[0]])
        moved[masking] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert moved == {"task": True, "batch": False}
    with pytest.raises(ValueError, match=r"stream\.masking"):
        scole_stream(load_digits(), num_tasks=1, masking="step")
