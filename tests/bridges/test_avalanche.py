"""The Avalanche bridges: round trips, a CLI run on an Avalanche benchmark, and metrics against Avalanche's."""

from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import pytest
import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    forward_transfer_metrics,
)
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from clbench import metrics
from clbench.__main__ import CONFIG_DIR
from clbench.bridges import from_avalanche, split_digits_benchmark, to_avalanche
from clbench.data import load_digits
from clbench.models import MLP
from clbench.strategy import Strategy
from clbench.streams import Stream, permuted_stream, split_stream
from clbench.trainer import Trainer


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _streams() -> dict[str, Stream]:
    digits = load_digits()
    return {
        "split-task": split_stream(digits, 5, 2, scenario="task"),
        "split-class": split_stream(digits, 5, 2, scenario="class", class_order=[3, 8, 1, 0, 9, 2, 7, 6, 5, 4]),
        "permuted-domain-val": permuted_stream(digits, 3, scenario="domain", val_fraction=0.1),
    }


@pytest.mark.parametrize("kind", ["split-task", "split-class", "permuted-domain-val"])
def test_round_trip_keeps_tasks_targets_and_inputs(kind: str) -> None:
    stream = _streams()[kind]
    benchmark = to_avalanche(stream)
    assert [e.task_label for e in benchmark.train_stream] == list(range(len(stream)))
    back = from_avalanche(benchmark, scenario=stream.scenario)

    assert len(back) == len(stream)
    assert back.head_sizes == stream.head_sizes
    for original, copy in zip(stream, back, strict=True):
        assert copy.num_train == original.num_train
        assert copy.test_index.numel() == original.test_index.numel()
        assert torch.equal(copy.train_targets, original.train_targets)
        assert torch.equal(copy.test_targets, original.test_targets)
        for split, a, b in (
            ("train", original.train_index, copy.train_index),
            ("test", original.test_index, copy.test_index),
        ):
            torch.testing.assert_close(back.inputs(split, b, copy.id), stream.inputs(split, a, original.id))
    if kind == "split-class":
        assert back.num_classes == stream.num_classes
    if kind == "permuted-domain-val":
        assert [len(e.dataset) for e in benchmark.valid_stream] == [t.val_index.numel() for t in stream]


@pytest.mark.parametrize("scenario", ["class", "task", "domain"])
def test_targets_follow_the_scenario(scenario: str) -> None:
    order = [3, 7, 1, 0, 9, 2, 8, 5, 6, 4]
    benchmark = split_digits_benchmark(5, fixed_class_order=order)
    stream = from_avalanche(benchmark, scenario=scenario, val_fraction=0.25)
    first_seen = [c for t in range(5) for c in sorted(order[2 * t : 2 * t + 2])]
    for task, experience in zip(stream, benchmark.test_stream, strict=True):
        assert task.classes == tuple(sorted(order[2 * task.id : 2 * task.id + 2]))
        labels = torch.as_tensor(list(experience.dataset.targets))
        expected = {
            "class": torch.tensor([first_seen.index(int(y)) for y in labels]),
            "task": torch.tensor([task.classes.index(int(y)) for y in labels]),
            "domain": labels,
        }[scenario]
        assert torch.equal(task.test_targets, expected)
        assert task.val_index.numel() == round(0.25 * (task.num_train + task.val_index.numel()))
    assert stream.head_sizes == {"class": [10], "task": [2] * 5, "domain": [10]}[scenario]


def test_from_avalanche_caps_samples_and_rejects_unpaired_streams() -> None:
    benchmark = split_digits_benchmark(5, shuffle=False)
    small = from_avalanche(benchmark, max_per_experience=20)
    assert all(t.num_train == 20 and t.test_index.numel() == 20 for t in small)

    class OneTestExperience:
        train_stream = benchmark.train_stream
        test_stream = benchmark.test_stream[:1]

    with pytest.raises(ValueError, match="one test experience per task"):
        from_avalanche(OneTestExperience())


def test_cli_runs_on_an_avalanche_benchmark(run_tiny) -> None:
    result = run_tiny(["stream=avalanche"])
    assert result["status"] == "completed"
    assert result["stream"] == "avalanche_split_digits" and result["scenario"] == "class"
    assert [t["classes"] for t in result["tasks"]] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert np.isfinite(np.asarray(result["acc_matrix"])).all() and len(result["acc_matrix"]) == 5


def test_config_points_at_split_mnist_without_loading_it() -> None:
    """The default benchmark node's keys must all be SplitMNIST keywords, so swapping `_target_` works;
    binding the signature checks that without downloading MNIST."""
    cfg = _compose(["stream=avalanche", "stream.benchmark._target_=avalanche.benchmarks.classic.SplitMNIST"])
    node = {k: v for k, v in cfg.stream.benchmark.items() if k != "_target_"}
    inspect.signature(SplitMNIST).bind(**node)
    assert cfg.stream.benchmark.dataset_root == cfg.data_root
    stream = instantiate(_compose(["stream=avalanche", "stream.max_per_experience=10"]).stream)
    assert len(stream) == 5 and stream.tasks[0].num_train == 10


def _accuracy_row(results: dict[str, float], num_tasks: int) -> np.ndarray:
    """Avalanche's per-experience accuracies of one eval pass, in percent, ordered by experience."""
    row = np.full(num_tasks, np.nan)
    for key, value in results.items():
        found = re.fullmatch(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)", key)
        if found:
            row[int(found.group(1))] = 100.0 * value
    return row


def test_metrics_agree_with_avalanche_on_the_same_run() -> None:
    """Train Avalanche's Naive on to_avalanche(stream); after each experience read Avalanche's accuracies
    and clbench's own evaluation of the same model. The domain scenario keeps old tasks' accuracies away
    from 0, so forgetting and transfer are not trivially equal. Every assertion holds for any seed; with
    seed 2 (CPU) a task peaks after its own training, where the two forgetting definitions part."""
    torch.manual_seed(2)
    stream = split_stream(load_digits(), 5, 2, scenario="domain")
    benchmark = to_avalanche(stream)
    num_tasks = len(stream)
    model = MLP(stream.input_shape, stream.head_sizes, hidden=[32])
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        forward_transfer_metrics(experience=True, stream=True),
        loggers=[],
    )
    trainer = Trainer(epochs=1, batch_size=32, lr=0.1, progress=False)
    naive = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=trainer.lr),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=trainer.batch_size,
        train_epochs=trainer.epochs,
        eval_mb_size=trainer.eval_batch_size,  # same batches as clbench's evaluation: identical logits
        device="cpu",
        evaluator=evaluator,
        eval_every=0,  # Avalanche's forward transfer refuses to run with periodic evaluation off
    )
    clbench_view = Strategy()
    clbench_view.setup(model, stream)
    trainer.attach(stream, seed=0)

    # The eval before any training is Avalanche's forward-transfer "initial" value and clbench's b_j.
    results = naive.eval(benchmark.test_stream)
    random_init_acc = _accuracy_row(results, num_tasks)
    np.testing.assert_allclose(trainer.evaluate(clbench_view, give_task_id=False), random_init_acc, atol=1e-9)
    acc_matrix = np.full((num_tasks, num_tasks), np.nan)
    for experience in benchmark.train_stream:
        naive.train(experience, eval_streams=[])
        results = naive.eval(benchmark.test_stream)
        acc_matrix[experience.current_experience] = _accuracy_row(results, num_tasks)
        clbench_row = trainer.evaluate(clbench_view, give_task_id=False)
        np.testing.assert_allclose(clbench_row, acc_matrix[experience.current_experience], atol=1e-9)
    assert np.isfinite(acc_matrix).all()
    last = num_tasks - 1

    # ACC: clbench averages tasks; Avalanche's stream accuracy averages test samples, i.e. weights task j
    # by its test-set size n_j. Equal when all n_j are (digits' are not), so assert both forms.
    sizes = np.array([t.test_index.numel() for t in stream])
    acc = metrics.average_accuracy(acc_matrix)
    assert acc == pytest.approx(np.mean(acc_matrix[last]))
    stream_acc = results[f"Top1_Acc_Stream/eval_phase/test_stream/Task{last:03d}"]
    assert 100.0 * stream_acc == pytest.approx(np.average(acc_matrix[last], weights=sizes))

    # BWT: Avalanche's is -(first - last) = R[T-1][j] - R[j][j] per experience, averaged over j < T-1:
    # the same definition as clbench's (Lopez-Paz & Ranzato), per experience and averaged.
    bwt = metrics.backward_transfer(acc_matrix)
    assert 100.0 * results["StreamBWT/eval_phase/test_stream"] == pytest.approx(bwt)
    bwt_matrix = metrics.backward_transfer_matrix(acc_matrix)
    for j in range(last):
        key = f"ExperienceBWT/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"
        assert 100.0 * results[key] == pytest.approx(bwt_matrix[last, j])

    # Forgetting: Avalanche's is first-minus-last, R[j][j] - R[T-1][j], i.e. exactly -BWT; clbench's
    # (Chaudhry et al.) takes the best earlier accuracy max_{l<T-1} R[l][j] instead of R[j][j], so
    # clbench - Avalanche = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[j][j]) >= 0.
    avalanche_forgetting = 100.0 * results["StreamForgetting/eval_phase/test_stream"]
    assert avalanche_forgetting == pytest.approx(-bwt)
    gap = np.mean([acc_matrix[j:last, j].max() - acc_matrix[j, j] for j in range(last)])
    assert metrics.forgetting(acc_matrix) - avalanche_forgetting == pytest.approx(gap)
    assert gap >= 0.0

    # FWT: Avalanche's is R[j-1][j] minus the accuracy at its first eval, which ran on the untrained
    # model, so it is clbench's b_j: the definitions coincide, per experience and averaged over j > 0.
    fwt = metrics.forward_transfer(acc_matrix, random_init_acc)
    assert 100.0 * results["StreamForwardTransfer/eval_phase/test_stream"] == pytest.approx(fwt)
    fwt_matrix = metrics.forward_transfer_matrix(acc_matrix, random_init_acc)
    for j in range(1, num_tasks):
        key = f"ExperienceForwardTransfer/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"
        assert 100.0 * results[key] == pytest.approx(fwt_matrix[j - 1, j])


def test_to_avalanche_builds_the_splits_asked_for_and_leaves_out_empty_ones() -> None:
    stream = _streams()["split-task"]
    no_test = dataclasses.replace(
        stream, tasks=[dataclasses.replace(t, test_index=t.test_index[:0]) for t in stream.tasks]
    )
    benchmark = to_avalanche(no_test)
    assert hasattr(benchmark, "train_stream") and not hasattr(benchmark, "test_stream")
    only_train = to_avalanche(stream, splits=("train",))
    assert len(only_train.train_stream) == 5 and not hasattr(only_train, "test_stream")
    with pytest.raises(ValueError, match="unknown splits"):
        to_avalanche(stream, splits=("tset",))
