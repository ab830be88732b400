"""CUBER: regime 1 everywhere reduces to GPM, regime 3 keeps the old subspace's update and the per-step
recheck demotes it, and tiny end-to-end runs."""

from __future__ import annotations

import pytest
import torch

from clbench.strategy import Batch
from clbench.trainer import Trainer


class OneStep(Trainer):
    """Instead of training: one forward / backward / after_backward on a fixed batch, gradients recorded."""

    def fit(self, strategy, tasks, epochs=None, params=None):
        task = tasks[-1]
        x = self.stream.inputs("train", task.train_index[:40], task.id)
        y = task.train_targets[:40]
        strategy.model.train()
        strategy.model.zero_grad(set_to_none=True)
        loss = strategy.loss(strategy.forward(x, task.id), y, Batch(x, y, task.id, task.train_index[:40]), task)
        loss.backward()
        self.raw = [layer.grad_matrix().clone() for layer in strategy.layers]
        strategy.after_backward(task)
        self.grads = [layer.grad_matrix().clone() for layer in strategy.layers]
        return [float(loss)]


def one_step(strategy, stream, task_id: int = 1) -> OneStep:
    trainer = OneStep(progress=False)
    trainer.attach(stream, 0)
    torch.manual_seed(3)
    strategy.fit_task(stream.tasks[task_id], trainer)
    return trainer


@pytest.fixture
def trained_cuber(build):
    """``trained_cuber(**strategy_kwargs)``: CUBER set up on 3-task Permuted MNIST-5k after training task 0."""

    def _trained(**kwargs):
        strategy, stream, model = build("cuber", **kwargs)
        trainer = Trainer(epochs=1, batch_size=32, lr=0.05, progress=False)
        trainer.attach(stream, 0)
        strategy.fit_task(stream.tasks[0], trainer)
        strategy.after_task(stream.tasks[0])
        return strategy, stream, model

    return _trained


def test_all_old_tasks_in_regime_1_gives_exactly_gpms_update(build, trained_cuber):
    cuber, stream, model = trained_cuber(eps1=1.0)
    gpm, _, _ = build("gpm")
    gpm.model.load_state_dict(model.state_dict())
    gpm.bases = [b.clone() for b in cuber.bases]
    step_cuber, step_gpm = one_step(cuber, stream), one_step(gpm, stream)
    assert cuber.regime_log[-1]["start"] == [[1], [1], [1]]
    for a, b, raw in zip(step_cuber.grads, step_gpm.grads, step_gpm.raw, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, raw)


def test_positively_correlated_old_task_keeps_its_subspace_update(trained_cuber):
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0)  # every trusted task in regime 3
    step = one_step(cuber, stream)
    assert cuber.regime_log[-1]["start"] == [[3], [3], [3]]
    for i, (grad, raw) in enumerate(zip(step.grads, step.raw, strict=True)):
        own = cuber.task_bases[0][i]
        inside = (raw @ own) @ own.T
        # the old task's own subspace is kept; everything else old is projected out
        assert torch.allclose((grad @ own) @ own.T, inside, atol=1e-5)
        rest = cuber.bases[i] - own @ (own.T @ cuber.bases[i])
        assert (grad @ rest).abs().max() < 1e-4 * raw.abs().max() + 1e-7


def test_failed_correlation_recheck_demotes_to_regime_2(trained_cuber):
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0)

    class StrictRecheck(OneStep):
        def fit(self, strategy, tasks, epochs=None, params=None):
            self.start = strategy.regimes()
            strategy.eps2 = 2.0  # no cosine exceeds 2: the per-step recheck must fail
            return super().fit(strategy, tasks, epochs, params)

    trainer = StrictRecheck(progress=False)
    trainer.attach(stream, 0)
    cuber.fit_task(stream.tasks[1], trainer)
    assert trainer.start == [[3], [3], [3]]
    assert cuber.regimes() == [[2], [2], [2]]
    for bases, grad in zip(cuber.bases, trainer.grads, strict=True):
        assert (grad @ bases).abs().max() < 1e-4 * grad.abs().max() + 1e-6  # projected out, as regime 2


def test_lambda_penalty_pulls_back_inside_regime_3_subspaces(trained_cuber):
    cuber, stream, _ = trained_cuber(bias=False, eps1=0.0, eps2=-1.0, lam=10.0)
    one_step(cuber, stream)
    member = cuber.regime3[0][0]
    with torch.no_grad():
        cuber.layers[0].module.weight.add_(0.5 * member.basis[:, :1].T.expand_as(cuber.layers[0].module.weight))
    task = stream.tasks[1]
    x = stream.inputs("train", task.train_index[:8], task.id)
    y = task.train_targets[:8]
    batch = Batch(x, y, task.id, task.train_index[:8])
    with_penalty = cuber.loss(cuber.forward(x, task.id), y, batch, task)
    cuber.lam = 0.0
    without = cuber.loss(cuber.forward(x, task.id), y, batch, task)
    assert with_penalty > without


def test_cuber_end_to_end_task_and_permuted_streams(run_tiny):
    result = run_tiny(["strategy=cuber", "stream=split_digits", "model=mlp", "strategy.num_samples=50"])
    assert result["status"] == "completed" and len(result["acc_matrix"]) == 5
    result = run_tiny(
        ["experiment=cuber_pfmnist", "stream.num_tasks=2", "stream.train_per_task=500", "trainer.epochs=1"]
    )
    assert result["status"] == "completed" and len(result["cuber_regimes"]) == 2
