"""The trainer's optional paper-protocol schedule: lr decay on validation plateau, early stop below lr_min,
restore-best, and that all of it is off by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from clbench.__main__ import CONFIG_DIR
from clbench.trainer import Trainer
from strategies.finetune import Finetune


def setup(val_fraction: float = 0.2, **trainer_kwargs):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stream=split_digits", f"stream.val_fraction={val_fraction}"])
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = Finetune()
    strategy.setup(model, stream)
    trainer = Trainer(progress=False, batch_size=32, **trainer_kwargs)
    trainer.attach(stream, 0)
    return strategy, stream, trainer


def scripted(trainer: Trainer, strategy, values: list[float]) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Make ``validation_loss`` return ``values`` in turn; record the lr and parameters at each call."""
    lrs: list[float] = []
    snapshots: list[list[torch.Tensor]] = []
    made = trainer._fit_optimizer

    def fit_optimizer(params):
        trainer.optimizer_made = made(params)
        return trainer.optimizer_made

    def validation_loss(_strategy, _tasks):
        lrs.append(trainer.optimizer_made.param_groups[0]["lr"])
        snapshots.append([p.detach().clone() for p in strategy.model.parameters()])
        return torch.tensor(values[len(lrs) - 1])

    trainer._fit_optimizer = fit_optimizer
    trainer.validation_loss = validation_loss
    return lrs, snapshots


def test_schedule_is_off_by_default_and_needs_no_validation_split():
    strategy, stream, trainer = setup(val_fraction=0.0, epochs=2)
    assert (trainer.lr_patience, trainer.restore_best) == (0, False) and not trainer.validates
    assert len(trainer.fit(strategy, [stream.tasks[0]])) == 2
    assert trainer.val_losses == [[]]


def test_schedule_without_validation_split_is_a_clear_error():
    strategy, stream, trainer = setup(val_fraction=0.0, lr_patience=2)
    with pytest.raises(ValueError, match=r"stream\.val_fraction"):
        trainer.fit(strategy, [stream.tasks[0]])


def test_lr_is_divided_after_patience_bad_epochs_and_training_stops_below_lr_min():
    strategy, stream, trainer = setup(epochs=10, lr=0.1, lr_patience=2, lr_factor=2.0, lr_min=0.02)
    lrs, _ = scripted(trainer, strategy, [1.0, 0.9, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5])
    losses = trainer.fit(strategy, [stream.tasks[0]])
    # epochs 3-4 bad -> lr 0.05; epochs 5-6 bad -> lr 0.025; epochs 7-8 bad -> 0.0125 < lr_min: stop
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert len(losses) == 8
    assert trainer.val_losses[-1] == pytest.approx([1.0, 0.9, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5])


def test_restore_best_puts_back_the_best_validation_epoch():
    strategy, stream, trainer = setup(epochs=4, lr=0.1, restore_best=True)
    _, snapshots = scripted(trainer, strategy, [1.0, 0.5, 0.8, 0.9])
    trainer.fit(strategy, [stream.tasks[0]])
    for param, best in zip(strategy.model.parameters(), snapshots[1], strict=True):
        assert torch.equal(param, best)
    assert any(not torch.equal(b, last) for b, last in zip(snapshots[1], snapshots[3], strict=True))


def test_validation_loss_is_the_cross_entropy_on_the_validation_split():
    strategy, stream, trainer = setup(epochs=1)
    task = stream.tasks[1]
    got = trainer.validation_loss(strategy, [task])
    with torch.no_grad():
        logits = strategy.forward(stream.inputs("train", task.val_index, task.id), task.id)
        expected = F.cross_entropy(logits, task.val_targets)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(("key", "value"), [("lr_patience", -1), ("lr_factor", 1.0), ("lr_min", -1.0)])
def test_bad_schedule_values_are_rejected(key, value):
    with pytest.raises(ValueError, match=rf"trainer\.{key}"):
        Trainer(**{key: value})
