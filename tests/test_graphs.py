"""``trainer.cuda_graphs``: a recorded-and-replayed training step must train exactly as the eager step.

The first group runs everywhere (the switch's errors). The second needs a CUDA device and is skipped
without one; it is run on a GPU machine (the closing note of the performance issue says where and
when), never counted as passing on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from clbench.graphs import GraphedStep, check_graph_safe, use_graphs
from clbench.strategy import Batch, Strategy
from clbench.trainer import Trainer
from strategies.finetune import Finetune
from strategies.gradient_projection import GPM
from strategies.lwf import LwF

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# every strategy that declares graph_safe, by its config name
GRAPH_SAFE = ["finetune", "gpm", "trgp", "cuber", "ewc", "ewc_online", "si", "mas"]


def test_cuda_graphs_on_cpu_names_the_fix():
    with pytest.raises(ValueError, match=r"needs device=cuda.*set it to false"):
        check_graph_safe(Finetune(), torch.device("cpu"))


def test_a_strategy_that_does_not_declare_graph_safety_is_refused():
    with pytest.raises(ValueError, match=r"'lwf' does not declare graph-safe.*cuda_graphs=false"):
        check_graph_safe(LwF(), CUDA)
    check_graph_safe(GPM(), CUDA)  # declared: no error


def test_graph_safety_is_not_inherited():
    class TweakedGPM(GPM):
        name = "tweaked_gpm"

        def after_step(self, task):  # a new hook the parent's declaration never covered
            pass

    with pytest.raises(ValueError, match="'tweaked_gpm' does not declare"):
        check_graph_safe(TweakedGPM(), CUDA)


def test_every_listed_strategy_declares_graph_safety(compose_cfg):
    """The GPU contract test below covers exactly the strategies that declare it."""
    declared = []
    for name in ["finetune", "gpm", "trgp", "cuber", "ewc", "ewc_online", "si", "mas", "lwf", "supsup", "joint"]:
        if instantiate(compose_cfg([f"strategy={name}"]).strategy).declares("graph_safe"):
            declared.append(name)
    assert declared == GRAPH_SAFE


def cpu_finetune(compose_cfg) -> tuple[Finetune, object]:
    """Fine-tuning set up on a small 2-task permuted stream on the CPU."""
    cfg = compose_cfg(["stream=permuted_mnist5k", "stream.num_tasks=2", "stream.train_per_task=100"])
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = Finetune()
    strategy.setup(model, stream)
    return strategy, stream


def test_fit_refuses_cuda_graphs_on_a_cpu_stream(compose_cfg):
    strategy, stream = cpu_finetune(compose_cfg)
    trainer = Trainer(progress=False, cuda_graphs=True)
    trainer.attach(stream, 0)
    with pytest.raises(ValueError, match="needs device=cuda"):
        trainer.fit(strategy, [stream.tasks[0]])


def test_auto_records_only_where_it_applies():
    cpu = torch.device("cpu")
    assert use_graphs("auto", GPM(), CUDA, compiled=False)
    assert not use_graphs("auto", GPM(), cpu, compiled=False)
    assert not use_graphs("auto", LwF(), CUDA, compiled=False)  # not declared graph-safe
    assert not use_graphs("auto", GPM(), CUDA, compiled=True)  # torch.compile records graphs of its own
    assert not use_graphs(False, GPM(), CUDA, compiled=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        use_graphs(True, GPM(), CUDA, compiled=True)


def test_auto_on_a_cpu_stream_trains_eagerly(compose_cfg):
    strategy, stream = cpu_finetune(compose_cfg)
    trainer = Trainer(progress=False)
    assert trainer.cuda_graphs == "auto"
    trainer.attach(stream, 0)
    trainer.fit(strategy, [stream.tasks[0]])
    assert trainer.graph_replays == []


def test_unknown_cuda_graphs_value_names_the_choices():
    with pytest.raises(ValueError, match="use auto, true or false"):
        Trainer(cuda_graphs="always")


def test_a_recording_replays_only_batches_it_computes():
    """Replays need the recorded shapes, and for an int task id the recorded id (the recorded Python took
    its branches for it); anything else runs eagerly. Pure bookkeeping, so checked here on the CPU."""
    graphed = GraphedStep(step=lambda batch: batch, zero_grad=lambda: None)

    def batch(rows: int, task_ids) -> Batch:
        return Batch(torch.zeros(rows, 4), torch.zeros(rows, dtype=torch.long), task_ids, torch.arange(rows))

    graphed.static = batch(8, 2)
    assert graphed._fits(batch(8, 2))
    assert not graphed._fits(batch(5, 2))  # the ragged last batch
    assert not graphed._fits(batch(8, 3))  # another task's id
    assert not graphed._fits(batch(8, torch.full((8,), 2)))
    graphed.static = batch(8, torch.full((8,), 2))
    assert graphed._fits(batch(8, torch.arange(8)))  # per-sample ids are data: copied in, not recorded


def test_warmup_must_be_at_least_one_step():
    with pytest.raises(ValueError, match="graph_warmup_steps must be >= 1"):
        Trainer(graph_warmup_steps=0)


# -- on a GPU ----------------------------------------------------------------------------------------


def train(compose_cfg, name: str, graphs: bool, **trainer_kwargs):
    """Train ``strategy=name`` over a 3-task stream on the GPU; returns the final parameters, R and the
    trainer. 310 samples at batch 32: 9 full batches and a ragged one of 22 per epoch."""
    overrides = [
        "stream=permuted_mnist5k",
        "stream.num_tasks=3",
        "stream.train_per_task=310",
        f"strategy={name}",
    ]
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    stream = instantiate(cfg.stream).to(CUDA)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes).to(CUDA)
    strategy: Strategy = instantiate(cfg.strategy)
    strategy.setup(model, stream)
    kwargs = {"batch_size": 32, "epochs": 2, "lr": 0.05, **trainer_kwargs}
    trainer = Trainer(progress=False, cuda_graphs=graphs, **kwargs)
    trainer.attach(stream, 0)
    rows = []
    for task in stream:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        rows.append(trainer.evaluate(strategy, give_task_id=False))
    params = [p.detach().clone() for p in model.parameters()]
    return params, rows, trainer


@needs_cuda
@pytest.mark.parametrize("name", GRAPH_SAFE)
def test_graphed_steps_train_as_the_eager_steps(compose_cfg, name):
    eager_params, eager_rows, _ = train(compose_cfg, name, graphs=False)
    params, rows, trainer = train(compose_cfg, name, graphs=True)
    assert set(trainer.graph_replays) == {2 * 9 - 3}  # every fit: 2 x 9 full batches less 3 warm-up steps
    assert len(trainer.graph_replays) >= 3
    for got, expected in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for row, eager_row in zip(rows, eager_rows, strict=True):
        assert row == pytest.approx(eager_row, abs=0.15)  # at most one test sample of 1,000 flips


@needs_cuda
def test_graphed_momentum_and_weight_decay_match_eager(compose_cfg):
    kwargs = {"momentum": 0.9, "weight_decay": 1e-3}
    eager_params, _, _ = train(compose_cfg, "gpm", graphs=False, **kwargs)
    params, _, _ = train(compose_cfg, "gpm", graphs=True, **kwargs)
    for got, expected in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_graphed_adam_matches_eager_capturable_adam(compose_cfg, monkeypatch):
    """Recorded steps use Adam's capturable variant (its step count on the device). Adam turns tiny
    numerical differences of near-zero gradients into full-size steps, so the eager reference is the same
    capturable Adam: what is compared is the recording, not two Adam implementations."""
    kwargs = {"optimizer": "adam", "lr": 1e-3}
    make = Trainer.make_optimizer

    def always_capturable(self, params, lr=None, capturable=False):
        return make(self, params, lr, capturable=True)

    monkeypatch.setattr(Trainer, "make_optimizer", always_capturable)
    eager_params, _, _ = train(compose_cfg, "finetune", graphs=False, **kwargs)
    params, _, _ = train(compose_cfg, "finetune", graphs=True, **kwargs)
    for got, expected in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_graphed_bf16_autocast_matches_eager(compose_cfg):
    eager_params, _, _ = train(compose_cfg, "gpm", graphs=False, amp="bf16")
    params, _, _ = train(compose_cfg, "gpm", graphs=True, amp="bf16")
    for got, expected in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@needs_cuda
def test_a_new_learning_rate_is_recorded_anew():
    """The optimizer bakes the lr into the recorded update, so a schedule's change must re-record."""
    weight = torch.nn.Parameter(torch.ones(4, device=CUDA))
    lrs = []

    def step(batch: Batch):
        loss = (weight * batch.x).sum()
        weight.grad = None
        loss.backward()
        with torch.no_grad():
            weight.sub_(weight.grad * lrs[-1])
        return loss.detach(), batch.y

    graphed = GraphedStep(step, lambda: setattr(weight, "grad", None), warmup=1)
    x = torch.ones(4, device=CUDA)
    batch = Batch(x, torch.zeros(4, device=CUDA, dtype=torch.long), 0, torch.arange(4, device=CUDA))
    for lr in [0.1, 0.1, 0.1, 0.01, 0.01]:
        lrs.append(lr)
        graphed(batch, key=lr)
    assert graphed.captures == 2 and graphed.replays == 4
    torch.testing.assert_close(weight.detach(), torch.full((4,), 1 - 3 * 0.1 - 2 * 0.01, device=CUDA))


@needs_cuda
def test_recording_every_task_does_not_grow_device_memory(compose_cfg):
    """Each fit records anew; what one task's recording holds must be gone by the next (a new warm-up
    stream per fit once kept a cuBLAS workspace per task: +20 MB per task on an H100)."""
    overrides = ["stream=permuted_mnist5k", "stream.num_tasks=6", "stream.train_per_task=128", "strategy=finetune"]
    cfg = compose_cfg(overrides)
    stream = instantiate(cfg.stream).to(CUDA)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes).to(CUDA)
    strategy = instantiate(cfg.strategy)
    strategy.setup(model, stream)
    trainer = Trainer(progress=False, batch_size=32, cuda_graphs=True)
    trainer.attach(stream, 0)
    allocated = []
    for task in stream:
        strategy.fit_task(task, trainer)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert trainer.graph_replays and all(r > 0 for r in trainer.graph_replays)
    assert allocated[-1] - allocated[1] < 2**20, allocated
