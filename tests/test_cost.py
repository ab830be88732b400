"""Cost figures: bytes kept between tasks, training steps, FLOPs of a step, and their place in result.json."""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
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


def test_count_flops_auto_skips_the_count_in_a_single_run_and_says_so(run_tiny):
    recorded = run_tiny(["stream.num_tasks=2", "stream.train_per_task=128", "count_flops=auto"])["cost"]
    assert recorded["train_flops"] is None and "count_flops" in recorded["flops_error"]
    assert recorded["train_steps"] == 2 * math.ceil(128 / 64)


@pytest.mark.parametrize(
    "model, x",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)), (10, 1, 28, 28)),
        (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            (4, 3, 16, 16),
        ),
        (nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), (2, 7, 32)),  # decomposed operations too
    ],
)
def test_step_flop_counter_counts_what_torchs_flop_counter_counts(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    from clbench.cost import StepFlopCounter

    inputs = torch.randn(x)
    ours, torchs = StepFlopCounter(), FlopCounterMode(display=False)
    for mode in (ours, torchs):
        with mode, torch.enable_grad():
            model(inputs).sum().backward()
    assert ours.total == torchs.get_total_flops() > 0


def test_counting_a_step_does_not_import_torch_dynamo():
    """FlopCounterMode imported torch._dynamo on its first operation: ~2.8 s of every sweep process."""
    code = (
        "import sys, torch\n"
        "from clbench.cost import StepFlopCounter\n"
        "counter = StepFlopCounter()\n"
        "with counter:\n"
        "    torch.nn.Linear(4, 2)(torch.randn(3, 4)).sum().backward()\n"
        "assert counter.total > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
