"""Which jobs of a sweep run together as one population.

Two jobs may share a population when their configs are equal once ``seed`` and the numeric values that may
differ between members are set aside: the trainer's (``batchable_trainer_keys`` in
``conf/hydra/launcher/population.yaml``: lr, momentum, weight decay) and those the strategy class names in its
``batchable`` attribute (EWC's ``ewc_lambda``, ...). Such values change no shape and no code path: every member
keeps its own optimizer and strategy, so they need not be equal. The strategy must declare ``population_safe``
(its own class, as ``closed_form_safe``): a population member then gives the result of its solo run, which a
test checks for every such strategy. Jobs of any other strategy run as solo runs, as Hydra's basic launcher
runs them (spread over the worker processes where there are several), with one line saying so.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf


@dataclass
class Grouping:
    """The sweep's jobs (by position) as populations and solo jobs, plus the notes to print."""

    populations: list[list[int]] = field(default_factory=list)
    solo: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def strategy_class(cfg: DictConfig) -> type | None:
    """The class a job's ``strategy._target_`` names, or None where it cannot be imported (the job then runs
    alone and reports its own error)."""
    target = OmegaConf.select(cfg, "strategy._target_")
    if not isinstance(target, str):
        return None
    try:
        return get_class(target)
    except Exception:
        return None


def population_key(cfg: DictConfig, trainer_keys: Sequence[str], strategy_keys: Sequence[str]) -> str:
    """The job's config without what members may differ in (``seed``, the batchable values) and without
    Hydra's own node, as one canonical string."""
    config: Any = OmegaConf.to_container(cfg, resolve=False)
    config = copy.deepcopy(config)
    config.pop("hydra", None)
    config.pop("seed", None)
    for section, keys in (("trainer", trainer_keys), ("strategy", strategy_keys)):
        node = config.get(section)
        if isinstance(node, dict):
            for key in keys:
                if isinstance(node.get(key), int | float) and not isinstance(node.get(key), bool):
                    node.pop(key)
    return repr(sorted_items(config))


def sorted_items(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((str(k), sorted_items(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if isinstance(value, list):
        return tuple(sorted_items(v) for v in value)
    return value


def group_jobs(configs: Sequence[DictConfig], trainer_keys: Sequence[str], max_members: int) -> Grouping:
    """Sort the sweep's job configs into populations (two or more members, at most ``max_members``) and jobs
    that run alone."""
    grouping = Grouping()
    by_key: dict[str, list[int]] = {}
    unsafe: dict[str, list[int]] = {}
    for position, cfg in enumerate(configs):
        cls = strategy_class(cfg)
        if cls is None:
            grouping.solo.append(position)
            continue
        if not cls.__dict__.get("population_safe", False):
            unsafe.setdefault(getattr(cls, "name", cls.__name__), []).append(position)
            grouping.solo.append(position)
            continue
        key = population_key(cfg, trainer_keys, getattr(cls, "batchable", ()))
        by_key.setdefault(f"{cls.__module__}.{cls.__qualname__}|{key}", []).append(position)
    for positions in by_key.values():
        if len(positions) == 1:
            grouping.solo.extend(positions)
            continue
        for start in range(0, len(positions), max_members):
            chunk = positions[start : start + max_members]
            (grouping.populations.append(chunk) if len(chunk) > 1 else grouping.solo.extend(chunk))
    for name, positions in unsafe.items():
        if len(positions) > 1:
            grouping.notes.append(
                f"clbench: population: strategy {name!r} does not declare population_safe; its {len(positions)} "
                "jobs run as solo runs"
            )
    grouping.solo.sort()
    return grouping
