"""A sweep job's config derived from another's where the two differ only in ``seed``.

Hydra composes every job of a sweep from its files: about 0.15-0.35 s a job here, paid twice per job (the sweeper
checks every job's config before launching, then the launcher loads it again). For a seed sweep those configs
differ in one value: :func:`derive_seed_config` copies the first job's composed config and sets ``seed`` and the
two Hydra fields that name the job's overrides (``hydra.overrides.task``, ``hydra.job.override_dirname``), as
Hydra's ``load_sweep_config`` would have set them; ``tests/population/test_configs.py`` checks the result against
a full composition. Any other difference (a group choice, another value) is composed in full, once:
:class:`ComposedOnce` stands in for the sweep's config loader, so the sweeper's check and the launcher share the
compositions (a 10-seed sweep: one composition instead of twenty).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

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


class ComposedOnce:
    """A sweep's config loader (Hydra's ``ConfigLoader``) whose ``load_sweep_config`` composes each distinct job
    once, and derives a job that differs from a composed one only in ``seed`` (:func:`derive_seed_config`).
    Every call returns a config of its own (a copy), since the launcher writes job fields into it; everything else
    is the wrapped loader's. Full compositions are kept (one per distinct config but the seed), derived ones
    are not."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._composed: dict[tuple[str, ...], tuple[tuple[str, ...], DictConfig]] = {}  # seedless key -> job

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: Sequence[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        found = self._composed.get(_seedless(key))
        if found is not None:
            composed_key, composed = found
            if composed_key == key:
                return copy.deepcopy(composed)
            seed = seed_of_only_difference(composed_key, key)
            if seed is not None:
                return derive_seed_config(composed, key, seed)
        config = self._loader.load_sweep_config(master_config, list(key))
        self._composed.setdefault(_seedless(key), (key, config))
        return copy.deepcopy(config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _seedless(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """``overrides`` with an integer ``seed=`` entry's value blanked: jobs equal but for the seed share it."""
    blank = []
    for item in overrides:
        key, _, value = item.partition("=")
        blank.append("seed=" if key == "seed" and value.lstrip("-").isdigit() else item)
    return tuple(blank)
