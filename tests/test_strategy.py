"""Strategy's default state_dict: a strategy's tensors and plain data survive a resume, or the resume is
refused in one line; never a silent continue without them."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from clbench.strategy import Strategy, UnresumableStrategyError


class Anchored(Strategy):
    """Keeps what users keep: tensors in a list, a dict, numbers, a module, a reference into the model."""

    name = "anchored"

    def __init__(self) -> None:
        super().__init__()
        self.anchor: list[torch.Tensor] | None = None
        self.counts: dict[str, int] = {}
        self.scale = 1.0
        self.teacher: nn.Module | None = None

    def setup(self, model, stream):
        model = super().setup(model, stream)
        self.first_weight = next(iter(model.parameters()))  # a reference into the model, not a copy
        self.teacher = nn.Linear(3, 2)
        return model

    def after_task(self, task):
        self.anchor = [p.detach().clone() + 1 for p in self.model.parameters()]
        self.counts[str(task.id)] = 7
        self.scale = 0.5
        nn.init.constant_(self.teacher.weight, 3.0)


def _set_up(compose_cfg, strategy: Strategy) -> Strategy:
    cfg = compose_cfg(["stream=split_digits", "stream.num_tasks=2"])
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy.setup(model, stream)
    return strategy


def _through_bytes(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_default_state_dict_keeps_tensors_and_plain_data(compose_cfg):
    trained = _set_up(compose_cfg, Anchored())
    trained.after_task(trained.stream.tasks[0])
    with torch.no_grad():
        trained.first_weight.add_(2.0)
    fresh = _set_up(compose_cfg, Anchored())
    fresh.load_state_dict(_through_bytes(trained.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(fresh.anchor, trained.anchor, strict=True))
    assert fresh.counts == {"0": 7} and fresh.scale == 0.5
    assert torch.equal(fresh.teacher.weight, torch.full((2, 3), 3.0))
    # restored in place: the reference still points into the model, which holds the trained value
    assert fresh.first_weight is next(iter(fresh.model.parameters()))
    assert torch.equal(fresh.first_weight, trained.first_weight)


class KeepsAnObject(Strategy):
    """Keeps state the default cannot save (an arbitrary object) and does not say how."""

    name = "keeps_an_object"

    def after_task(self, task):
        self.log = object()


def test_a_strategy_with_unsaveable_state_refuses_to_resume(compose_cfg):
    trained = _set_up(compose_cfg, KeepsAnObject())
    trained.after_task(trained.stream.tasks[0])
    state = trained.state_dict()
    assert state["unsaved"] == {"log": "object"}
    with pytest.raises(UnresumableStrategyError, match=r"keeps log \(object\).*override state_dict.*resume=false"):
        _set_up(compose_cfg, KeepsAnObject()).load_state_dict(_through_bytes(state))


class SaysHow(KeepsAnObject):
    """The same, with its own state_dict / load_state_dict: then resuming is its call."""

    name = "says_how"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log": "rebuilt"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.log = state["log"]


def test_a_strategy_that_says_how_resumes(compose_cfg):
    trained = _set_up(compose_cfg, SaysHow())
    trained.after_task(trained.stream.tasks[0])
    fresh = _set_up(compose_cfg, SaysHow())
    fresh.load_state_dict(_through_bytes(trained.state_dict()))
    assert fresh.log == "rebuilt"
