"""A Hydra launcher that runs a sweep's seeds (and batchable hyper-parameter values) as populations.

``python -m clbench -m hydra/launcher=population seed=0,1,2,3,4,5,6,7,8,9``

The one place that knows about populations. It loads every job's config, sorts the jobs into populations and
solo jobs (:func:`clbench.population.grouping.group_jobs`), runs each population in this process as one
(:func:`clbench.population.coordinator.run_members`: every member through Hydra's own ``run_job``, so its
output folder, ``.hydra`` files, ``job.json``, result files, checkpoint and W&B run are a solo job's), and
runs every other job as Hydra's basic launcher does. On a CPU the jobs are spread over one worker process per
core, each population dealt out among them (:mod:`clbench.population.workers`, ``workers: auto``); on a GPU
everything runs in this process. Jobs come back in sweep order. As for the Ray launcher,
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
    population (a larger group is split); ``workers``: processes to spread the jobs over (``auto``: one per core
    for CPU jobs, else one; see :func:`clbench.population.workers.choose_layout`)."""

    def __init__(
        self, batchable_trainer_keys: Sequence[str] = (), max_members: int = 64, workers: Any = "auto"
    ) -> None:
        self.trainer_keys = list(batchable_trainer_keys)
        self.max_members = int(max_members)
        self.workers = workers
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # checked here, not in __init__: an error there reaches the user wrapped in Hydra's instantiation message
        if self.max_members < 2:
            raise HydraException(f"hydra.launcher.max_members must be >= 2, got {self.max_members}")
        from clbench.population.configs import ComposedOnce
        from clbench.population.workers import check_setting

        self.workers = check_setting(self.workers)
        self.config = config
        # the sweeper checks every job's config with this loader before launch: both then share the compositions
        if not isinstance(hydra_context.config_loader, ComposedOnce):
            hydra_context.config_loader = ComposedOnce(hydra_context.config_loader)  # type: ignore[assignment]
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from clbench.population.grouping import group_jobs
        from clbench.population.workers import layout_for, plan, population_lines, run_in_workers

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            # composed once for the sweeper's check and this launch (ComposedOnce; a seed is derived, not composed)
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        grouping = group_jobs(configs, self.trainer_keys, self.max_members)
        for note in grouping.notes:
            print(note)
        layout, note = layout_for(self.workers, configs)
        if note:
            print(note)
        plans = plan(grouping.populations, grouping.solo, layout.workers)
        for line in population_lines(grouping.populations, plans, initial_job_idx):
            print(line)
        run_unit = functools.partial(self._run_unit, configs, job_overrides)
        returns: dict[int, JobReturn] = {}
        if layout.workers == 1:
            for unit in plans[0]:
                returns.update(run_unit(unit))
        else:
            print(f"clbench: {len(configs)} jobs in {layout.workers} worker processes, {layout.threads} thread(s) each")
            for end in run_in_workers(plans, run_unit, layout.threads):
                for unit in end.units:
                    for position in unit.positions:
                        returned = end.returns.get(position)
                        if returned is None:
                            returned = self._lost(configs[position], job_overrides[position], end)
                        returns[position] = returned
        return [returns[p] for p in range(len(configs))]

    def _run_unit(
        self, configs: list[DictConfig], job_overrides: Sequence[Sequence[str]], unit: Any
    ) -> list[tuple[int, JobReturn]]:
        """Run one unit of the plan: a population's share as one population, or one job as the basic launcher."""
        from clbench.population.coordinator import run_members

        assert self.config is not None
        if not unit.population or len(unit.positions) == 1:
            position = unit.positions[0]
            returned = self._run_job(configs[position])
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            return [(position, returned)]
        members = run_members([functools.partial(self._run_job, configs[p]) for p in unit.positions])
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [
            (position, self._returned(member, job_overrides[position]))
            for position, member in zip(unit.positions, members, strict=True)
        ]

    @staticmethod
    def _lost(config: DictConfig, overrides: Sequence[str], end: Any) -> JobReturn:
        """A job whose worker ended before returning it (killed, out of memory): failed, with a job.json saying
        so unless the job wrote its own, so that the index and the exit code count it."""
        from clbench.sweeps import write_lost_job

        message = (
            f"its population worker ended (exit code {end.exitcode}) before the job returned: "
            "run the same command again to resume it"
        )
        write_lost_job(config, list(overrides), message)
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=RuntimeError(message))

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
