"""A Hydra launcher that runs a sweep's seeds (and batchable hyper-parameter values) as populations.

``python -m clbench -m hydra/launcher=population seed=0,1,2,3,4,5,6,7,8,9``

The one place that knows about populations. It loads every job's config, sorts the jobs into populations and
solo jobs (:func:`clbench.population.grouping.group_jobs`), runs each population in this process as one
(:func:`clbench.population.coordinator.run_members`: every member through Hydra's own ``run_job``, so its
output folder, ``.hydra`` files, ``job.json``, result files, checkpoint and W&B run are a solo job's), and
runs every other job as Hydra's basic launcher does. Jobs come back in sweep order. As for the Ray launcher,
Hydra imports every module of ``hydra_plugins`` on each start, so this one imports clbench only in
:meth:`PopulationLauncher.launch` and does without ``from __future__ import annotations``.
"""

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class PopulationLauncher(Launcher):
    """``batchable_trainer_keys``: trainer values members may differ in; ``max_members``: the largest
    population (a larger group is split)."""

    def __init__(self, batchable_trainer_keys: Sequence[str] = (), max_members: int = 64) -> None:
        self.trainer_keys = list(batchable_trainer_keys)
        self.max_members = int(max_members)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # checked here, not in __init__: an error there reaches the user wrapped in Hydra's instantiation message
        if self.max_members < 2:
            raise HydraException(f"hydra.launcher.max_members must be >= 2, got {self.max_members}")
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from clbench.population.configs import derive_seed_config, seed_of_only_difference
        from clbench.population.coordinator import run_members
        from clbench.population.grouping import group_jobs

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            seed = seed_of_only_difference(job_overrides[0], overrides) if configs else None
            if seed is not None:  # a seed sweep's jobs differ in one value: copy the first, no second composition
                sweep_config = derive_seed_config(configs[0], list(overrides), seed)
            else:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        grouping = group_jobs(configs, self.trainer_keys, self.max_members)
        for note in grouping.notes:
            print(note)
        returns: list[JobReturn | None] = [None] * len(configs)
        for population in grouping.populations:
            print(
                f"clbench: population of {len(population)} jobs: "
                + ", ".join(f"#{initial_job_idx + p}" for p in population)
            )
            members = run_members([functools.partial(self._run_job, configs[p]) for p in population])
            for position, member in zip(population, members, strict=True):
                returns[position] = self._returned(member, job_overrides[position])
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for position in grouping.solo:
            returns[position] = self._run_job(configs[position])
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [r for r in returns if r is not None]

    def _run_job(self, config: DictConfig) -> JobReturn:
        assert self.hydra_context is not None and self.task_function is not None
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    @staticmethod
    def _returned(member: Any, overrides: Sequence[str]) -> JobReturn:
        """The member's ``JobReturn``; one whose thread raised (an interrupt is raised before this) fails."""
        if member.raised is not None:
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=member.raised)
        return member.returned
