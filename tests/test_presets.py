"""Every config a user can pick composes, and every preset's published reference exists."""

from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from clbench.__main__ import CONFIG_DIR
from clbench.report import published_table

CONF = Path(CONFIG_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
STREAMS = sorted(p.stem for p in (CONF / "stream").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_names_a_known_reference(compose_cfg, name):
    config = compose_cfg([f"experiment={name}"])
    assert config.experiment_name == name
    if config.reference is not None:
        assert config.reference in set(published_table()["key"]), f"{config.reference} is not in published.csv"


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_target_imports(name):
    config = OmegaConf.load(CONF / "strategy" / f"{name}.yaml")
    assert get_class(config._target_).name  # every strategy class names itself for result paths


@pytest.mark.parametrize("name", STREAMS)
def test_stream_config_composes(compose_cfg, name):
    config = compose_cfg([f"stream={name}"])
    # results land under the stream's name; the avalanche bridge names the benchmark it wraps
    assert config.stream.name == name or (name == "avalanche" and config.stream.name.startswith("avalanche_"))
