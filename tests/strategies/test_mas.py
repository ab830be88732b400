"""MAS: importance on a bias-free linear model, where d ||W x||^2 / dW = 2 (W x) x^T by hand."""

from __future__ import annotations

import pytest
import torch

from clbench.models import MLP
from clbench.streams import Stream, Task
from strategies.mas import MAS


def hand_stream(x: torch.Tensor) -> Stream:
    """A one-task domain stream over float inputs [N, 1, 1, 2], mean 0 / std 1 (inputs pass unchanged)."""
    n = x.shape[0]
    index, targets = torch.arange(n), torch.zeros(n, dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    task = Task(0, "hand", (0, 1), 2, index, targets, index, targets, empty, empty)
    return Stream("hand", "domain", [task], x, x, torch.zeros(1, 1), torch.ones(1, 1), num_classes=2)


def linear_mas(batch_size: int, second: tuple[float, float] = (0.0, 1.0)) -> tuple[MAS, Stream]:
    # W = [[1, -2], [3, 4]]; x1 = (1, 0): W x1 = (1, 3), grad = 2 [[1, 0], [3, 0]] = [[2, 0], [6, 0]]
    #                        x2 = (0, 1): W x2 = (-2, 4), grad = 2 [[0, -2], [0, 4]] = [[0, -4], [0, 8]]
    #                        x3 = (1, 1): W x3 = (-1, 7), grad = 2 [[-1, -1], [7, 7]] = [[-2, -2], [14, 14]]
    stream = hand_stream(torch.tensor([[[[1.0, 0.0]]], [[list(second)]]]))
    model = MLP(stream.input_shape, stream.head_sizes, hidden=[], bias=False)
    with torch.no_grad():
        model.heads.heads[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    mas = MAS(mas_lambda=1.0, importance_batch_size=batch_size)
    mas.setup(model, stream)
    mas._batch_size = batch_size
    return mas, stream


def test_importance_is_the_mean_absolute_output_norm_gradient():
    mas, stream = linear_mas(batch_size=1)
    params = dict(mas.model.named_parameters())
    omega = mas.estimate_importance(stream[0], params)["heads.heads.0.weight"]
    # mean over the two samples of |grad|: ([[2, 0], [6, 0]] + [[0, 4], [0, 8]]) / 2
    torch.testing.assert_close(omega, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_batch_estimate_takes_the_absolute_value_of_the_batch_mean_gradient():
    # x1 and x3 disagree in sign on W[0, 0]: per sample, mean |grad| = ([[2, 0], [6, 0]] + [[2, 2], [14, 14]]) / 2;
    # per batch of two, |mean grad| = |[[0, -2], [20, 14]]| / 2, so W[0, 0] cancels to 0
    expected = {1: [[2.0, 1.0], [10.0, 7.0]], 2: [[0.0, 1.0], [10.0, 7.0]]}
    for batch_size, omega_by_hand in expected.items():
        mas, stream = linear_mas(batch_size, second=(1.0, 1.0))
        omega = mas.estimate_importance(stream[0], dict(mas.model.named_parameters()))["heads.heads.0.weight"]
        torch.testing.assert_close(omega, torch.tensor(omega_by_hand))


def test_alpha_averages_and_none_sums():
    for alpha, expected in ((None, 3.0), (0.5, 1.5)):
        mas = MAS(mas_lambda=1.0, alpha=alpha)
        mas.consolidate({"w": torch.ones(1)}, {"w": torch.zeros(1)})
        mas.consolidate({"w": 2 * torch.ones(1)}, {"w": torch.ones(1)})
        assert mas.importance["w"].item() == pytest.approx(expected)
        assert mas.anchor["w"].item() == 1.0


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_end_to_end_on_split_digits(run_tiny, scenario):
    result = run_tiny(["strategy=mas", "stream=split_digits", f"stream.scenario={scenario}"])
    assert result["status"] == "completed"
    assert result["metrics"]["acc"] > (70.0 if scenario == "task" else 20.0)


def test_per_sample_magnitude_is_eq_4_whatever_the_batch_size():
    # x1 = (1, 0) and x3 = (1, 1) disagree in sign on W[0, 0]: Eq. 4 averages each sample's |grad|,
    # ([[2, 0], [6, 0]] + [[2, 2], [14, 14]]) / 2, also in a batch of two (where the batch estimate cancels)
    for batch_size in (1, 2):
        mas, stream = linear_mas(batch_size, second=(1.0, 1.0))
        mas.magnitude = "per_sample"
        omega = mas.estimate_importance(stream[0], dict(mas.model.named_parameters()))["heads.heads.0.weight"]
        torch.testing.assert_close(omega, torch.tensor([[2.0, 1.0], [10.0, 7.0]]))


def test_l2_output_norm_takes_the_gradient_of_the_norm_not_its_square():
    # ||W x|| for x1 = (1, 0): W x1 = (1, 3), grad = (W x1) x1^T / ||W x1|| = [[1, 0], [3, 0]] / sqrt(10)
    stream = hand_stream(torch.tensor([[[[1.0, 0.0]]]]))
    model = MLP(stream.input_shape, stream.head_sizes, hidden=[], bias=False)
    with torch.no_grad():
        model.heads.heads[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    mas = MAS(mas_lambda=1.0, output_norm="l2", importance_batch_size=1)
    mas.setup(model, stream)
    mas._batch_size = 1
    omega = mas.estimate_importance(stream[0], dict(mas.model.named_parameters()))["heads.heads.0.weight"]
    torch.testing.assert_close(omega, torch.tensor([[1.0, 0.0], [3.0, 0.0]]) / 10**0.5)


@pytest.mark.parametrize(("setting", "message"), [("magnitude", "strategy.magnitude"), ("output_norm", "output_norm")])
def test_unknown_choices_stop_with_the_fix(setting, message):
    with pytest.raises(ValueError, match=message):
        MAS(**{setting: "other"})
