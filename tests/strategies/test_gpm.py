"""GPM: the energy criterion, orthogonal projection, batch-norm handling, and tiny end-to-end runs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from clbench.models import MLP
from clbench.strategy import Batch
from strategies.gradient_projection import GPM
from strategies.gradient_projection.projection import first_task_rank, gpm_update, residual_rank


def matrix_with_energies(energies: list[float], dim: int = 12, samples: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A [dim, samples] matrix whose squared singular values are ``energies``, and its left vectors."""
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(dim, len(energies), generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(samples, len(energies), generator=generator, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(energies, dtype=torch.float64).sqrt()) @ v.T, u


def test_first_task_basis_count_follows_the_energy_criterion():
    # energy ratios 0.5, 0.3, 0.1, 0.05, 0.03, 0.02: cumulative 0.5, 0.8, 0.9, 0.95, 0.98, 1.0
    activation, u = matrix_with_energies([50, 30, 10, 5, 3, 2])
    assert first_task_rank(torch.linalg.svdvals(activation), 0.85) == 2
    assert first_task_rank(torch.linalg.svdvals(activation), 0.93) == 3
    bases = gpm_update(None, activation, 0.85)
    assert bases.shape == (12, 2)
    # the kept directions are the two strongest singular directions
    assert torch.allclose((bases.double().T @ u[:, :2]).abs().sum(0), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_later_task_adds_residual_directions_until_the_threshold():
    activation, u = matrix_with_energies([50, 30, 10, 5, 3, 2])
    old = u[:, :2].float()  # already holds 0.8 of the energy
    assert residual_rank(0.8, torch.tensor([0.1, 0.05, 0.03, 0.02]), 0.93) == 2
    bases = gpm_update(old, activation, 0.93)
    assert bases.shape == (12, 4)
    assert torch.allclose(bases[:, :2], old)
    new = bases[:, 2:].double()
    assert torch.allclose((new.T @ u[:, 2:4]).abs().sum(1), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert gpm_update(old, activation, 0.75) is old  # enough energy already: nothing added


def test_basis_count_never_exceeds_the_dimension():
    activation, _ = matrix_with_energies([1.0] * 12, dim=12)
    full = gpm_update(None, activation, 1.0)
    assert gpm_update(full, activation + 0.1 * torch.randn_like(activation), 1.0).shape[1] <= 12


def set_random_bases(strategy) -> None:
    """Stand-in old-task bases: orthonormal, 5 + i columns for projected layer i."""
    generator = torch.Generator().manual_seed(1)
    strategy.bases = [
        torch.linalg.qr(torch.randn(layer.dim, 5 + i, generator=generator))[0]
        for i, layer in enumerate(strategy.layers)
    ]
    strategy.refresh_projectors()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch_size", [3, 400])  # factored (delta^T X) and formed-gradient paths
def test_projected_gradient_is_orthogonal_to_the_stored_bases(build, bias, batch_size):
    strategy, stream, _ = build("gpm", bias=bias)
    set_random_bases(strategy)
    task = stream.tasks[1]
    x = stream.inputs("train", task.train_index[:batch_size], task.id)
    y = task.train_targets[:batch_size]
    strategy.model.train()
    loss = strategy.loss(strategy.forward(x, task.id), y, Batch(x, y, task.id, task.train_index[:batch_size]), task)
    loss.backward()
    before = [layer.grad_matrix().clone() for layer in strategy.layers]
    strategy.after_backward(task)
    for layer, bases, raw in zip(strategy.layers, strategy.bases, before, strict=True):
        grad = layer.grad_matrix()
        assert (grad @ bases).abs().max() < 1e-4 * raw.abs().max()
        assert torch.allclose(grad, raw - (raw @ bases) @ bases.T, atol=1e-5)
        assert (grad - raw).abs().max() > 0  # the projection did something


@pytest.mark.parametrize("name", ["gpm", "trgp"])
def test_projection_under_bf16_autocast_stays_orthogonal(build, name):
    """Under ``trainer.amp=bf16`` the captured layer inputs and output gradients are bf16 while the bases
    are fp32: the factored projection must still run (it once failed with a dtype mismatch) and remove
    the old subspaces from the fp32 gradient up to bf16 rounding of the factors."""
    strategy, stream, _ = build(name)
    set_random_bases(strategy)
    task = stream.tasks[1]
    x = stream.inputs("train", task.train_index[:3], task.id)
    y = task.train_targets[:3]
    strategy.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = strategy.forward(x, task.id)
        loss = strategy.loss(output, y, Batch(x, y, task.id, task.train_index[:3]), task)
    assert output.dtype == torch.bfloat16
    loss.backward()
    before = [layer.grad_matrix().clone() for layer in strategy.layers]
    strategy.after_backward(task)
    for layer, bases, raw in zip(strategy.layers, strategy.bases, before, strict=True):
        grad = layer.grad_matrix()
        assert grad.dtype == torch.float32
        assert (grad @ bases).abs().max() < 2e-2 * raw.abs().max()
        assert (grad - raw).abs().max() > 0


def test_layers_without_a_basis_capture_nothing_in_the_training_step(build):
    """On the first task there is nothing to project: the step must not pay for input capture or tensor
    hooks; a layer that has a basis still captures its factors."""
    strategy, stream, _ = build("gpm", bias=False)
    task = stream.tasks[0]
    x = stream.inputs("train", task.train_index[:4], task.id)
    strategy.model.train()
    strategy.forward(x, task.id).sum().backward()
    assert strategy.step_inputs == {} and strategy.step_out_grads == {}
    strategy.bases[0] = torch.linalg.qr(torch.randn(strategy.layers[0].dim, 3))[0]
    strategy.refresh_projectors()
    strategy.forward(x, task.id).sum().backward()
    assert set(strategy.step_inputs) == {0} and set(strategy.step_out_grads) == {0}


def test_batchnorm_must_not_track_running_statistics(build):
    class WithBN(MLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.body.append(nn.BatchNorm1d(100))

    _, stream, _ = build("gpm")
    model = WithBN(list(stream.input_shape), stream.head_sizes)
    with pytest.raises(ValueError, match="track_running_stats=false"):
        GPM().setup(model, stream)


def test_batchnorm_affine_parameters_are_frozen_after_the_first_task(build):
    class WithBN(MLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.body.append(nn.BatchNorm1d(100, track_running_stats=False))

    _, stream, _ = build("gpm")
    strategy = GPM()
    strategy.setup(WithBN(list(stream.input_shape), stream.head_sizes), stream)
    bn = {id(p) for p in strategy.model.body[-1].parameters()}
    assert bn <= {id(p) for p in strategy.parameters(stream.tasks[0])}
    assert not bn & {id(p) for p in strategy.parameters(stream.tasks[1])}


def test_threshold_list_must_match_the_projected_layers(build):
    _, stream, model = build("gpm")
    with pytest.raises(ValueError, match="one value or 3"):
        GPM(threshold=[0.9, 0.9]).setup(copy.deepcopy(model), stream)


def test_multi_head_leaves_heads_free_and_a_shared_head_is_projected(build):
    strategy, _, _ = build("gpm")
    assert [layer.name for layer in strategy.layers] == ["body.1", "body.3", "heads.heads.0"]
    strategy, _, _ = build("gpm", overrides=["stream=split_digits"])
    assert [layer.name for layer in strategy.layers] == ["body.1", "body.3"]


@pytest.mark.parametrize("name", ["gpm", "trgp", "cuber"])
def test_projection_family_trains_under_bf16_autocast(run_tiny, name):
    """Batch 4 takes the factored projection path on every projected task."""
    overrides = [f"strategy={name}", "stream=split_digits", "model=mlp", "strategy.num_samples=50"]
    result = run_tiny([*overrides, "trainer.amp=bf16", "trainer.batch_size=4"])
    assert result["metrics"]["acc"] > 50.0
    # the memory each family member used, task by task: never shrinking, never above a layer's dimension
    ranks = result["basis_ranks"]
    assert len(ranks) == len(result["acc_matrix"]) and len(ranks[0]) == len(result["projected_layers"])
    for before, after in itertools.pairwise(ranks):
        assert all(b <= a <= d for b, a, d in zip(before, after, result["basis_dims"], strict=True))
    assert ranks[0][0] > 0


def test_gpm_end_to_end_task_and_permuted_streams(run_tiny):
    result = run_tiny(["strategy=gpm", "stream=split_digits", "model=mlp", "strategy.num_samples=50"])
    assert result["status"] == "completed" and len(result["acc_matrix"]) == 5
    overrides = [
        "stream=permuted_mnist5k",
        "stream.num_tasks=3",
        "stream.train_per_task=400",
        "model.bias=false",
        "trainer.batch_size=16",
    ]
    gpm = run_tiny([*overrides, "strategy=gpm", "strategy.threshold=[0.95,0.99,0.99]"])
    # old tasks' inputs keep (almost) their layer outputs, so their accuracies barely move
    assert gpm["status"] == "completed" and abs(gpm["metrics"]["bwt"]) < 3.0
    assert gpm["projected_layers"] == ["body.1", "body.3", "heads.heads.0"]
    assert gpm["basis_dims"] == [784, 100, 100] and len(gpm["basis_ranks"]) == 3


@pytest.mark.parametrize("name", ["gpm", "trgp"])
def test_basis_ranks_are_logged_per_task_and_survive_a_resume(build, name):
    strategy, stream, _ = build(name, bias=False, overrides=["strategy.num_samples=50"])
    for task in stream.tasks[:2]:
        strategy.after_task(task)
    assert len(strategy.rank_log) == 2
    assert strategy.rank_log[-1] == [0 if b is None else int(b.shape[1]) for b in strategy.bases]
    assert all(a <= b for a, b in zip(*strategy.rank_log, strict=True)) and strategy.rank_log[0][0] > 0
    restored, _, _ = build(name, bias=False, overrides=["strategy.num_samples=50"])
    restored.load_state_dict(strategy.state_dict())
    assert restored.rank_log == strategy.rank_log
    assert restored.extra_results()["basis_ranks"] == strategy.rank_log


@pytest.mark.parametrize("name", ["gpm", "trgp"])
def test_adam_gets_one_warning_line_naming_sgd(build, name, capsys):
    class NoTraining:
        def __init__(self, optimizer):
            self.optimizer, self.weight_decay = optimizer, 0.0

        def fit(self, strategy, tasks):
            pass

    strategy, stream, _ = build(name)
    strategy.fit_task(stream[0], NoTraining("sgd"))
    assert capsys.readouterr().err == ""
    strategy.fit_task(stream[0], NoTraining("adam"))
    strategy.fit_task(stream[0], NoTraining("adam"))  # once per run, not per task
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("use trainer.optimizer=sgd"), lines


def test_cuber_with_adam_gets_the_same_one_line_warning(build, capsys):
    """CUBER replaces TRGP's fit_task and had dropped the optimizer check: Adam ran without a word."""
    from clbench.trainer import Trainer

    strategy, stream, _ = build("cuber")
    trainer = Trainer(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, progress=False)
    trainer.attach(stream, 0)
    strategy.fit_task(stream[0], trainer)
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].endswith("use trainer.optimizer=sgd"), lines
