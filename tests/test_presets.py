"""Every config a user can pick composes: protocols, per-(protocol, strategy) settings, experiment names,
strategies and streams; published numbers are keyed by pairs that exist."""

from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class
from omegaconf import OmegaConf

from clbench.__main__ import CONFIG_DIR
from clbench.report import published_table

CONF = Path(CONFIG_DIR)
PROTOCOLS = sorted(p.stem for p in (CONF / "protocol").glob("*.yaml"))
SETTINGS = sorted(f"{p.parent.name}/{p.stem}" for p in (CONF / "settings").glob("*/*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
STREAMS = sorted(p.stem for p in (CONF / "stream").glob("*.yaml"))


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_composes_and_names_itself(compose_cfg, name):
    config = compose_cfg([f"protocol={name}"])
    assert config.protocol_name == name
    assert config.strategy_settings is None  # fine-tune has no settings of its own anywhere


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_sets_no_strategy_key(name):
    """A protocol is everything but the strategy: no protocol file may set strategy values."""
    text = yaml.safe_load((CONF / "protocol" / f"{name}.yaml").read_text()) or {}
    assert "strategy" not in text
    assert not any("/strategy" in str(entry) for entry in text.get("defaults", []))


@pytest.mark.parametrize("pair", SETTINGS)
def test_settings_are_picked_for_their_pair_and_record_it(compose_cfg, pair):
    protocol, strategy = pair.split("/")
    assert protocol in PROTOCOLS, f"conf/settings/{pair}.yaml names no protocol"
    assert strategy in STRATEGIES, f"conf/settings/{pair}.yaml names no strategy"
    config = compose_cfg([f"protocol={protocol}", f"strategy={strategy}"])
    assert config.strategy_settings == pair
    assert config.protocol_name == protocol
    first = (CONF / "settings" / f"{pair}.yaml").read_text().splitlines()
    assert first[0] == "# @package _global_" and first[1].startswith("# "), "state the provenance in a comment"


def test_settings_apply_only_to_their_pair(compose_cfg):
    gpm = compose_cfg(["protocol=gpm_pfmnist", "strategy=gpm"])
    assert list(gpm.strategy.threshold) == [0.95, 0.99, 0.99] and gpm.strategy.num_samples == 300
    elsewhere = compose_cfg(["protocol=default", "strategy=gpm"])
    assert elsewhere.strategy.threshold == 0.97 and elsewhere.strategy_settings is None
    ewc = compose_cfg(["protocol=gpm_pfmnist", "strategy=ewc"])
    assert ewc.trainer.lr == 0.03 and ewc.strategy.ewc_lambda == 10.0
    assert compose_cfg(["protocol=gpm_pfmnist", "strategy=si"]).trainer.lr == 0.01  # the protocol's own


def test_command_line_wins_over_protocol_and_settings(compose_cfg):
    config = compose_cfg(
        [
            "protocol=gpm_pfmnist",
            "strategy=trgp",
            "strategy.trust_threshold=0.7",
            "trainer.epochs=1",
            "stream=split_digits",
        ]
    )
    assert config.strategy.trust_threshold == 0.7
    assert config.trainer.epochs == 1
    assert config.stream.name == "split_digits"
    assert config.strategy_settings == "gpm_pfmnist/trgp"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_a_protocol_and_strategy(compose_cfg, name):
    config = compose_cfg([f"experiment={name}"])
    assert config.protocol_name in PROTOCOLS
    defaults = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())["defaults"]
    strategy = [entry["override /strategy"] for entry in defaults if "override /strategy" in entry]
    if strategy:
        # the same config as naming the pair directly
        direct = compose_cfg([f"protocol={config.protocol_name}", f"strategy={strategy[0]}"])
        assert OmegaConf.to_container(config) == OmegaConf.to_container(direct)


def test_published_numbers_are_keyed_by_existing_pairs():
    table = published_table()
    for protocol, strategy in zip(table["protocol"], table["strategy"], strict=True):
        assert protocol in PROTOCOLS, protocol
        assert strategy in STRATEGIES, strategy


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_target_imports(name):
    config = OmegaConf.load(CONF / "strategy" / f"{name}.yaml")
    assert get_class(config._target_).name  # every strategy class names itself for result paths


@pytest.mark.parametrize("name", STREAMS)
def test_stream_config_composes(compose_cfg, name):
    config = compose_cfg([f"stream={name}"])
    # results land under the stream's name; the avalanche bridge names the benchmark it wraps
    assert config.stream.name == name or (name == "avalanche" and config.stream.name.startswith("avalanche_"))


def test_a_paper_preset_takes_another_strategy(compose_cfg):
    """`experiment=gpm_pfmnist strategy=finetune` stopped with a TypeError (GPM's threshold reached Finetune)."""
    config = compose_cfg(["experiment=gpm_pfmnist", "strategy=finetune"])
    assert config.strategy._target_ == "strategies.finetune.Finetune"
    assert set(config.strategy) == {"_target_"}
    assert config.protocol_name == "gpm_pfmnist" and config.strategy_settings is None
    assert config.trainer.batch_size == 10 and config.stream.num_tasks == 10
