"""A population's members give their solo runs' results, for every strategy that declares population_safe.

Each test runs the same tiny experiment for a few seeds twice in this process: once as solo runs, once as one
population (:func:`clbench.population.coordinator.run_members`), and compares every member's accuracy matrix
(and task-aware matrix, and training-loss curves) with its solo run's, bit for bit on one CPU thread. It also
checks how the population trained, so that a fit silently falling back to training alone does not pass as
batched.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from clbench.population import coordinator
from clbench.population.coordinator import run_members
from clbench.strategy import Strategy
from tests.conftest import run_config

EXACT = ["cpu_threads=1", "deterministic=true", "plots=false", "stream.num_tasks=2"]

# strategy -> how its fits are trained in a population on the default protocol's MLP (None: each member alone)
KINDS = {
    "finetune": "closed_form",
    "joint": "closed_form",
    "gpm": "closed_form",
    "ewc": "autograd",
    "ewc_online": "autograd",
    "si": "autograd",
    "mas": "autograd",
    "lwf": "autograd",
    "trgp": None,
    "supsup": None,
}


@pytest.fixture
def batched_kinds(monkeypatch):
    """The kinds of the batched fits the coordinator ran, in order."""
    seen: list[str] = []
    original = coordinator.fit_together

    def spy(fits):
        seen.append(fits[0].kind)
        return original(fits)

    monkeypatch.setattr(coordinator, "fit_together", spy)
    return seen


def solo_and_population(overrides: list[str], seeds: list[int], root: Path) -> tuple[list[dict], list[dict]]:
    solo = [run_config([*EXACT, *overrides, f"seed={s}"], root / "solo") for s in seeds]
    members = run_members(
        [functools.partial(run_config, [*EXACT, *overrides, f"seed={s}"], root / "population") for s in seeds]
    )
    for member in members:
        assert member.raised is None, member.raised
    return solo, [m.returned for m in members]


def assert_same(solo: dict, member: dict) -> None:
    assert member["status"] == "completed"
    assert member["acc_matrix"] == solo["acc_matrix"]
    assert member.get("acc_matrix_taw") == solo.get("acc_matrix_taw")
    assert member["learning_curves"] == solo["learning_curves"]
    assert member["timings"]["closed_form_steps"] == solo["timings"]["closed_form_steps"]


@pytest.mark.parametrize("strategy", sorted(KINDS))
def test_members_match_their_solo_runs(strategy, tmp_path, batched_kinds):
    solo, population = solo_and_population([f"strategy={strategy}"], [0, 1], tmp_path)
    for mine, member in zip(solo, population, strict=True):
        assert_same(mine, member)
    assert solo[0]["acc_matrix"] != solo[1]["acc_matrix"], "the seeds should differ, or the test shows nothing"
    expected = KINDS[strategy]
    assert set(batched_kinds) == ({expected} if expected else set())


def test_every_declared_strategy_is_covered():
    """A strategy that declares population_safe must have its row above (and its test)."""
    from omegaconf import OmegaConf

    from clbench.population.grouping import strategy_class

    declared = set()
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("conf", "strategy").glob("*.yaml")):
        cls = strategy_class(OmegaConf.create({"strategy": OmegaConf.load(path)}))
        if cls is not None and cls.__dict__.get("population_safe", False):
            declared.add(path.stem)
    assert declared == set(KINDS)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_members_match_in_other_scenarios(scenario, tmp_path, batched_kinds):
    stream = ["stream=split_mnist5k"] if scenario == "class" else []
    overrides = [*stream, f"stream.scenario={scenario}", "strategy=lwf"]
    solo, population = solo_and_population(overrides, [0, 1], tmp_path)
    for mine, member in zip(solo, population, strict=True):
        assert_same(mine, member)
    assert batched_kinds and set(batched_kinds) == {"autograd"}


def test_members_differing_in_lr_and_lambda_share_batched_steps(tmp_path, batched_kinds):
    """Batchable values differ per member; each member keeps its own optimizer and penalty."""
    configs = [["strategy=ewc", "trainer.lr=0.1", "strategy.ewc_lambda=10"], ["strategy=ewc", "trainer.lr=0.05"]]
    solo = [run_config([*EXACT, *c], tmp_path / "solo") for c in configs]
    members = run_members([functools.partial(run_config, [*EXACT, *c], tmp_path / "pop") for c in configs])
    for mine, member in zip(solo, members, strict=True):
        assert_same(mine, member.returned)
    assert batched_kinds == ["autograd"] * 2  # one batched fit per task


def test_a_diverging_member_fails_alone(tmp_path):
    """One member's loss becomes NaN: it is recorded failed, as its solo run would be; the others go on."""
    configs = [["trainer.lr=0.1"], ["trainer.lr=1e30"], ["trainer.lr=0.05"]]
    members = run_members([functools.partial(run_config, [*EXACT, *c], tmp_path / "pop") for c in configs])
    assert isinstance(members[1].raised, FloatingPointError)
    assert "training loss became" in str(members[1].raised)
    solo = [run_config([*EXACT, *configs[i]], tmp_path / "solo") for i in (0, 2)]
    for mine, member in zip(solo, [members[0], members[2]], strict=True):
        assert_same(mine, member.returned)


def test_parameters_own_their_storage_after_a_batched_fit(tmp_path):
    """The stacked tensor is released: a member's checkpoint holds its own parameters, not every member's."""
    members = run_members([functools.partial(run_config, [*EXACT, f"seed={s}"], tmp_path) for s in range(3)])
    for member in members:
        checkpoint = torch.load(member.returned["paths"]["checkpoint"], weights_only=False)
        for name, tensor in checkpoint["strategy"]["model"].items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


class GlobalDraw(Strategy):
    """Draws from torch's global generator in every step: not safe in a batched fit."""

    name = "global_draw"
    closed_form_safe = True
    population_safe = True

    def after_step(self, task):
        torch.rand(1)


def test_a_hook_that_draws_from_the_global_generator_is_refused(tmp_path):
    overrides = [*EXACT, "strategy._target_=tests.population.test_coordinator.GlobalDraw"]
    members = run_members([functools.partial(run_config, [*overrides, f"seed={s}"], tmp_path) for s in range(2)])
    for member in members:
        assert isinstance(member.raised, RuntimeError)
        assert "global generator" in str(member.raised)


def test_a_members_timings_count_its_own_work_not_its_wait(tmp_path):
    """fit_s / eval_s of a member are its share of the batched fits plus its own work: over all members they add up
    to no more than the population's wall time (timed by the wall clock, each member's fit_s would also hold
    every other member's setup, evaluation and writing, and their sum would be several times the wall time)."""
    import time

    started = time.perf_counter()
    members = run_members([functools.partial(run_config, [*EXACT, f"seed={s}"], tmp_path) for s in range(4)])
    wall = time.perf_counter() - started
    timed = sum(sum(m.returned["timings"]["fit_s"]) + sum(m.returned["timings"]["eval_s"]) for m in members)
    assert 0 < timed <= wall
