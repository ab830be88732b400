"""Synaptic Intelligence: the path integral on a 2-parameter quadratic, checked against hand arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strategies.si import SI


class TwoWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 1.0]))


CURVATURE = torch.tensor([1.0, 2.0])


def sgd_steps(si: SI, model: TwoWeights, steps: int, lr: float, with_penalty: bool) -> None:
    """Plain SGD on L(w) = 0.5 * sum a_i w_i^2 (+ the SI penalty), calling the hooks the trainer calls."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = 0.5 * (CURVATURE * model.w**2).sum()
        if with_penalty:
            loss = loss + si.strength * si.penalty()
        optimizer.zero_grad()
        loss.backward()
        si.after_backward(None)
        optimizer.step()
        si.after_step(None)


def start_task(si: SI, model: TwoWeights) -> None:
    si.model = model
    si._trained = dict(model.named_parameters())
    si.before_fit(None)


def test_importance_matches_the_hand_computed_path_integral():
    # Two SGD steps, lr 0.1, from w = (1, 1) on L = 0.5 (w1^2 + 2 w2^2):
    #   step 1: g = (1, 2),     delta = (-0.1, -0.2),   -g*delta = (0.1, 0.4),     w -> (0.9, 0.8)
    #   step 2: g = (0.9, 1.6), delta = (-0.09, -0.16), -g*delta = (0.081, 0.256), w -> (0.81, 0.64)
    #   omega = (0.181, 0.656); total change Delta = (-0.19, -0.36), Delta^2 = (0.0361, 0.1296)
    #   Omega = omega / (Delta^2 + xi), xi = 0.01: (0.181 / 0.0461, 0.656 / 0.1396)
    si, model = SI(c=1.0, xi=0.01), TwoWeights()
    start_task(si, model)
    sgd_steps(si, model, steps=2, lr=0.1, with_penalty=False)
    torch.testing.assert_close(si.path_integral["w"], torch.tensor([0.181, 0.656]))
    omega = si.estimate_importance(None, dict(model.named_parameters()))["w"]
    torch.testing.assert_close(omega, torch.tensor([0.181 / 0.0461, 0.656 / 0.1396]))


def test_path_integral_uses_the_task_gradient_not_the_penalty_gradient():
    # With an importance already in place the loss carries c * Omega * (w - anchor)^2, but the path
    # integral must still be -sum g_task * delta: here one step from w = (1, 1), anchor (0, 0), Omega = (1, 1),
    # c = 0.5: full gradient = g_task + 2 c Omega w = (1, 2) + (1, 1) = (2, 3), delta = -0.1 * (2, 3)
    #   -g_task * delta = (1 * 0.2, 2 * 0.3) = (0.2, 0.6)   (the full gradient would give (0.4, 0.9))
    si, model = SI(c=0.5, xi=0.01), TwoWeights()
    si.importance = {"w": torch.tensor([1.0, 1.0])}
    si._effective = dict(si.importance)  # what fit_task would set (no cap: 0.1 * 0.5 * 1 is below the SGD bound)
    si.anchor = {"w": torch.tensor([0.0, 0.0])}
    start_task(si, model)
    sgd_steps(si, model, steps=1, lr=0.1, with_penalty=True)
    torch.testing.assert_close(si.path_integral["w"], torch.tensor([0.2, 0.6]))


def test_importance_accumulates_over_tasks_and_anchor_moves():
    si, model = SI(c=1.0, xi=0.01), TwoWeights()
    si._batch_size = 1
    for _ in range(2):
        start_task(si, model)
        sgd_steps(si, model, steps=2, lr=0.1, with_penalty=False)
        new = si.estimate_importance(None, dict(model.named_parameters()))
        before = si.importance.get("w", torch.zeros(2)).clone()
        si.consolidate(new, {"w": model.w.detach().clone()})
        torch.testing.assert_close(si.importance["w"], before + new["w"])
        torch.testing.assert_close(si.anchor["w"], model.w.detach())


def test_xi_must_be_positive():
    with pytest.raises(ValueError, match="xi"):
        SI(c=1.0, xi=0.0)


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_end_to_end_on_split_digits(run_tiny, scenario):
    result = run_tiny(["strategy=si", "stream=split_digits", f"stream.scenario={scenario}"])
    assert result["status"] == "completed"
    assert result["metrics"]["acc"] > (70.0 if scenario == "task" else 20.0)
