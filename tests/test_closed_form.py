"""``trainer.closed_form``: an MLP's gradients written out must be autograd's, and training with them the
same training (up to float rounding); where it cannot apply, ``auto`` steps aside and ``true`` says why."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from clbench.closed_form import ClosedFormStep, KeptLogits, closed_form_obstacle, use_closed_form
from clbench.models import MLP
from clbench.strategy import Batch
from clbench.trainer import Trainer
from strategies.ewc import EWC
from strategies.finetune import Finetune
from strategies.gradient_projection import TRGP

CPU = torch.device("cpu")


def built(compose_cfg, overrides: list[str], strategy=None):
    """A strategy set up on a small permuted (or given) stream with the configured MLP."""
    cfg = compose_cfg(["stream=permuted_mnist5k", "stream.num_tasks=2", "stream.train_per_task=120", *overrides])
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = strategy if strategy is not None else instantiate(cfg.strategy)
    strategy.setup(model, stream)
    return strategy, stream


def autograd_grads(strategy, batch: Batch, absent=None) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model = strategy.model
    model.zero_grad(set_to_none=True)
    output = strategy.forward(batch.x, batch.task_ids)
    if absent is not None:
        output = output.masked_fill(absent, torch.finfo(output.dtype).min)
    loss = F.cross_entropy(output, batch.y)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scenario", ["domain", "task"])
@pytest.mark.parametrize("masked", [False, True])
def test_written_out_gradients_are_autograds(compose_cfg, bias, scenario, masked):
    strategy, stream = built(
        compose_cfg,
        [f"model.bias={str(bias).lower()}", "model.hidden=[32,16]", f"stream.scenario={scenario}"],
        Finetune(),
    )
    task = stream.tasks[1]
    chosen = task.train_index[:13]
    batch = Batch(stream.inputs("train", chosen, task.id), task.train_targets[:13], task.id, chosen)
    absent = None
    if masked:  # SCoLe's group masking: absent classes' logits pushed to the minimum
        absent = torch.zeros(stream.head_sizes[0], dtype=torch.bool)
        absent[[c for c in range(stream.head_sizes[0]) if c not in set(batch.y.tolist())][:3]] = True
    loss, expected = autograd_grads(strategy, batch, absent)
    strategy.model.zero_grad(set_to_none=True)
    logits = ClosedFormStep.for_fit(strategy.model, strategy, task.id)(batch, absent)
    assert F.cross_entropy(logits, batch.y).item() == pytest.approx(loss.item(), rel=1e-6)
    assert logits.shape == (13, stream.head_sizes[task.id if scenario == "task" else 0])
    for name, param in strategy.model.named_parameters():
        if expected[name] is None:  # other tasks' heads: untouched, as by autograd
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(expected[n] is None for n in expected) == (scenario == "task")


def test_mixed_task_batches_with_task_heads_are_left_to_autograd(compose_cfg):
    strategy, stream = built(compose_cfg, ["stream.scenario=task"], Finetune())
    task = stream.tasks[0]
    chosen = task.train_index[:4]
    batch = Batch(stream.inputs("train", chosen, 0), task.train_targets[:4], torch.tensor([0, 1, 0, 1]), chosen)
    assert ClosedFormStep.for_fit(strategy.model, strategy, batch.task_ids) is None
    assert ClosedFormStep.for_fit(strategy.model, strategy, torch.tensor([1, 1, 1])) is None  # no single head per fit


def fitted(strategy, stream, closed_form: bool | str, tasks=(0, 1)) -> tuple[list[torch.Tensor], Trainer]:
    trainer = Trainer(progress=False, batch_size=10, epochs=2, lr=0.05, momentum=0.5, closed_form=closed_form)
    trainer.attach(stream, 0)
    torch.manual_seed(1)  # GPM draws its representation samples from the global generator
    for t in tasks:
        strategy.fit_task(stream.tasks[t], trainer)
        strategy.after_task(stream.tasks[t])
    return [p.detach().clone() for p in strategy.model.parameters()], trainer


@pytest.mark.parametrize("name", ["finetune", "gpm"])
def test_training_with_written_out_gradients_is_autograd_training(compose_cfg, name):
    """Two tasks (GPM projects the second against the first's bases through linear_gradient): the same
    parameters as autograd steps, from the same start and batches, up to float rounding."""
    overrides = [f"strategy={name}", "model.hidden=[32,16]", "model.bias=false"]
    if name == "gpm":
        overrides += ["strategy.num_samples=60", "strategy.threshold=[0.9,0.95,0.95]"]
    strategy, stream = built(compose_cfg, overrides)
    twin = copy.deepcopy(strategy)
    closed, trainer = fitted(strategy, stream, closed_form=True)
    eager, eager_trainer = fitted(twin, stream, closed_form=False)
    assert trainer.closed_form_steps == [24, 24] and eager_trainer.closed_form_steps == [0, 0]
    for a, b in zip(closed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if name == "gpm":  # the second task's update really was projected: old inputs keep their outputs
        assert strategy.bases[0] is not None and strategy.step_inputs == {}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [10, 2])
def test_gpm_projects_each_gradient_in_the_step_and_after_backward_leaves_it(compose_cfg, monkeypatch, bias, rank):
    """Rank 10 of 32 at batch 6: projecting the factors is cheaper; rank 2: projecting the formed
    gradient. Either way linear_gradient does it, once, and as the hooked autograd path would."""
    strategy, stream = built(compose_cfg, ["strategy=gpm", "model.hidden=[32,16]", f"model.bias={str(bias).lower()}"])
    strategy.bases[1] = torch.linalg.qr(torch.randn(strategy.layers[1].dim, rank))[0]
    strategy.refresh_projectors()
    task = stream.tasks[0]
    chosen = task.train_index[:6]
    batch = Batch(stream.inputs("train", chosen, 0), task.train_targets[:6], 0, chosen)
    twin = copy.deepcopy(strategy)
    _, unprojected = autograd_grads(twin, batch)
    twin.after_backward(task)  # the hooked path: factors caught by hooks, projected here
    ClosedFormStep.for_fit(strategy.model, strategy, task.id)(batch)
    assert strategy.projected_in_step == {1}
    projector, calls = strategy.projectors[1], []
    original = projector.remove_
    monkeypatch.setattr(projector, "remove_", lambda grad: calls.append(1) or original(grad))
    strategy.after_backward(task)
    assert calls == [] and strategy.projected_in_step == set()
    grad = strategy.layers[1].grad_matrix()
    assert (grad @ strategy.bases[1]).abs().max() < 1e-5  # projected off the stored basis
    for mine, theirs in zip(strategy.model.parameters(), twin.model.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    name = f"{strategy.layers[1].name}.weight"
    assert not torch.allclose(strategy.layers[1].module.weight.grad, unprojected[name])


def test_auto_applies_on_a_cpu_to_declared_strategies_and_mlps_only(compose_cfg):
    strategy, _ = built(compose_cfg, [], Finetune())
    model = strategy.model
    assert use_closed_form("auto", model, strategy, CPU, amp=None, compiled=False)
    assert not use_closed_form("auto", model, strategy, torch.device("cuda"), amp=None, compiled=False)
    assert not use_closed_form("auto", model, strategy, CPU, amp="bf16", compiled=False)
    assert not use_closed_form("auto", model, strategy, CPU, amp=None, compiled=True)
    assert not use_closed_form("auto", model, EWC(), CPU, amp=None, compiled=False)  # its loss adds a penalty
    assert not use_closed_form("auto", model, TRGP(), CPU, amp=None, compiled=False)  # scaled weights, not GPM's
    assert not use_closed_form(False, model, strategy, CPU, amp=None, compiled=False)


def test_closed_form_is_not_inherited_and_needs_the_base_loss():
    class Tweaked(Finetune):
        name = "tweaked"

    class Penalised(Finetune):
        name = "penalised"
        closed_form_safe = True

        def loss(self, output, y, batch, task):
            return super().loss(output, y, batch, task) + 1.0

    model = MLP([1, 4, 4], [3], hidden=[5])
    assert "does not declare closed_form_safe" in closed_form_obstacle(model, Tweaked(), None, False)
    assert "overrides its loss" in closed_form_obstacle(model, Penalised(), None, False)


def test_models_other_than_plain_mlps_are_refused():
    class Dropping(MLP):
        pass

    plain = MLP([1, 4, 4], [3], hidden=[5])
    assert closed_form_obstacle(plain, Finetune(), None, False) is None
    assert "not clbench's MLP" in closed_form_obstacle(Dropping([1, 4, 4], [3]), Finetune(), None, False)
    plain.body.append(torch.nn.Dropout(0.5))
    assert "other than Flatten, Linear and ReLU" in closed_form_obstacle(plain, Finetune(), None, False)


def test_true_names_why_it_cannot_apply(compose_cfg):
    strategy, stream = built(compose_cfg, ["strategy=ewc"])
    trainer = Trainer(progress=False, closed_form=True)
    trainer.attach(stream, 0)
    with pytest.raises(ValueError, match=r"closed_form=true cannot apply: strategy 'ewc' does not declare.*=false"):
        trainer.fit(strategy, [stream.tasks[0]])
    with pytest.raises(ValueError, match="use auto, true or false"):
        Trainer(closed_form="yes")


def test_runner_records_the_closed_form_steps_and_keeps_the_run_id(run_tiny, tmp_path):
    base = ["stream=split_digits", "model=mlp", "strategy=finetune"]
    closed = run_tiny(base, tmp_path / "closed")
    autograd = run_tiny([*base, "trainer.closed_form=false"], tmp_path / "autograd")
    assert all(n > 0 for n in closed["timings"]["closed_form_steps"])
    assert autograd["timings"]["closed_form_steps"] == [0] * len(autograd["acc_matrix"])
    # a speed switch, not a new experiment: the same run id
    assert Path(closed["paths"]["result"]).parent.name == Path(autograd["paths"]["result"]).parent.name
    for a, b in zip(closed["acc_matrix"], autograd["acc_matrix"], strict=True):
        assert a == pytest.approx(b, abs=1.0)


def test_closed_form_and_recorded_steps_are_not_combined(compose_cfg, monkeypatch):
    """On a GPU, whole-step CUDA graphs take the place of closed-form steps; demanding both is an error
    (checked here with the recording decision forced, as a CPU cannot record)."""
    strategy, stream = built(compose_cfg, [], Finetune())
    monkeypatch.setattr("clbench.trainer.use_graphs", lambda *args: True)
    trainer = Trainer(progress=False, closed_form=True)
    trainer.attach(stream, 0)
    with pytest.raises(ValueError, match=r"cannot be combined: set trainer\.cuda_graphs=false"):
        trainer.fit(strategy, [stream.tasks[0]])
    automatic = Trainer(progress=False)  # closed_form=auto steps aside for recorded steps
    automatic.attach(stream, 0)
    assert automatic._closed_form_for(strategy, 0) is not None
    automatic._recording = True
    assert automatic._closed_form_for(strategy, 0) is None


@pytest.mark.parametrize("bias", [True, False])
def test_gpm_projects_the_first_layers_inputs_once_per_block(compose_cfg, monkeypatch, bias):
    """The first layer's inputs are the data: their projection is made for a whole block in
    prepare_block, and a step's gradient from its rows is the one projected step by step."""
    strategy, stream = built(compose_cfg, ["strategy=gpm", "model.hidden=[32,16]", f"model.bias={str(bias).lower()}"])
    strategy.bases[0] = torch.linalg.qr(torch.randn(strategy.layers[0].dim, 40))[0]
    strategy.refresh_projectors()
    task = stream.tasks[1]
    block_index = task.train_index[:30]
    block = stream.inputs("train", block_index, task.id)
    aux = strategy.prepare_block(block, task)
    assert aux is not None and aux.shape == (30, strategy.layers[0].dim)
    rows = slice(10, 16)
    batch = Batch(block[rows], task.train_targets[rows], task.id, block_index[rows], aux[rows])
    plain = Batch(block[rows], task.train_targets[rows], task.id, block_index[rows])
    twin = copy.deepcopy(strategy)
    ClosedFormStep.for_fit(strategy.model, strategy, task.id)(batch)
    ClosedFormStep.for_fit(twin.model, twin, task.id)(plain)
    assert strategy.projected_in_step == twin.projected_in_step == {0}
    for mine, theirs in zip(strategy.model.parameters(), twin.model.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    # and through the trainer: every block of a projected task is prepared, every step reads its rows
    used = []
    original = strategy.linear_gradient
    monkeypatch.setattr(strategy, "linear_gradient", lambda *a: used.append(a[3].aux is not None) or original(*a))
    trainer = Trainer(progress=False, batch_size=10, epochs=1, closed_form=True)
    trainer.attach(stream, 0)
    trainer.fit(strategy, [task])
    assert trainer.closed_form_steps == [12] and used.count(True) == 12 * len(strategy.layers)


def test_no_block_projection_without_a_first_layer_basis_or_an_mlp(compose_cfg):
    strategy, stream = built(compose_cfg, ["strategy=gpm", "model.hidden=[32,16]"])
    task = stream.tasks[0]
    block = stream.inputs("train", task.train_index[:8], task.id)
    assert strategy.prepare_block(block, task) is None  # no basis yet
    strategy.bases[0] = torch.linalg.qr(torch.randn(strategy.layers[0].dim, 4))[0]
    strategy.refresh_projectors()
    assert strategy.prepare_block(block, task) is not None
    strategy.layers, strategy.bases = strategy.layers[1:], strategy.bases[1:]  # the first projected layer
    strategy.bases[0] = torch.linalg.qr(torch.randn(strategy.layers[0].dim, 4))[0]  # no longer sees the data
    strategy.refresh_projectors()
    assert strategy.prepare_block(block, task) is None


def test_block_threads_apply_to_block_preparation_and_are_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    trainer = Trainer(progress=False, block_threads="auto")
    trainer.stream = type("S", (), {"device": CPU})()
    with trainer.block_threading():
        assert calls == [3]
    assert calls == [3, 1]
    trainer.block_threads = None
    with trainer.block_threading():
        pass
    assert calls == [3, 1]
    for bad in (0, "many", 1.5):
        with pytest.raises(ValueError, match="block_threads must be null, auto or a thread count"):
            Trainer(block_threads=bad)


@pytest.mark.parametrize(("batch_size", "prefetch_mb", "checks"), [(7, 0.01, 4), (10, 16.0, 10), (13, 0.0, 1)])
def test_closed_form_losses_and_accuracies_are_the_autograd_ones(compose_cfg, batch_size, prefetch_mb, checks):
    """Closed-form steps keep their logits and read each step's loss and prediction back per block or NaN
    check: the epoch losses (means of per-step means, the last step of 120 rows possibly short) and training
    accuracies must be those the autograd steps report, for blocks of a few steps, blocks longer than the
    epoch, and one step per block."""
    strategy, stream = built(compose_cfg, ["model.hidden=[32,16]"], Finetune())
    twin = copy.deepcopy(strategy)
    reports = []
    for learner, closed_form in ((strategy, True), (twin, False)):
        trainer = Trainer(
            progress=False,
            batch_size=batch_size,
            epochs=2,
            lr=0.05,
            prefetch_mb=prefetch_mb,
            nan_checks_per_epoch=checks,
            closed_form=closed_form,
        )
        trainer.attach(stream, 0)
        learner.fit_task(stream.tasks[0], trainer)
        reports.append((trainer.epoch_losses[0], trainer.epoch_accuracies[0], trainer.closed_form_steps))
    (closed_losses, closed_acc, closed_steps), (eager_losses, eager_acc, eager_steps) = reports
    steps = math.ceil(120 / batch_size)
    assert closed_steps == [2 * steps] and eager_steps == [0]
    assert closed_losses == pytest.approx(eager_losses, rel=1e-5)
    assert closed_acc == pytest.approx(eager_acc, abs=1e-9)


def test_kept_logits_settle_each_steps_mean_loss_and_predictions():
    """Seven samples in steps of 3, 3 and 1, kept in blocks of two steps and settled piecemeal (mid-block,
    at the block's end, at the epoch's end): each step's loss is the mean cross-entropy of its own rows."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=generator)
    targets = torch.randint(0, 4, (7,), generator=generator)
    losses, predictions = torch.full((3,), -1.0), torch.full((7,), -1)
    kept = KeptLogits(3, targets, losses, predictions)
    head = torch.zeros(4, 5)  # a head's weight: 4 classes
    kept.start_block(0, 6, head)
    for step in range(3):
        chosen = slice(3 * step, min(3 * step + 3, 7))
        if step == 2:
            kept.start_block(2, 1, head)  # settles steps 0 and 1
            assert kept.settled == 2
        kept.rows(chosen).copy_(logits[chosen])
        if step == 0:
            kept.settle(1)
            assert losses[1] == -1.0 and losses[0] != -1.0
    kept.settle(3)
    expected = [F.cross_entropy(logits[s : s + 3], targets[s : s + 3]) for s in (0, 3, 6)]
    torch.testing.assert_close(losses, torch.stack(expected))
    assert torch.equal(predictions, logits.argmax(dim=1))
