"""CUBER: regime 1 everywhere reduces to GPM, regimes are decided once per task (no per-step recheck), a
regime-3 update leaves a regime-1 task's outputs unchanged while moving the regime-3 task's, the penalty, the
diagnostics agree with the runner's accuracy matrix, and tiny end-to-end runs."""

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


def train(strategy, stream, task_ids, **settings) -> Trainer:
    trainer = Trainer(progress=False, **{"epochs": 1, "batch_size": 32, "lr": 0.05, **settings})
    trainer.attach(stream, 0)
    for t in task_ids:
        strategy.fit_task(stream.tasks[t], trainer)
        strategy.after_task(stream.tasks[t])
    return trainer


@pytest.fixture
def trained_cuber(build):
    """``trained_cuber(**strategy_kwargs)``: CUBER set up on 3-task Permuted MNIST-5k after training task 0."""

    def _trained(**kwargs):
        strategy, stream, model = build("cuber", **kwargs)
        train(strategy, stream, [0])
        return strategy, stream, model

    return _trained


def test_all_old_tasks_in_regime_1_gives_exactly_gpms_update(build, trained_cuber):
    cuber, stream, model = trained_cuber(eps1=1.0)
    gpm, _, _ = build("gpm")
    gpm.model.load_state_dict(model.state_dict())
    gpm.bases = [b.clone() for b in cuber.bases]
    step_cuber, step_gpm = one_step(cuber, stream), one_step(gpm, stream)
    assert cuber.regime_log[-1]["regimes"] == [[1], [1], [1]]
    for a, b, raw in zip(step_cuber.grads, step_gpm.grads, step_gpm.raw, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, raw)


def test_regime_3_with_one_old_task_keeps_its_whole_subspace_update(trained_cuber):
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0)  # every trusted task in regime 3
    step = one_step(cuber, stream)
    assert cuber.regime_log[-1]["regimes"] == [[3], [3], [3]]
    for i, (grad, raw) in enumerate(zip(step.grads, step.raw, strict=True)):
        own = cuber.task_bases[0][i]
        # nothing else is protected: the old task's subspace (inside memory) keeps the raw gradient
        assert torch.allclose((grad @ own) @ own.T, (raw @ own) @ own.T, atol=1e-5)


def test_regimes_are_decided_once_per_task_and_not_rechecked_per_step(trained_cuber):
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0)

    class StrictAfterStart(Trainer):
        def fit(self, strategy, tasks, epochs=None, params=None):
            self.start = strategy.regimes()
            strategy.eps2 = 2.0  # no cosine exceeds 2: a per-step recheck would demote every pair
            losses = super().fit(strategy, tasks, epochs, params)
            self.end = strategy.regimes()
            return losses

    trainer = StrictAfterStart(epochs=1, batch_size=32, lr=0.05, progress=False)
    trainer.attach(stream, 0)
    cuber.fit_task(stream.tasks[1], trainer)
    assert trainer.start == trainer.end == [[3], [3], [3]]
    assert all(projector is not None for projector in cuber.free)  # still moving inside the old subspace


def test_recheck_per_epoch_can_demote_and_promote(trained_cuber):
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0, recheck_per_epoch=True)
    seen = []

    class Flip(Trainer):
        def fit(self, strategy, tasks, epochs=None, params=None):
            seen.append(strategy.regimes())
            strategy.eps2 = 2.0 if len(seen) == 1 else -1.0  # fail after epoch 1, pass again after epoch 2
            return super().fit(strategy, tasks, epochs, params)

    trainer = Flip(epochs=3, batch_size=64, lr=0.05, progress=False)
    trainer.attach(stream, 0)
    cuber.fit_task(stream.tasks[1], trainer)
    assert seen == [[[3], [3], [3]], [[2], [2], [2]], [[3], [3], [3]]]


def test_a_pair_promoted_by_a_recheck_without_scale_backward_drops_the_scaling_it_learnt(trained_cuber):
    """With ``scale_backward=false`` a regime-3 pair has no scaled projection (Q_j = I); a pair demoted to regime 2
    for an epoch learns a Q_j, and when the next recheck promoted it again that Q_j stayed in the forward."""
    cuber, stream, _ = trained_cuber(eps1=0.0, eps2=-1.0, lam=0.0, recheck_per_epoch=True, scale_backward=False)
    learnt = []

    class Flip(Trainer):
        def fit(self, strategy, tasks, epochs=None, params=None):
            strategy.eps2 = 2.0 if not learnt else -1.0  # regime 2 after epoch 1, regime 3 again after epoch 2
            done = super().fit(strategy, tasks, epochs, params)
            learnt.append([not torch.equal(q, torch.eye(q.shape[0])) for layer in strategy.scales for q in layer])
            return done

    trainer = Flip(epochs=3, batch_size=64, lr=0.05, progress=False)
    trainer.attach(stream, 0)
    cuber.fit_task(stream.tasks[1], trainer)
    assert cuber.regimes() == [[3], [3], [3]]
    assert not any(learnt[0]) and all(learnt[1])  # regime 3: Q stays I; regime 2: Q learns
    assert all(torch.equal(q.detach(), torch.eye(q.shape[0])) for layer in cuber.scales for q in layer)


def test_recheck_refuses_a_validation_schedule(trained_cuber):
    cuber, stream, _ = trained_cuber(recheck_per_epoch=True)
    trainer = Trainer(epochs=2, batch_size=64, lr=0.05, progress=False, lr_patience=2)
    trainer.attach(stream, 0)
    with pytest.raises(ValueError, match="recheck_per_epoch"):
        cuber.fit_task(stream.tasks[1], trainer)


def test_regime_3_update_leaves_a_regime_1_tasks_outputs_unchanged(build):
    # threshold 1 and every training example in the representation: each task's inputs lie in its bases,
    # so an update that never touches a protected subspace keeps that task's outputs exactly
    cuber, stream, model = build("cuber", threshold=1.0, num_samples=400, eps2=-1.0, lam=0.0)
    train(cuber, stream, [0, 1])
    cuber.select_trust_regions = lambda grads: [[1] for _ in grads]  # task 1 trusted (regime 3), task 0 regime 1
    tasks = stream.tasks
    x0 = stream.inputs("train", tasks[0].train_index, 0)
    x1 = stream.inputs("train", tasks[1].train_index, 1)
    model.eval()
    with torch.no_grad():
        before0, before1 = cuber.predict(x0, 0), cuber.predict(x1, 1)
    train(cuber, stream, [2], lr=0.1)
    model.eval()
    with torch.no_grad():
        after0, after1 = cuber.predict(x0, 0), cuber.predict(x1, 1)
    log = cuber.regime_log[-1]
    assert log["regimes"] == [[1, 3], [1, 3], [1, 3]]
    assert log["free_rank"][0] > 0
    assert torch.allclose(after0, before0, atol=1e-3 * before0.abs().max())
    assert not torch.allclose(after1, before1, atol=1e-2 * before1.abs().max())  # the regime-3 task moved


def test_lambda_penalty_pulls_back_inside_regime_3_subspaces(trained_cuber):
    cuber, stream, _ = trained_cuber(bias=False, eps1=0.0, eps2=-1.0, lam=10.0)
    one_step(cuber, stream)
    basis = cuber.task_bases[0][0]
    with torch.no_grad():
        cuber.layers[0].module.weight.add_(0.5 * basis[:, :1].T.expand_as(cuber.layers[0].module.weight))
    task = stream.tasks[1]
    x = stream.inputs("train", task.train_index[:8], task.id)
    y = task.train_targets[:8]
    batch = Batch(x, y, task.id, task.train_index[:8])
    with_penalty = cuber.loss(cuber.forward(x, task.id), y, batch, task)
    cuber.lam = 0.0
    without = cuber.loss(cuber.forward(x, task.id), y, batch, task)
    assert with_penalty > without


def test_diagnostics_match_the_runners_accuracy_matrix(run_tiny):
    result = run_tiny(["strategy=cuber", "strategy.eps1=0.0", "strategy.eps2=-1.0", "plots=false"])
    assert result["status"] == "completed"
    log, acc = result["cuber_regimes"], result["acc_matrix"]
    assert [entry["task"] for entry in log] == list(range(len(acc)))
    checked = 0
    for t, entry in enumerate(log[1:], start=1):
        assert len(entry["regimes"]) == len(result["projected_layers"])
        assert all(len(row) == t for row in entry["regimes"])
        for change in entry["regime3_accuracy"]:
            j = change["task"]
            assert any(row[j] == 3 for row in entry["regimes"])
            assert change["change"] == pytest.approx(acc[t][j] - acc[t - 1][j], abs=1e-6)
            checked += 1
    assert checked > 0


def test_cuber_end_to_end_task_stream(run_tiny):
    result = run_tiny(["strategy=cuber", "stream=split_digits", "model=mlp", "strategy.num_samples=50"])
    assert result["status"] == "completed" and len(result["acc_matrix"]) == 5


def force_regimes(cuber, trusted: list[int], backward: list[int]) -> None:
    """Every layer trusts ``trusted`` old tasks, of which ``backward`` are in regime 3 (the rest regime 2)."""
    cuber.select_trust_regions = lambda grads: [list(trusted) for _ in grads]

    def decide(grads, trust):
        cuber.correlations = [[None] * len(cuber.task_bases) for _ in cuber.layers]
        cuber.backward = [list(backward) for _ in cuber.layers]

    cuber.decide_regimes = decide


def test_regime_2_pairs_read_the_weight_live_where_a_regime_3_pair_moves_the_layer(build):
    cuber, stream, _ = build("cuber", lam=0.0)
    train(cuber, stream, [0, 1])
    force_regimes(cuber, trusted=[0, 1], backward=[1])
    one_step(cuber, stream, task_id=2)
    assert cuber.regime_log[-1]["regimes"] == [[2, 3], [2, 3], [2, 3]]
    for i, pairs in enumerate(cuber.train_pairs):
        assert cuber.free[i] is not None and len(pairs) == 2
        # W moves inside task 1's subspace, so task 0's scaled projection must read W U_0 from the live weight
        assert all(wu is None for _, _, wu in pairs)


def test_regime_2_pairs_stay_frozen_where_nothing_moves_inside_old_subspaces(build):
    cuber, stream, _ = build("cuber", lam=0.0)
    train(cuber, stream, [0, 1])
    force_regimes(cuber, trusted=[0, 1], backward=[])
    one_step(cuber, stream, task_id=2)
    assert cuber.regime_log[-1]["regimes"] == [[2, 2], [2, 2], [2, 2]]
    assert all(wu is not None for pairs in cuber.train_pairs for _, _, wu in pairs)  # TRGP's frozen read


def test_first_order_diagnostic_predicts_the_old_tasks_loss_change_from_the_free_move(build):
    # every training example in the stored gradient: the prediction is the first-order term of task 0's loss
    cuber, stream, model = build("cuber", bias=False, eps1=0.0, eps2=-1.0, lam=0.0, grad_samples=10_000)
    trainer = train(cuber, stream, [0], lr=0.002)
    task0 = stream.tasks[0]
    x0, y0 = stream.inputs("train", task0.train_index, 0), task0.train_targets

    def loss0() -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(cuber.predict(x0, 0), y0))

    start = [layer.module.weight.detach().clone() for layer in cuber.layers]
    base = loss0()
    cuber.fit_task(stream.tasks[1], trainer)  # no after_task: it would drop the free subspaces
    log = cuber.regime_log[-1]
    assert log["regimes"] == [[3], [3], [3]] and all(norm > 0 for norm in log["free_move"])
    with torch.no_grad():  # keep only the move inside each free subspace, then measure task 0's loss
        for layer, w0, free in zip(cuber.layers, start, cuber.free, strict=True):
            move = free.component((layer.module.weight - w0).to(free.bases.dtype)).to(w0.dtype)
            layer.module.weight.copy_(w0 + move)
    actual = loss0() - base
    predicted = log["regime3_first_order"][0]["change"]
    assert predicted < 0 and actual < 0  # related permutations: the move is a descent direction for task 0
    assert predicted == pytest.approx(actual, rel=0.15)


@pytest.mark.parametrize("scale_backward", [True, False])
def test_scale_backward_decides_whether_regime_3_pairs_learn_their_scaling(build, scale_backward):
    cuber, stream, _ = build("cuber", lam=0.0, scale_backward=scale_backward)
    trainer = train(cuber, stream, [0, 1])
    force_regimes(cuber, trusted=[0, 1], backward=[1])
    cuber.fit_task(stream.tasks[2], trainer)
    assert cuber.regime_log[-1]["regimes"] == [[2, 3], [2, 3], [2, 3]]
    for layer in cuber.scales:
        regime2, regime3 = (q.detach() for q in layer)
        assert not torch.equal(regime2, torch.eye(regime2.shape[0]))  # regime 2 always learns Q
        assert torch.equal(regime3, torch.eye(regime3.shape[0])) is not scale_backward
