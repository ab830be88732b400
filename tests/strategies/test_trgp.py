"""TRGP: trust-region selection, scaling matrices that start at identity and change only for trust-region
tasks, scaled weights reused at evaluation, and tiny end-to-end runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def test_scaling_matrices_start_at_identity_and_change_only_in_the_trust_region(train_all, build):
    strategy, stream, _ = build("trgp", trust_threshold=0.0, top_k=1)
    trainer = train_all(strategy, stream)
    assert strategy.trust[0] == [[], [], []]
    for t in (1, 2):
        trusted = strategy.trust[t]
        assert all(len(layer) == 1 for layer in trusted)  # top_k=1, threshold 0: one old task per layer
        for layer, (initial, stored) in enumerate(
            zip(trainer.initial_history[t], strategy.task_scales[t], strict=True)
        ):
            assert len(initial) == len(stored) == len(trusted[layer])
            for q0, q in zip(initial, stored, strict=True):
                assert torch.equal(q0, torch.eye(q0.shape[0]))
                assert (q - torch.eye(q.shape[0])).abs().max() > 0  # learned for the trust-region task


def test_no_trust_region_means_no_scaling_and_plain_weights(train_all, build):
    strategy, stream, model = build("trgp", trust_threshold=1.0)
    train_all(strategy, stream)
    assert all(layer == [] for t in strategy.trust for layer in t)
    assert all(layer == [] for t in strategy.task_scales for layer in t)
    x = stream.inputs("test", stream.tasks[1].test_index[:20], 1)
    assert torch.equal(strategy.predict(x, 1), model(x, None))


def test_trust_region_picks_the_old_tasks_with_the_largest_projection(train_all, build):
    strategy, stream, _ = build("trgp", trust_threshold=0.3, top_k=1)
    train_all(strategy, stream)
    grads = [torch.randn(100, 785), torch.randn(100, 101), torch.randn(10, 101)]
    basis = strategy.task_bases[1][0]
    grads[0] = grads[0] @ basis @ basis.T  # layer 0: entirely inside task 1's subspace
    trust = strategy.select_trust_regions(grads)
    assert trust[0] == [1]


def test_evaluation_uses_each_tasks_own_scaled_weights(train_all, build):
    strategy, stream, model = build("trgp", bias=True, trust_threshold=0.0, top_k=2)
    train_all(strategy, stream)
    task = 2
    x = stream.inputs("test", stream.tasks[task].test_index[:20], task)
    expected = x.flatten(1)
    layers = [model.body[1], model.body[3], model.heads.heads[0]]
    for i, linear in enumerate(layers):
        weight = torch.cat([linear.weight, linear.bias[:, None]], 1)
        effective = weight.clone()
        for j, q in zip(strategy.trust[task][i], strategy.task_scales[task][i], strict=True):
            u = strategy.task_bases[j][i]
            effective = effective + weight @ u @ (q - torch.eye(q.shape[0])) @ u.T
        expected = F.linear(expected, effective[:, :-1], effective[:, -1])
        if i < 2:
            expected = F.relu(expected)
    model.eval()
    with torch.no_grad():
        got = strategy.predict(x, task)
        assert torch.allclose(got, expected, atol=1e-4)
        assert not torch.allclose(got, model(x, None), atol=1e-4)
    assert strategy.uses_task_oracle


def test_trgp_end_to_end_task_and_permuted_streams(run_tiny):
    result = run_tiny(["strategy=trgp", "stream=split_digits", "model=mlp", "strategy.num_samples=50"])
    assert result["status"] == "completed" and len(result["acc_matrix"]) == 5
    result = run_tiny(
        ["experiment=trgp_pfmnist", "stream.num_tasks=2", "stream.train_per_task=600", "trainer.epochs=1"]
    )
    assert result["status"] == "completed" and result["uses_task_oracle"]


def test_frozen_w_u_gives_the_same_projected_gradient_as_the_live_weight(train_all, build):
    strategy, stream, _ = build("trgp", trust_threshold=0.0, top_k=2)
    train_all(strategy, stream)
    task = stream.tasks[2]
    strategy.current_trust = strategy.trust[2]
    strategy.scales = [[torch.nn.Parameter(q + 0.1) for q in layer] for layer in strategy.task_scales[2]]
    x = stream.inputs("train", task.train_index[:16], task.id)
    y = task.train_targets[:16]
    grads = []
    for frozen in (True, False):
        strategy.train_pairs = strategy.current_pairs(frozen=frozen)
        strategy.model.zero_grad(set_to_none=True)
        F.cross_entropy(strategy.forward(x, task.id), y).backward()
        strategy.after_backward(task)
        grads.append([layer.grad_matrix().clone() for layer in strategy.layers])
    for frozen, live in zip(*grads, strict=True):
        assert torch.allclose(frozen, live, atol=1e-5)
