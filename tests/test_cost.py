"""Cost figures: bytes kept between tasks, training steps, FLOPs of a step, and their place in result.json."""

import math
from types import SimpleNamespace

import torch
from torch import nn

from clbench import cost


def test_kept_bytes_counts_each_storage_once_and_not_the_model():
    model = nn.Linear(10, 4)  # 44 float32 parameters: 176 bytes
    anchor = [p.detach().clone() for p in model.parameters()]
    fisher = torch.zeros(10, 4)
    state = {"model": model.state_dict(), "anchor": anchor, "importance": [fisher, fisher[:2]], "tasks": 3}
    assert cost.kept_bytes({"model": model.state_dict()}, model.state_dict()) == 0  # fine-tuning keeps nothing
    assert cost.kept_bytes(state, model.state_dict()) == 176 + 160  # the anchor, and the Fisher once


def test_strategy_kept_bytes_default_reads_its_state_dict():
    from clbench.strategy import Strategy

    class Anchored(Strategy):
        def state_dict(self):
            return {**super().state_dict(), "anchor": [p.detach().clone() for p in self.model.parameters()]}

    strategy = Anchored()
    strategy.model = nn.Linear(3, 2)  # 8 parameters
    assert strategy.kept_bytes() == 32
    plain = Strategy()
    plain.model = strategy.model
    assert plain.kept_bytes() == 0


def test_step_counter_counts_epochs_times_batches_of_every_fit():
    tasks = [SimpleNamespace(num_train=100), SimpleNamespace(num_train=50)]
    trainer = SimpleNamespace(batch_size=32, fit=lambda strategy, fitted, epochs=None: [0.0] * (epochs or 2))
    counter = cost.StepCounter()
    counter.attach(trainer)
    trainer.fit(None, tasks[:1])  # 2 epochs x ceil(100 / 32) = 8
    trainer.fit(None, tasks, epochs=1)  # joint: 1 epoch x ceil(150 / 32) = 5
    assert counter.steps == 13 and counter.samples == 2 * 100 + 150


def test_result_records_cost_with_the_step_flops_of_the_mlp(run_tiny):
    result = run_tiny(["stream.num_tasks=2", "stream.train_per_task=256", "trainer.batch_size=64", "count_flops=true"])
    recorded = result["cost"]
    assert recorded["train_steps"] == 2 * math.ceil(256 / 64) and recorded["train_samples"] == 512
    # MLP 784-100-100-10 (one shared head in the domain scenario), batch 64: forward 2*B*(in*out) per layer;
    # backward the weight gradients (as many) and the input gradients of layers 2 and 3 (the data needs none)
    batch, layers = 64, [(784, 100), (100, 100), (100, 10)]
    forward = sum(2 * batch * i * o for i, o in layers)
    backward = forward + sum(2 * batch * i * o for i, o in layers[1:])
    assert recorded["step_flops"] == forward + backward
    assert recorded["train_flops"] == recorded["step_flops"] * recorded["train_steps"]
    assert recorded["kept_bytes"] == 0  # fine-tuning keeps nothing between tasks
    assert recorded["peak_memory_bytes"] > 10 * 2**20 and recorded["peak_memory_kind"] == "rss"


def test_a_single_run_skips_the_flop_count_by_default_and_says_so(run_tiny):
    """count_flops=auto counts in sweeps only: the counter imports torch._dynamo (~2.8 s, half a default run)."""
    recorded = run_tiny(["stream.num_tasks=2", "stream.train_per_task=128"])["cost"]
    assert recorded["train_flops"] is None and "count_flops" in recorded["flops_error"]
    assert recorded["train_steps"] == 2 * math.ceil(128 / 64)
