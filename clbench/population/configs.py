"""A sweep job's config derived from another's where the two differ only in ``seed``.

Hydra composes every job of a sweep from its files: about 0.35 s a job here, paid twice per job (the sweeper
checks every job's config before launching, then the launcher loads it again). For a seed sweep those configs
differ in one value: :func:`derive_seed_config` copies the first job's composed config and sets ``seed`` and the
two Hydra fields that name the job's overrides (``hydra.overrides.task``, ``hydra.job.override_dirname``), as
Hydra's ``load_sweep_config`` would have set them; ``tests/population/test_configs.py`` checks the result against
a full composition. Any other difference (a group choice, another value) is composed in full.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from hydra._internal.config_loader_impl import get_overrides_dirname  # what load_sweep_config names jobs with
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def seed_of_only_difference(first: Sequence[str], other: Sequence[str]) -> int | None:
    """The seed ``other`` sets where it equals ``first`` but for a ``seed=<int>`` entry in the same place; None
    where they differ in anything else (or not at all)."""
    if len(first) != len(other):
        return None
    seed = None
    for mine, theirs in zip(first, other, strict=True):
        if mine == theirs:
            continue
        key, _, value = theirs.partition("=")
        if key != "seed" or not mine.startswith("seed=") or not value.lstrip("-").isdigit():
            return None
        seed = int(value)
    return seed


def derive_seed_config(first: DictConfig, overrides: Sequence[str], seed: int) -> DictConfig:
    """``first`` (a composed sweep-job config) as the job with ``overrides`` (which differ only in ``seed``)."""
    config = copy.deepcopy(first)
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    naming = config.hydra.job.config.override_dirname
    with read_write(config), open_dict(config):
        config.seed = seed
        config.hydra.overrides.task = list(overrides)
        config.hydra.job.override_dirname = get_overrides_dirname(
            overrides=[o for o in parsed if not o.is_hydra_override()],
            kv_sep=naming.kv_sep,
            item_sep=naming.item_sep,
            exclude_keys=list(naming.exclude_keys),
        )
    OmegaConf.copy_cache(from_config=first, to_config=config)
    return config
