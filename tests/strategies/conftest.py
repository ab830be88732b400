"""Shared set-up for the gradient-projection tests: a strategy composed as a user gets it, and a trainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from clbench.__main__ import CONFIG_DIR
from clbench.data import load_synthetic
from clbench.models import MLP
from clbench.streams import split_stream
from clbench.trainer import Trainer


def _build(strategy: str, bias: bool = True, overrides: Sequence[str] = (), **kwargs: Any):
    """A set-up strategy on 3-task Permuted MNIST-5k (shared head, MLP 100-100), composed as a user gets it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "stream=permuted_mnist5k",
                "stream.num_tasks=3",
                "stream.train_per_task=400",
                "model=mlp",
                f"model.bias={str(bias).lower()}",
                f"strategy={strategy}",
                "logger=none",
                *overrides,
            ],
        )
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    instance = instantiate(cfg.strategy, **kwargs)
    instance.setup(model, stream)
    return instance, stream, model


class RecordingTrainer(Trainer):
    """A real trainer that also records the scaling matrices the strategy hands it at the start of fit."""

    def fit(self, strategy, tasks, epochs=None, params=None):
        self.initial_scales = [[q.detach().clone() for q in layer] for layer in strategy.scales]
        return super().fit(strategy, tasks, epochs, params)


def _train_all(strategy, stream, epochs: int = 1) -> RecordingTrainer:
    trainer = RecordingTrainer(epochs=epochs, batch_size=32, lr=0.05, progress=False)
    trainer.attach(stream, 0)
    trainer.initial_history = []
    for task in stream:
        strategy.fit_task(task, trainer)
        trainer.initial_history.append(trainer.initial_scales)
        strategy.after_task(task)
    return trainer


@pytest.fixture
def build():
    """``build("gpm", bias=False, overrides=[...])`` -> (strategy, stream, model)."""
    return _build


@pytest.fixture
def train_all():
    """``train_all(strategy, stream)`` trains every task with a trainer that records TRGP's scales."""
    return _train_all


def _masked_setup(strategy, num_tasks: int = 5, **trainer_settings: Any):
    """``strategy`` set up on a synthetic split stream (MLP 32-32) plus a trainer. By default SGD with momentum
    and weight decay: both would move frozen weights through a zero gradient, so a freeze guard must stop them."""
    torch.manual_seed(0)
    data = load_synthetic(num_classes=2 * num_tasks, shape=(1, 8, 8), train_per_class=40, test_per_class=10)
    stream = split_stream(data, num_tasks, 2)
    strategy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[32, 32], bias=False), stream)
    settings = {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **trainer_settings}
    trainer = Trainer(progress=False, **settings)
    trainer.attach(stream, 0)
    return stream, trainer


@pytest.fixture
def masked_setup():
    """``masked_setup(strategy, num_tasks=5, **trainer_settings)`` -> (stream, trainer) for supermask tests."""
    return _masked_setup
