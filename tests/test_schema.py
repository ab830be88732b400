"""clbench.schema: every composed config a user can get passes; every bad value is one line naming the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest

from clbench.__main__ import CONFIG_DIR
from clbench.schema import AtLeast, ConfigError, check_config, check_results_dir, nearest, primary_keys
from clbench.strategy import Strategy

GROUPS = ("stream", "model", "strategy", "logger", "experiment", "protocol")
CHOICES = [f"{group}={path.stem}" for group in GROUPS for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))]


@pytest.mark.parametrize("choice", CHOICES)
def test_every_shipped_config_passes(compose_cfg, tmp_path, choice):
    """No false alarm: each stream, model, strategy, logger, preset and protocol as shipped is valid."""
    check_config(compose_cfg([choice], tmp_path))


BAD = [
    (["+trainer.epoch=1"], "unknown key trainer.epoch: did you mean trainer.epochs?"),
    (["+foo=1"], "unknown key foo"),
    (["+strategy.ewc_lamda=1", "strategy=ewc"], "did you mean strategy.ewc_lambda?"),
    (["trainer.epochs=abc"], "trainer.epochs must be an integer, got 'abc'"),
    (["seed=1.5"], "seed must be an integer, got 1.5"),
    (["trainer.batch_size=1.5"], "trainer.batch_size must be an integer, got 1.5"),
    (["strategy=ewc", "strategy.ewc_lambda=big"], "strategy.ewc_lambda must be a number, got 'big'"),
    (["stream.train_per_task=0"], "stream.train_per_task must be >= 1, got 0"),
    (["stream.num_tasks=0"], "stream.num_tasks must be >= 1, got 0"),
    (["stream.num_tasks=-2"], "stream.num_tasks must be >= 1, got -2"),
    (["trainer.lr=0"], "trainer.lr must be > 0"),
    (["stream.val_fraction=1.0"], "stream.val_fraction must be >= 0 and < 1"),
    (["deterministic=maybe"], "deterministic must be true or false, got 'maybe'"),
    (["cpu_threads=0"], "cpu_threads must be >= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_line_naming_the_fix(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_cfg(overrides, tmp_path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_results_dir_that_is_a_file_or_unwritable(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="results_dir is empty"):
        check_config(compose_cfg([], ""))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_results_dir(str(a_file))
    with pytest.raises(ConfigError, match="lies under the file"):
        check_results_dir(str(a_file / "below"))
    with pytest.raises(ConfigError, match="cannot be written"):
        check_results_dir("/proc/clbench-results")  # not writable, not even for root
    assert check_results_dir(str(tmp_path / "new" / "folder")).is_dir()


class Ranged(Strategy):
    """A user's strategy: its signature alone gives the types, and a range where it states one."""

    name = "ranged"

    def __init__(self, strength: Annotated[float, AtLeast(0)] = 1.0, layers: list[int] | None = None) -> None:
        super().__init__()
        self.strength, self.layers = strength, layers


def _with_strategy(compose_cfg, tmp_path, **values):
    cfg = compose_cfg([], tmp_path)
    cfg.strategy = {"_target_": f"{__name__}.Ranged", **values}
    return cfg


def test_a_user_strategy_is_checked_from_its_signature(compose_cfg, tmp_path):
    check_config(_with_strategy(compose_cfg, tmp_path, strength=2, layers=[1, 2]))
    with pytest.raises(ConfigError, match=r"strategy.strength must be >= 0, got -1"):
        check_config(_with_strategy(compose_cfg, tmp_path, strength=-1))
    with pytest.raises(ConfigError, match=r"strategy.layers must be a list or null, got 'all'"):
        check_config(_with_strategy(compose_cfg, tmp_path, layers="all"))
    with pytest.raises(ConfigError, match=r"unknown key strategy.strenght: did you mean strategy.strength\?"):
        check_config(_with_strategy(compose_cfg, tmp_path, strenght=1.0))


def test_a_target_that_does_not_import_names_the_module_and_the_path(compose_cfg, tmp_path):
    cfg = compose_cfg([], tmp_path)
    cfg.strategy = {"_target_": "no_such_package.l2.L2ToPrevious"}
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    line = str(caught.value)
    assert "cannot import module no_such_package.l2" in line and "Python path:" in line and "\n" not in line


def test_top_level_keys_of_the_primary_config_are_known():
    keys = primary_keys(CONFIG_DIR)
    assert "seed" in keys and "results_dir" in keys and "defaults" not in keys and "hydra" not in keys


def test_nearest_key_suggestion():
    assert nearest("trainer.epoch", ["trainer.epochs", "trainer.lr"]) == "did you mean trainer.epochs?"
    assert "--cfg job" in nearest("zzz", ["trainer.epochs"])
