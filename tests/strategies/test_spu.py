"""SPU (strategies/spu.py): only the selected weights move (bit-identical elsewhere, whatever the optimizer's
momentum or weight decay), the fraction per layer, the score's accumulation, score vs random masks, the
task-balanced buffer, and a resumed run that keeps buffer and masks."""

from __future__ import annotations

import pytest
import torch

from clbench.trainer import Trainer
from strategies.spu import SPU, candidate_layers, gradient_scores
from tests.strategies.conftest import _build

MLP_LAYERS = "strategy.layers=[body.1,body.3]"


def _spu(*overrides: str, **kwargs):
    return _build("spu", overrides=[MLP_LAYERS, *overrides], **kwargs)


def _weights(strategy: SPU) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in strategy._candidates.items()}


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01, "lr": 0.05},
        {"optimizer": "adamw", "weight_decay": 0.2, "lr": 0.001},
        {"optimizer": "adam", "weight_decay": 0.01, "lr": 0.001},
    ],
    ids=["sgd-momentum-wd", "adamw", "adam-l2"],
)
def test_only_selected_weights_change_and_the_rest_stay_bit_identical(settings):
    strategy, stream, _ = _spu("strategy.buffer_size=60")
    trainer = Trainer(epochs=2, batch_size=32, progress=False, **settings)
    trainer.attach(stream, 0)
    for task in stream.tasks[:2]:  # the second task replays the first from its second epoch on
        before = _weights(strategy)
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        for name, weight in _weights(strategy).items():
            mask = strategy.masks[name]
            assert torch.equal(weight[~mask], before[name][~mask]), name
            assert (weight[mask] != before[name][mask]).float().mean() > 0.5, name


@pytest.mark.parametrize("fraction", [0.03, 0.1, 0.5])
def test_each_layer_selects_its_fraction(fraction):
    strategy, stream, _ = _spu(f"strategy.fraction={fraction}")
    trainer = Trainer(epochs=1, batch_size=64, progress=False, lr=0.05)
    trainer.attach(stream, 0)
    strategy.fit_task(stream.tasks[0], trainer)
    for name, mask in strategy.masks.items():
        assert int(mask.sum()) == int(mask.numel() * fraction), name
    assert strategy.selected[0]["selected_fraction"] == pytest.approx(fraction, abs=1e-3)
    selected = sum(int(mask.sum()) for mask in strategy.masks.values())
    assert strategy.extra_results()["spu"]["selected_weights_per_task"] == selected


def test_score_is_the_magnitude_of_the_summed_signed_gradient():
    """Four equal batches of the batch-mean loss sum to 4x the whole-set gradient; a sum of per-batch magnitudes
    (a different score) would not."""
    strategy, stream, _ = _spu("strategy.score=loss", "strategy.score_batches=1.0")
    task = stream.tasks[0]
    assert task.num_train % 4 == 0
    whole = gradient_scores(strategy, task, task.num_train)
    quarters = gradient_scores(strategy, task, task.num_train // 4)
    for name in whole:
        torch.testing.assert_close(quarters[name], 4 * whole[name], rtol=1e-4, atol=1e-6)


def test_score_selects_the_top_weights_and_random_a_different_set_of_the_same_size():
    scored, stream, _ = _spu()
    torch.manual_seed(1)
    randomised, _, _ = _spu("strategy.selection=random")
    randomised.model.load_state_dict(scored.model.state_dict())
    trainer = Trainer(epochs=1, batch_size=64, progress=False, lr=0.05)
    trainer.attach(stream, 0)
    scores = gradient_scores(scored, stream.tasks[0], 64)
    scored.fit_task(stream.tasks[0], trainer)
    randomised.fit_task(stream.tasks[0], trainer)
    for name, mask in scored.masks.items():
        assert scores[name][mask].min() >= scores[name][~mask].max()
        other = randomised.masks[name]
        assert int(other.sum()) == int(mask.sum())
        overlap = float((other & mask).sum()) / float(mask.sum())
        assert overlap < 0.3  # a random mask of 10 % shares about 10 % with the scored one


def test_buffer_is_task_balanced_and_buffer_free_never_replays(monkeypatch):
    strategy, stream, _ = _spu("strategy.buffer_size=30")
    trainer = Trainer(epochs=1, batch_size=64, progress=False, lr=0.05)
    trainer.attach(stream, 0)
    for task, expected in zip(stream.tasks, ([30], [15, 15], [10, 10, 10]), strict=True):
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        counts = torch.bincount(strategy.buffer_tasks, minlength=task.id + 1).tolist()
        assert counts == expected
        for k in range(task.id + 1):  # every stored sample is one of its task's training samples, with its label
            stored = strategy.buffer_index[strategy.buffer_tasks == k]
            assert torch.isin(stored, stream.tasks[k].train_index).all()

    free, stream, _ = _spu("strategy.buffer_size=0", "strategy.replay_from_epoch=0")
    calls = []
    monkeypatch.setattr(SPU, "_next_replay", lambda self: calls.append(1))
    for task in stream.tasks[:2]:
        free.fit_task(task, trainer)
        free.after_task(task)
    assert free.buffer_index.numel() == 0 and not calls


def test_replay_starts_at_the_configured_epoch(monkeypatch):
    strategy, stream, _ = _spu("strategy.buffer_size=40", "strategy.replay_from_epoch=1")
    trainer = Trainer(epochs=2, batch_size=100, progress=False, lr=0.05)
    trainer.attach(stream, 0)
    strategy.fit_task(stream.tasks[0], trainer)
    strategy.after_task(stream.tasks[0])
    steps: list[int] = []
    original = SPU._next_replay

    def record(self):
        steps.append(self._step)
        return original(self)

    monkeypatch.setattr(SPU, "_next_replay", record)
    strategy.fit_task(stream.tasks[1], trainer)
    per_epoch = -(-stream.tasks[1].num_train // 100)
    assert steps == list(range(per_epoch, 2 * per_epoch))


def test_unknown_layers_name_the_ones_there_are():
    _, _, model = _spu()
    with pytest.raises(ValueError, match=r"matches no linear layer of MLP; its linear layers are body.1, body.3"):
        candidate_layers(model, ["fc1"])
    assert list(candidate_layers(model, ["3"])) == ["body.3"]  # a suffix after a dot; the heads never count


def test_state_dict_round_trip_keeps_buffer_and_masks():
    strategy, stream, _ = _spu("strategy.buffer_size=30")
    trainer = Trainer(epochs=1, batch_size=64, progress=False, lr=0.05)
    trainer.attach(stream, 0)
    strategy.fit_task(stream.tasks[0], trainer)
    strategy.after_task(stream.tasks[0])
    fresh, _, _ = _spu("strategy.buffer_size=30")
    fresh.load_state_dict(strategy.state_dict())
    assert torch.equal(fresh.buffer_index, strategy.buffer_index)
    assert torch.equal(fresh.buffer_targets, strategy.buffer_targets)
    assert all(torch.equal(fresh.masks[name], mask) for name, mask in strategy.masks.items())
    assert fresh.selected == strategy.selected


def test_resumed_run_matches_the_uninterrupted_one(run_tiny, tmp_path, interrupt_after_first_checkpoint):
    from clbench.runner import RunInterrupted

    overrides = [
        "strategy=spu",
        MLP_LAYERS,
        "strategy.buffer_size=50",
        "stream=split_digits",
        "stream.num_tasks=3",
        "trainer.epochs=2",
        "deterministic=true",
    ]
    clean = run_tiny(overrides, tmp_path / "clean")
    with interrupt_after_first_checkpoint(), pytest.raises(RunInterrupted):
        run_tiny(overrides, tmp_path / "killed")
    resumed = run_tiny(overrides, tmp_path / "killed")
    assert resumed["acc_matrix"] == clean["acc_matrix"]
    assert resumed["spu"]["per_task"] == clean["spu"]["per_task"]
    assert resumed["spu"]["buffer_size"] == 3 * (50 // 3)  # 16 per task after the third
