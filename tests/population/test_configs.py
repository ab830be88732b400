"""A seed sweep's job configs copied from the first job's equal the ones Hydra composes in full."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from clbench.__main__ import CONFIG_DIR
from clbench.population.configs import derive_seed_config, seed_of_only_difference


def sweep_config(overrides: list[str]):
    """What a launcher's ``load_sweep_config`` gives for the sweep job with ``overrides`` (hydra node included)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(config_name="config", overrides=["seed=0,1"], run_mode=RunMode.MULTIRUN)
        return loader.load_sweep_config(master, overrides)


def comparable(config) -> dict:
    plain = OmegaConf.to_container(config, resolve=False)
    plain["hydra"]["runtime"].pop("cwd", None)
    return plain


@pytest.mark.parametrize(
    "first, other",
    [
        (["seed=0"], ["seed=7"]),
        (["strategy=ewc", "seed=0", "stream.num_tasks=3"], ["strategy=ewc", "seed=12", "stream.num_tasks=3"]),
        (["protocol=gpm_pfmnist", "strategy=gpm", "seed=1"], ["protocol=gpm_pfmnist", "strategy=gpm", "seed=2"]),
    ],
)
def test_a_derived_config_is_the_composed_one(first, other):
    composed_first = sweep_config(first)
    seed = seed_of_only_difference(first, other)
    assert seed is not None
    derived = derive_seed_config(composed_first, other, seed)
    assert comparable(derived) == comparable(sweep_config(other))
    assert composed_first.seed != derived.seed  # the copy is its own


@pytest.mark.parametrize(
    "first, other",
    [
        (["seed=0"], ["seed=0"]),  # the same job
        (["seed=0", "strategy=ewc"], ["seed=1", "strategy=si"]),  # another strategy as well
        (["seed=0"], ["seed=1", "trainer.lr=0.05"]),  # one more override
        (["seed=0"], ["seed=abc"]),
        (["trainer.lr=0.1"], ["trainer.lr=0.2"]),
    ],
)
def test_anything_but_a_seed_is_composed_in_full(first, other):
    assert seed_of_only_difference(first, other) is None


def test_a_struct_config_stays_struct():
    from omegaconf.errors import ConfigAttributeError

    derived = derive_seed_config(sweep_config(["seed=0"]), ["seed=3"], 3)
    with pytest.raises(ConfigAttributeError):
        derived.not_a_key = 1  # the root stays closed to new keys, as a composed config


def test_composed_once_composes_each_distinct_job_once_and_hands_out_copies():
    """The sweeper's check and the launcher load every job: a 3-seed sweep of two strategies composes twice, not
    twelve times, and each call's config is the full composition's, in a copy of its own."""
    from clbench.population.configs import ComposedOnce

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(config_name="config", overrides=["seed=0,1"], run_mode=RunMode.MULTIRUN)
        calls: list[list[str]] = []

        class Counting:
            def load_sweep_config(self, master_config, sweep_overrides):
                calls.append(list(sweep_overrides))
                return loader.load_sweep_config(master_config, sweep_overrides)

        once = ComposedOnce(Counting())
        jobs = [[f"strategy={s}", f"seed={n}"] for s in ("finetune", "ewc") for n in range(3)]
        for _ in ("the sweeper's check", "the launch"):
            configs = [once.load_sweep_config(master, job) for job in jobs]
        assert calls == [["strategy=finetune", "seed=0"], ["strategy=ewc", "seed=0"]]
        for job, config in zip(jobs, configs, strict=True):
            assert comparable(config) == comparable(loader.load_sweep_config(master, job))
        configs[0].seed = 99
        assert once.load_sweep_config(master, jobs[0]).seed == 0  # a caller's change stays its own
