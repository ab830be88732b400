"""A population sweep's jobs spread over worker processes, one per CPU core.

Why: on a CPU a batched step costs what its members' single steps cost (the arithmetic does not shrink), and a
population's own outputs (evaluation, W&B runs, result files) are serial Python. One population process on one
thread therefore leaves every other core idle, and two threads do not help: each member thread brings its own
OpenMP team, and their spinning slows the batched products (``benchmarks/results/population_speed.md``). So on
a CPU the launcher forks one worker per core, each on one thread, and gives each worker a share of every
population (a population of 10 seeds on 2 cores: two populations of 5, one per worker). Each member is still an
ordinary run with its solo run's files, and on one thread its R is still bit-identical to its solo run's.

Where a job runs on a GPU the layout is one worker, the launcher's own process: a GPU is where one large
population pays (its steps are launch-bound), and a CUDA context does not survive a fork.

Processes are forked, not spawned: a fork starts at once with torch, Hydra and the composed configs already in
memory, where a spawned worker would import them again (seconds per worker). The launcher forks before any job
has run, so no OpenMP pool, CUDA context or W&B service exists yet to be copied half-made.

Interrupts: a worker ignores SIGINT itself and is interrupted by its launcher (SIGUSR1, raised in the worker as
``KeyboardInterrupt``). Ctrl-C in a terminal reaches every process of the group, and a signal sent to the
launcher alone reaches only it; either way each worker is interrupted exactly once, so its members unwind through
their runners as a solo run's Ctrl-C does, and the launcher raises the interrupt once every worker has ended. A
worker dies with its launcher (``PR_SET_PDEATHSIG`` on Linux), so ``kill -9`` of the sweep leaves no orphans
training on, only the checkpoints a killed solo run leaves.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.errors import HydraException

INTERRUPT_SIGNAL = signal.SIGUSR1  # how the launcher interrupts a worker
INTERRUPTED_EXIT = 130
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Unit:
    """Jobs (sweep positions) a worker runs as one: a population's share, or one job on its own."""

    positions: tuple[int, ...]
    population: bool


@dataclass(frozen=True)
class Layout:
    """How many worker processes, and the torch threads each sets (None: the launcher's process, as it is)."""

    workers: int
    threads: int | None


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_setting(workers: Any) -> int | str:
    """``hydra.launcher.workers``: ``auto`` or an integer >= 1; anything else is one line naming the fix."""
    if workers == "auto":
        return "auto"
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise HydraException(f"hydra.launcher.workers must be auto or an integer >= 1, got {workers!r}")
    return workers


def uses_gpu(device: str) -> bool:
    """Whether a job's ``device`` setting puts it on a GPU here, as its run will pick its device
    (:func:`clbench.runner.select_device`). A setting the run will refuse (``cuda`` without CUDA, a misspelling)
    counts as a GPU: the jobs then stay in the launcher's process, and each says why in its one line."""
    from clbench.runner import select_device
    from clbench.schema import ConfigError

    try:
        return select_device(device).type != "cpu"
    except ConfigError:
        return True


def choose_layout(setting: int | str, devices: Sequence[str], jobs: int, cores: int) -> Layout:
    """The workers for ``jobs`` jobs whose ``device`` settings are ``devices``.

    ``auto``: one worker per core (at most one per job), each on ``cores // workers`` threads, when every job runs
    on the CPU and processes can be forked; else one, the launcher's own process. An explicit count above one is
    refused for GPU jobs (see the module docstring) and where fork is not available."""
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    on_gpu = any(uses_gpu(d) for d in set(devices))
    if setting == "auto":
        workers = min(cores, jobs) if can_fork and not on_gpu else 1
    else:
        workers = min(int(setting), max(jobs, 1))
        if workers > 1 and on_gpu:
            raise HydraException(
                "hydra.launcher.workers > 1 forks CPU worker processes, and these jobs run on a GPU: "
                "set hydra.launcher.workers=1 (or auto)"
            )
        if workers > 1 and not can_fork:
            raise HydraException("hydra.launcher.workers > 1 needs fork, which this platform lacks: set it to 1")
    if workers <= 1:
        return Layout(1, None)
    return Layout(workers, max(1, cores // workers))


def oversubscription_note(layout: Layout, cpu_threads: Sequence[int | None], cores: int) -> str | None:
    """One line where the jobs' own ``cpu_threads`` times the workers asks for more threads than there are cores
    (a worker sets ``cores // workers`` threads only for jobs that leave ``cpu_threads`` unset)."""
    if layout.workers < 2:
        return None
    asked = max((t for t in cpu_threads if t is not None), default=None)
    if asked is None or asked * layout.workers <= cores:
        return None
    return (
        f"clbench: note: cpu_threads={asked} in {layout.workers} worker processes asks for {asked * layout.workers} "
        f"threads on {cores} cores, which slows every worker: set cpu_threads={max(1, cores // layout.workers)} "
        "(or leave it unset), or hydra.launcher.workers=1"
    )


def layout_for(setting: int | str, configs: Sequence[Any]) -> tuple[Layout, str | None]:
    """The layout for a sweep's composed job configs (their ``device`` and ``cpu_threads``) on this machine, and
    the note on oversubscribed threads, if any."""
    cores = usable_cores()
    devices = [str(c.get("device", "auto")) for c in configs]
    layout = choose_layout(setting, devices, len(configs), cores)
    threads = [None if c.get("cpu_threads") is None else int(c.cpu_threads) for c in configs]
    return layout, oversubscription_note(layout, threads, cores)


def population_lines(populations: Sequence[Sequence[int]], plans: Sequence[list[Unit]], offset: int) -> list[str]:
    """One line per population: its jobs, and how many worker processes it was dealt to."""
    lines = []
    for population in populations:
        shares = sum(1 for units in plans for u in units if u.population and u.positions[0] in population)
        where = f" (dealt to {shares} worker processes)" if shares > 1 else ""
        lines.append(
            f"clbench: population of {len(population)} jobs: " + ", ".join(f"#{offset + p}" for p in population) + where
        )
    return lines


def plan(populations: Sequence[Sequence[int]], solo: Sequence[int], workers: int) -> list[list[Unit]]:
    """Each worker's units. A population is dealt round-robin into ``min(workers, size)`` shares (seeds
    0,2,4,... and 1,3,5,...), each share to the least loaded worker; then each solo job to the least loaded."""
    plans: list[list[Unit]] = [[] for _ in range(workers)]
    load = [0] * workers

    def give(unit: Unit) -> None:
        least = min(range(workers), key=lambda w: (load[w], w))
        plans[least].append(unit)
        load[least] += len(unit.positions)

    for population in populations:
        shares = min(workers, len(population))
        for k in range(shares):
            give(Unit(tuple(population[k::shares]), population=True))
    for position in solo:
        give(Unit((position,), population=False))
    return plans


RunUnit = Callable[[Unit], list[tuple[int, Any]]]


@dataclass
class WorkerEnd:
    """What became of one worker: its jobs' returns as they came, and how it exited."""

    units: list[Unit]
    returns: dict[int, Any]
    exitcode: int | None


def run_in_workers(plans: Sequence[list[Unit]], run_unit: RunUnit, threads: int | None) -> list[WorkerEnd]:
    """Fork one worker per plan; each runs its units with ``run_unit`` (``(position, JobReturn)`` pairs come
    back as each unit ends). Raises ``KeyboardInterrupt`` after every worker has ended when the sweep was
    interrupted; otherwise returns each worker's end (a worker that died leaves its remaining jobs unreturned)."""
    context = multiprocessing.get_context("fork")
    sys.stdout.flush()  # else a fork copies the launcher's unwritten output into every worker
    sys.stderr.flush()
    ends: list[WorkerEnd] = []
    processes = []
    pipes: dict[Any, WorkerEnd] = {}
    launcher = os.getpid()
    # a Ctrl-C while the workers are forked waits until every one of them is known, so that each is interrupted
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for index, units in enumerate(plans):
            receive, send = context.Pipe(duplex=False)
            name = f"clbench-population-worker-{index}"
            process = context.Process(target=_worker, args=(units, run_unit, threads, send, launcher), name=name)
            process.start()
            send.close()
            end = WorkerEnd(list(units), {}, None)
            ends.append(end)
            processes.append(process)
            pipes[receive] = end
    except BaseException:
        _stop(processes)  # a failed fork: the workers already running are ended, not left without a launcher
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            for process in processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, INTERRUPT_SIGNAL)

    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C that came during the forks arrives here
    except KeyboardInterrupt:
        interrupt()
    while pipes:
        try:
            for pipe in multiprocessing.connection.wait(list(pipes)):
                try:
                    position, returned = pipe.recv()
                except EOFError:
                    pipes.pop(pipe)
                    continue
                pipes[pipe].returns[position] = returned
        except KeyboardInterrupt:
            interrupt()
    for process, end in zip(processes, ends, strict=True):
        _join(process)
        end.exitcode = process.exitcode
    if interrupted or any(end.exitcode == INTERRUPTED_EXIT for end in ends):
        raise KeyboardInterrupt
    return ends


def _stop(processes: Sequence[Any]) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        _join(process)


def _join(process: Any) -> None:
    while True:
        try:
            process.join()
            return
        except KeyboardInterrupt:  # the workers are unwinding their members: wait for them
            continue


def _worker(units: list[Unit], run_unit: RunUnit, threads: int | None, send: Any, launcher: int) -> None:
    _die_with(launcher)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by what it starts (W&B's service): the launcher decides
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the launcher while it forked
    signal.signal(INTERRUPT_SIGNAL, signal.default_int_handler)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    code = 0
    try:
        for unit in units:
            for position, returned in run_unit(unit):
                try:
                    send.send((position, returned))  # pickled whole before a byte is written
                except Exception:
                    send.send((position, sendable(returned)))
    except KeyboardInterrupt:
        code = INTERRUPTED_EXIT
    finally:
        send.close()
        _close_wandb()
    sys.exit(code)


def sendable(returned: Any) -> Any:
    """``returned`` (a JobReturn that did not pickle) as it can cross a pipe: its error (``_return_value``, a failed
    job's) replaced by a RuntimeError with its text; anything else that does not pickle is raised."""
    value = getattr(returned, "_return_value", None)
    if not isinstance(value, BaseException):
        pickle.dumps(returned)  # raises what stops it
        return returned
    returned._return_value = RuntimeError(f"{type(value).__name__}: {value}")
    return returned


def _die_with(launcher: int) -> None:
    """Have the kernel kill this worker when its launcher dies (Linux); a launcher already gone ends it now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:
        os._exit(INTERRUPTED_EXIT)


def _close_wandb() -> None:
    """End this worker's W&B service connection, which the worker's exit (no atexit hooks) would skip."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        with contextlib.suppress(Exception):
            wandb.teardown()
