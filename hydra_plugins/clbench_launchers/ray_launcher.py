"""A Hydra launcher that runs each job of a sweep as one task on a running Ray cluster, through Ray's own API.

``python -m clbench -m hydra/launcher=ray hydra.launcher.ray.init.address=HEAD:6379 strategy=a,b seed=0,1``

Why clbench ships its own: Hydra's ``hydra-ray-launcher`` (1.2.2 is the newest) requires ``cloudpickle<3``,
while joblib 1.6 (what scikit-learn and the joblib launcher run on) requires ``cloudpickle>=3``, so pip cannot
install both in one environment; Ray itself pins no cloudpickle (it carries its own). The config keeps that
plugin's shape: ``ray.init`` holds the keyword arguments of ``ray.init`` (``address``: the cluster to join),
``ray.remote`` those of ``ray.remote`` (``num_gpus``, ``num_cpus``, ``max_retries``, ...), so the resources
each job asks for come from the config.

What a job sees on a worker: the driver's working folder when that folder exists there (a shared file
system, where a relative ``results_dir`` then means the same folder on every node; without one, give an
absolute ``results_dir`` on storage every node mounts), and ``CUDA_VISIBLE_DEVICES`` naming the GPUs Ray gave
it, so clbench's ``device=auto`` uses exactly those. Plugins must live in the ``hydra_plugins`` namespace for
Hydra to find them, and Hydra imports every module there on each start (before the module is in
``sys.modules``, hence no ``from __future__ import annotations`` here: dataclasses would look it up), so Ray
is imported only in :meth:`RayLauncher.launch`.
"""

import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class RayClusterError(HydraException):
    """The cluster cannot run the sweep as configured (unreachable, or no node fits one job); the message
    names the setting to change. A ``HydraException``, so clbench reports it as one line and exit code 2."""


@dataclass(frozen=True)
class Placement:
    """Where a job ran and what Ray gave it, reported by the worker and logged by the driver."""

    node_ip: str
    resources: dict[str, float]


def plain(node: DictConfig | dict[str, Any] | None) -> dict[str, Any]:
    """A config node as keyword arguments (``null`` values dropped, so Ray's own defaults apply)."""
    if node is None:
        return {}
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {key: value for key, value in values.items() if value is not None}


def fitting_nodes(nodes: list[dict[str, Any]], remote: dict[str, Any]) -> list[str]:
    """The live nodes whose total CPUs, GPUs and memory can hold one job asking for ``remote``'s resources
    (Ray's default of one CPU when ``num_cpus`` is not given). A job no node fits would wait forever."""
    wanted = {
        "CPU": float(remote.get("num_cpus", 1)),
        "GPU": float(remote.get("num_gpus", 0)),
        "memory": float(remote.get("memory", 0)),
        **{name: float(amount) for name, amount in (remote.get("resources") or {}).items()},
    }
    return [
        str(node.get("NodeManagerAddress"))
        for node in nodes
        if node.get("Alive") and all(node.get("Resources", {}).get(k, 0.0) >= v for k, v in wanted.items() if v > 0)
    ]


def check_head_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds when a ``HOST:PORT`` head does not accept connections: ``ray.init`` would retry it for
    minutes. ``auto``, ``null`` and ``ray://`` client addresses are left to Ray."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise RayClusterError(
            f"no Ray cluster answers at {address!r} ({error}): start one with `ray start --head` or name its "
            "head with hydra.launcher.ray.init.address=HOST:PORT"
        ) from error


def _run_on_worker(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    driver_cwd: str,
) -> tuple[JobReturn, Placement]:
    """Run one job inside a Ray task, as Hydra's own launchers do in their worker processes."""
    import ray
    from hydra.core.hydra_config import HydraConfig

    if Path(driver_cwd).is_dir():  # a shared file system: relative paths mean what they meant on the driver
        os.chdir(driver_cwd)
        if driver_cwd not in sys.path:
            sys.path.insert(0, driver_cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    context = ray.get_runtime_context()
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = context.get_task_id()
    HydraConfig.instance().set_config(sweep_config)
    placement = Placement(node_ip=ray.util.get_node_ip_address(), resources=dict(context.get_assigned_resources()))
    returned = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    return returned, placement


class RayLauncher(Launcher):
    """Submits every job of a batch as a Ray task at once; Ray places them on nodes with room for them.

    ``check_resources``: refuse, before submitting, a sweep whose jobs no live node can hold (set it to false
    on an autoscaling cluster whose fitting nodes appear only on demand)."""

    def __init__(self, ray: DictConfig, check_resources: bool = True) -> None:
        self.ray_config = ray
        self.check_resources = check_resources
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _connect(self) -> Any:
        """Join the cluster named by ``ray.init.address`` (once per process; later batches reuse it)."""
        try:
            import ray
        except ImportError as error:
            raise RayClusterError(f'hydra/launcher=ray needs Ray ({error}): pip install -e ".[ray]"') from error
        if ray.is_initialized():
            return ray
        init = plain(self.ray_config.get("init"))
        address = init.get("address")
        check_head_reachable(address)
        try:
            ray.init(**init)
        except ConnectionError as error:
            raise RayClusterError(
                f"no Ray cluster answers at {address!r} ({str(error).split('. ')[0]}): start one with "
                "`ray start --head` or name its head with hydra.launcher.ray.init.address=HOST:PORT"
            ) from error
        return ray

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        ray = self._connect()
        remote = plain(self.ray_config.get("remote"))
        if self.check_resources and not fitting_nodes(ray.nodes(), remote):
            asked = ", ".join(f"{key}={remote[key]}" for key in ("num_cpus", "num_gpus", "memory") if key in remote)
            raise RayClusterError(
                f"no live node of the Ray cluster can hold one job asking for {asked or 'one CPU'}: ask for less "
                "(e.g. hydra.launcher.ray.remote.num_gpus=0 on a CPU-only cluster), add such a node, or set "
                "hydra.launcher.check_resources=false on an autoscaling cluster"
            )
        task = ray.remote(**remote)(_run_on_worker)
        log.info(f"Ray launcher: {len(job_overrides)} jobs on {ray.get_runtime_context().gcs_address}, each {remote}")
        singleton_state = Singleton.get_state()
        pending = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.num = idx
            future = task.remote(self.hydra_context, sweep_config, self.task_function, singleton_state, os.getcwd())
            pending.append((idx, list(overrides), future))
        return [self._collect(ray, idx, overrides, future) for idx, overrides, future in pending]

    @staticmethod
    def _collect(ray: Any, idx: int, overrides: list[str], future: Any) -> JobReturn:
        """Wait for one job. A job whose worker or node died after Ray's retries (``ray.remote.max_retries``)
        comes back failed with Ray's error, which ends the sweep as a failed job does under any launcher."""
        try:
            returned, placement = ray.get(future)
        except ray.exceptions.RayError as error:
            log.error(f"#{idx} was lost on the Ray cluster: {type(error).__name__}: {error}")
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)
        log.info(f"#{idx} ran on {placement.node_ip} with {placement.resources}")
        return returned
