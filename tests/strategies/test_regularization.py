"""The quadratic penalty under plain SGD: the stiffness cap that keeps EWC / online EWC / SI / MAS from
diverging at a large lr * strength * importance, and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from clbench.__main__ import CONFIG_DIR
from clbench.data import load_synthetic
from clbench.models import MLP
from clbench.streams import split_stream
from clbench.trainer import NonFiniteLossError, Trainer
from strategies.ewc import EWC
from strategies.ewc_online import OnlineEWC
from strategies.mas import MAS
from strategies.regularization import stiffness_limit
from strategies.si import SI

STIFF = {  # strengths far past the SGD bound at lr 0.5 on this stream (the default job's failure, compressed)
    "ewc": lambda stable: EWC(ewc_lambda=1e9, stable_penalty=stable),
    "ewc_online": lambda stable: OnlineEWC(ewc_lambda=1e9, stable_penalty=stable),
    "si": lambda stable: SI(c=1e9, stable_penalty=stable),
    "mas": lambda stable: MAS(mas_lambda=1e9, stable_penalty=stable),
}


def two_tasks(strategy, lr: float = 0.5, optimizer: str = "sgd"):
    """Train ``strategy`` on 2 tiny permuted-free split tasks (domain scenario) with plain SGD."""
    torch.manual_seed(0)
    data = load_synthetic(num_classes=4, shape=(1, 6, 6), train_per_class=32, test_per_class=4, seed=0)
    stream = split_stream(data, num_tasks=2, classes_per_task=2, scenario="domain")
    strategy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[16]), stream)
    trainer = Trainer(epochs=2, batch_size=16, lr=lr, optimizer=optimizer, progress=False)
    trainer.attach(stream, 0)
    for task in stream:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
    return strategy


@pytest.mark.parametrize("name", sorted(STIFF))
def test_a_stiff_penalty_trains_without_divergence_where_the_plain_one_blows_up(name):
    with pytest.raises(NonFiniteLossError):  # the papers' explicit penalty: lr * strength * importance > 1
        two_tasks(STIFF[name](False))
    strategy = two_tasks(STIFF[name](True))
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())
    assert strategy.capped[0] == 0.0 and strategy.capped[1] > 0.0  # nothing to cap before the first task
    assert strategy.extra_results()["penalty_capped"]["fraction_per_task"] == strategy.capped


def test_the_cap_is_half_the_sgd_stability_bound_and_leaves_smaller_importances_alone():
    trainer = Trainer(epochs=1, batch_size=8, lr=0.1, momentum=0.5, progress=False)
    assert stiffness_limit(trainer) == pytest.approx(1.5 / 0.2)  # (1 + mu) / (2 lr)
    assert stiffness_limit(Trainer(epochs=1, batch_size=8, lr=0.1, optimizer="adam", progress=False)) is None
    ewc = EWC(ewc_lambda=2.0)
    ewc.importance = {"w": torch.tensor([1.0, 3.0, 10.0])}
    effective = ewc.effective_importance(stiffness_limit(trainer))["w"]  # bound: 7.5 / 2 = 3.75
    torch.testing.assert_close(effective, torch.tensor([1.0, 3.0, 3.75]))
    assert ewc.capped == [pytest.approx(1 / 3)]
    assert torch.equal(ewc.effective_importance(None)["w"], ewc.importance["w"])


def test_under_adam_nothing_is_capped():
    strategy = two_tasks(STIFF["mas"](True), lr=0.01, optimizer="adam")
    assert strategy.capped == [0.0, 0.0]


def test_the_capped_penalty_is_the_plain_one_where_nothing_crosses_the_bound():
    plain = two_tasks(MAS(mas_lambda=0.01, stable_penalty=False))
    capped = two_tasks(MAS(mas_lambda=0.01, stable_penalty=True))
    assert capped.capped == [0.0, 0.0]
    for a, b in zip(plain.model.parameters(), capped.model.parameters(), strict=True):
        assert torch.equal(a, b)


def default_job(strategy: str, overrides: list[str]) -> str:
    """The shipped ``strategy=<name>`` config on a shortened default job (Permuted MNIST-5k, MLP, 3 epochs,
    SGD lr 0.1): 3 tasks of 2,000 samples. Returns "ok" or the divergence message."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"strategy={strategy}",
                "logger=none",
                "stream.num_tasks=3",
                "stream.train_per_task=2000",
                *overrides,
            ],
        )
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy_ = instantiate(cfg.strategy)
    strategy_.setup(model, stream)
    trainer = instantiate(cfg.trainer, progress=False)
    trainer.attach(stream, 0)
    try:
        for task in stream:
            strategy_.fit_task(task, trainer)
            strategy_.after_task(task)
    except NonFiniteLossError as error:
        return str(error)
    return "ok"


@pytest.mark.parametrize(
    ("strategy", "before"),
    [
        ("mas", ["strategy.mas_lambda=1.0", "strategy.stable_penalty=false"]),  # the defaults before the fix
        ("si", ["strategy.stable_penalty=false"]),
    ],
)
def test_shipped_defaults_train_the_default_job_without_divergence(strategy, before):
    assert default_job(strategy, before).startswith("training loss became")  # what the default job hit
    assert default_job(strategy, []) == "ok"


@pytest.mark.parametrize(
    ("strategy", "key"), [("ewc", "ewc_lambda"), ("ewc_online", "ewc_lambda"), ("mas", "mas_lambda"), ("si", "c")]
)
def test_a_negative_strength_names_the_key_the_user_typed(tmp_path, strategy, key, capsys, monkeypatch):
    """`strategy=ewc strategy.ewc_lambda=-5` said 'the regularisation strength must be >= 0': which key?"""
    import sys

    import clbench.__main__ as cli

    monkeypatch.chdir(tmp_path)
    argv = ["clbench", f"strategy={strategy}", f"strategy.{key}=-5", f"results_dir={tmp_path}", "logger=none"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"clbench: error: strategy.{key} must be >= 0, got -5: set strategy.{key} to a value >= 0"
    )
