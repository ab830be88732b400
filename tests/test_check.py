"""clbench.check: the conformance kit passes a strategy that resumes correctly and names what fails in one
that does not."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from torch import nn

from clbench import check
from clbench.strategy import Strategy


class ForgetfulL2(Strategy):
    """The README's L2ToPrevious with the pre-issue-25 state_dict: the model only, so the anchor is lost on
    resume (what made the README example end with ACC 67.68 instead of 61.38)."""

    name = "forgetful_l2"

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength, self.anchor = strength, None

    def loss(self, output, y, batch, task):
        loss = super().loss(output, y, batch, task)
        if self.anchor is not None:
            pairs = zip(self.model.parameters(), self.anchor, strict=True)
            loss = loss + self.strength * sum(((p - a) ** 2).sum() for p, a in pairs)
        return loss

    def after_task(self, task):
        self.anchor = [p.detach().clone() for p in self.model.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


class FalselyClosedForm(Strategy):
    """Declares closed_form_safe but halves the first layer's output with a module hook, which closed-form
    steps (gradients written out from the layers' own maths) never see."""

    name = "falsely_closed_form"
    closed_form_safe = True

    def setup(self, model, stream):
        model = super().setup(model, stream)
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        first.register_forward_hook(lambda module, inputs, output: output * 0.5)
        return model


class SharedAnchor(Strategy):
    """Declares population_safe but keeps its anchor on the class, shared by every run of the process: in a
    population the members overwrite each other's anchor."""

    name = "shared_anchor"
    population_safe = True
    anchor: list = []  # noqa: RUF012 - shared on purpose: the bug under test

    def loss(self, output, y, batch, task):
        loss = super().loss(output, y, batch, task)
        if SharedAnchor.anchor:
            pairs = zip(self.model.parameters(), SharedAnchor.anchor, strict=True)
            loss = loss + sum(((p - a) ** 2).sum() for p, a in pairs)
        return loss

    def after_task(self, task):
        SharedAnchor.anchor[:] = [p.detach().clone() for p in self.model.parameters()]


def _target(cls: type) -> list[str]:
    return ["strategy=finetune", f"strategy._target_={__name__}.{cls.__name__}"]


def _verdicts(outcomes: list[check.Outcome]) -> dict[str, str]:
    return {o.check: o.verdict for o in outcomes}


def test_finetune_passes(capsys):
    assert check.main(["strategy=finetune"]) == 0
    printed = capsys.readouterr().out
    assert "PASS resume" in printed and "PASS state round trip" in printed and "PASS closed_form_safe" in printed
    assert "PASS population_safe" in printed


def test_readme_strategy_passes(readme_strategy, monkeypatch, capsys):
    monkeypatch.chdir(readme_strategy)
    monkeypatch.syspath_prepend(str(readme_strategy))
    assert check.main(["strategy=l2_prev"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_a_strategy_that_loses_its_state_on_resume_fails():
    outcomes = check.run_checks(_target(ForgetfulL2))
    verdicts = _verdicts(outcomes)
    assert verdicts["resume"] == "FAIL"
    (resume,) = [o for o in outcomes if o.check == "resume"]
    assert "state_dict misses some of the strategy's state" in resume.detail


def test_a_false_closed_form_declaration_fails():
    outcomes = check.run_checks(_target(FalselyClosedForm))
    (declared,) = [o for o in outcomes if o.check == "closed_form_safe"]
    assert declared.verdict == "FAIL" and "remove the declaration" in declared.detail


def test_a_false_population_declaration_fails():
    SharedAnchor.anchor.clear()
    outcomes = check.run_checks(_target(SharedAnchor))
    (declared,) = [o for o in outcomes if o.check == "population_safe"]
    assert declared.verdict == "FAIL" and "remove the declaration" in declared.detail


def test_bad_input_is_exit_2(capsys):
    assert check.main([]) == 2
    assert check.main(["strategy=nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _this_module_importable(monkeypatch):
    """The strategies above are found by their ``_target_`` (this test module by name)."""
    monkeypatch.setitem(sys.modules, __name__, sys.modules[__name__])


def test_a_chosen_protocol_keeps_its_stream_shrunk(tmp_path):
    """`python -m clbench.check strategy=finetune protocol=pretrained_fmnist` stopped with 'model.patch_size=7 does
    not divide the 8x8 images': the kit replaced the protocol's stream by split digits."""
    cfg = check.compose_checked(["strategy=finetune", "protocol=pretrained_fmnist"], tmp_path)
    assert cfg.stream.name == "split_mnist5k" and cfg.model.patch_size == 7
    assert (cfg.stream.num_tasks, cfg.stream.train_per_task) == (3, 300)
    cfg = check.compose_checked(["strategy=finetune", "protocol=default", "stream.num_tasks=2"], tmp_path)
    assert cfg.stream.name == "permuted_mnist5k" and cfg.stream.num_tasks == 2  # the command line wins
    assert check.compose_checked(["strategy=finetune"], tmp_path).stream.name == "split_digits"


def test_a_pretrained_model_is_pretrained_once_for_every_check(tmp_path, monkeypatch):
    """Each check run has its own results folder, so `model.checkpoint=pretrain` pretrained again in each; the kit
    resolves it once, from the user's cache when that holds the file."""
    import clbench.pretrain as pretrain

    calls = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    overrides = ["strategy=finetune", "protocol=pretrained_fmnist", "model=mlp", "pretrain.epochs=1"]
    first = check.pretrained_once([*overrides, f"results_dir={tmp_path / 'mine'}"], tmp_path / "kit")
    assert len(calls) == 1 and first[0].startswith("model.checkpoint=") and str(tmp_path / "kit") in first[0]
    # the user's own cache holds it: no pretraining, that file
    cfg = check.compose_checked([*overrides, f"results_dir={tmp_path / 'mine'}"], None)
    pretrain.resolve_checkpoint(cfg)
    calls.clear()
    again = check.pretrained_once([*overrides, f"results_dir={tmp_path / 'mine'}"], tmp_path / "kit2")
    assert not calls and str(tmp_path / "mine") in again[0]
    cfg = check.compose_checked([*overrides, *again], tmp_path / "run")
    assert cfg.model.checkpoint == str(pretrain.checkpoint_path(check.compose_checked(overrides, tmp_path / "mine")))
    assert check.pretrained_once(["strategy=finetune"], tmp_path / "kit3") == []
