"""TRGP's official-code behaviours kept as options (issue 22): the memory update that never stores the first
residual direction, and the third task's trust region fixed to the previous task."""

from __future__ import annotations

import torch

from clbench.trainer import Trainer
from strategies.gradient_projection.projection import trgp_update


def _activation_with_two_new_directions() -> tuple[torch.Tensor, torch.Tensor]:
    """An old basis e0 and inputs with energy 1 on e0, 16 on e1 and 4 on e2 (d = 5, 3 samples)."""
    old = torch.eye(5)[:, :1]
    activation = torch.zeros(5, 3, dtype=torch.float64)
    activation[0, 0], activation[1, 1], activation[2, 2] = 1.0, 4.0, 2.0
    return old, activation


def test_default_memory_update_stores_every_chosen_residual_direction():
    old, activation = _activation_with_two_new_directions()
    memory, own = trgp_update(old, activation, threshold=0.99)
    assert memory.shape[1] == 3  # e0 plus both new directions
    assert torch.allclose((memory[:, 1:].abs() > 0.5).float().sum(0), torch.ones(2))
    assert own.shape[1] == 3


def test_official_memory_update_leaves_the_largest_residual_direction_out_of_memory():
    old, activation = _activation_with_two_new_directions()
    memory, own = trgp_update(old, activation, threshold=0.99, skip_first_residual=True)
    e1 = torch.eye(5)[:, 1]
    assert memory.shape[1] == 2  # e0 and e2 only
    assert (memory.T @ e1).abs().max() < 1e-6  # e1 (energy 16, the first residual) never stored
    assert own.shape[1] == 3 and (own.T @ e1).abs().max() > 0.99  # but still in the task's own basis


def test_third_task_trust_region_is_the_previous_task_alone_with_the_official_option(build):
    strategy, stream, _ = build("trgp", trust_threshold=0.0, top_k=2)
    # tasks 0 and 1 only, so that the next selection is the third task's
    trainer = Trainer(epochs=1, batch_size=32, lr=0.05, progress=False)
    trainer.attach(stream, 0)
    for task in stream.tasks[:2]:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
    basis0 = strategy.task_bases[0][0]
    grads = [torch.randn(100, 785), torch.randn(100, 101), torch.randn(10, 101)]
    grads[0] = grads[0] @ basis0 @ basis0.T  # layer 0: inside task 0's subspace, so task 0 ranks first
    assert strategy.select_trust_regions(grads)[0][0] == 0  # default: ranked by projection norm
    strategy.third_task_previous_only = True
    trust = strategy.select_trust_regions(grads)
    assert all(layer in ([1], []) for layer in trust)
    assert trust[1] == [1]  # threshold 0: task 1 always passes
