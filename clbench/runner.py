"""The task loop: random-init row b, then per task fit -> evaluate every task -> log -> checkpoint.

The runner never knows a method's name: it only calls the Strategy hooks. It owns seeding, the device,
the accuracy matrix R, the checkpoint after every task (resume continues from the last finished task),
and the result file.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clbench import cost, metrics
from clbench.control import ControlRecord
from clbench.l2m import summarize_l2m
from clbench.lock import RunLock
from clbench.loggers.base import Logger, RunInfo
from clbench.loggers.console import ConsoleLogger
from clbench.population.rendezvous import clock  # a population member's own time (solo: perf_counter)
from clbench.pretrain import resolve_checkpoint
from clbench.results import (
    SCHEMA,
    Provenance,
    atomic_torch_save,
    config_digest,
    experiment_identity,
    find_reference_run,
    load_checkpoint,
    package_versions,
    read_run_result,
    recorded_source_digest,
    write_result,
)
from clbench.schema import ConfigError, check_config
from clbench.scole import accumulation_summary
from clbench.strategy import Strategy
from clbench.sweeps import job_context
from clbench.trainer import Trainer

DEVICES = ("auto", "cpu", "cuda")
RESUME_MODES = (True, False, "keep")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a task: the last finished task's checkpoint stays, and the same command resumes."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"interrupted during task {task_id}; rerun the same command to resume")


def select_device(name: str, job_num: int = 0) -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; asking for CUDA where none exists is an error.

    With several GPUs, ``auto`` pins job ``job_num`` of a sweep to GPU ``job_num mod count``, so parallel
    local jobs (joblib) spread over the node's GPUs instead of piling onto the first.
    """
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", job_num % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available here: use device=cpu or device=auto")
    return torch.device(name)


def activate_device(device: torch.device) -> None:
    """Make a CUDA ``device`` this process's current device. ``select_device`` pins sweep job k to cuda:k,
    but what works on "the current device" (CUDA-graph capture and its streams, cuBLAS handles) would
    otherwise still run on cuda:0, beside tensors that live on cuda:k."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _rng_state(trainer: Trainer) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "trainer": trainer.generator.get_state() if trainer.generator else None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["numpy"] = np.random.get_state()
    state["python"] = random.getstate()
    return state


def _restore_rng_state(trainer: Trainer, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if trainer.generator is not None and state["trainer"] is not None:
        trainer.generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configured experiment end to end and return its result (also written to disk).

    The whole config is checked first (:mod:`clbench.schema`: one line per bad value, before anything is
    built), and the run folder stays locked while the run trains (:mod:`clbench.lock`), released however
    it ends."""
    check_config(cfg)
    # model.checkpoint=pretrain becomes the cached pretraining file (pretrained first when missing), before the run
    # seeds anything, so its training is the same with or without the cache
    resolve_checkpoint(cfg, select_device(str(cfg.device)))
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, cleanup)


def _run(cfg: DictConfig, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(config, dict)
    config.pop("hydra", None)
    context = job_context()
    device = select_device(str(cfg.device), context.job_num if context.multirun else 0)
    activate_device(device)
    seed = int(cfg.seed)
    seed_everything(seed, bool(cfg.get("deterministic", False)))
    if cfg.get("cpu_threads") is not None:
        if int(cfg.cpu_threads) < 1:
            raise ConfigError(f"cpu_threads must be >= 1 (or null for torch's default), got {cfg.cpu_threads}")
        torch.set_num_threads(int(cfg.cpu_threads))

    strategy: Strategy = instantiate(cfg.strategy)
    trainer: Trainer = instantiate(cfg.trainer)
    stream = instantiate(cfg.stream)
    strategy.check_scenario(stream.scenario)
    control = ControlRecord(instantiate(cfg.control) if cfg.get("control") else None)  # conf/control/
    extra_logger: Logger = instantiate(cfg.logger) if cfg.get("logger") else Logger()
    loggers: list[Logger] = [ConsoleLogger(bool(cfg.get("verbose", True)), tagged=context.multirun), extra_logger]

    # the parts of the config that change results (the report groups by the same notion), read once: a checkpoint
    # file enters by its content, and the run id and the recorded identity must name the same bytes
    identity = experiment_identity(config)
    run_id = cfg.get("run_id") or f"seed{seed}-{config_digest(identity)}"
    run_dir = Path(str(cfg.results_dir)) / stream.name / strategy.name / run_id
    result_path, checkpoint_path = run_dir / "result.json", run_dir / "checkpoint.pt"
    resume_mode = cfg.get("resume", True)
    if resume_mode not in RESUME_MODES:
        raise ConfigError(f"resume={resume_mode} is not one of true, false, keep: use resume=true|false|keep")
    resume = bool(resume_mode)
    made_by = Provenance(type(strategy))  # git state read in the background
    if resume and result_path.exists():
        previous = read_run_result(result_path)
        if previous.get("status") == "completed":
            recorded, today = recorded_source_digest(previous), made_by.strategy_source["digest"]
            if recorded in (None, today) or resume_mode == "keep":
                print(f"clbench: {result_path} is already completed; pass resume=false to run it again")
                return previous
            print(
                f"clbench: {result_path} was made by other {strategy.name} source ({recorded}, now {today}): "
                "running it again (resume=keep keeps the old result)"
            )
            resume = False  # its checkpoint comes from the old code too
    run_dir.mkdir(parents=True, exist_ok=True)
    cleanup.enter_context(RunLock(run_dir))

    cost.reset_peak_memory(device)  # this run's peak, not an earlier job's in the same process
    stream = stream.to(device)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes).to(device)
    strategy.setup(model, stream)
    control.prepare(strategy.model or model, stream, trainer)
    trainer.attach(stream, seed)
    trainer.prepare(strategy)
    steps = cost.StepCounter()
    steps.attach(trainer)
    give_task_id = stream.scenario == "task" or strategy.uses_task_oracle
    num_tasks = len(stream)
    task_names = [task.name for task in stream.evaluation_tasks]

    acc_matrix = np.full((num_tasks, len(stream.evaluation_tasks)), np.nan)
    # Class scenario: R is task-agnostic (TAg); beside it R with the task given (TAw: each task read on its own
    # classes), as FACIL reports both. Other scenarios have one matrix.
    task_aware = stream.scenario == "class" and not give_task_id
    acc_matrix_taw = np.full_like(acc_matrix, np.nan)
    random_init_taw = np.full(acc_matrix.shape[1], np.nan)
    class_acc: list[list[float]] = []
    fit_seconds: list[float] = []
    eval_seconds: list[float] = []
    graph_replays: list[int] = []  # per task, training steps replayed as CUDA graphs (0: all eager)
    closed_form_steps: list[int] = []  # per task, training steps with closed-form gradients (0: all autograd)
    learning_curves: list[list[list[float]]] = []
    accuracy_curves: list[list[list[float]]] = []
    first_task = 0
    started = time.perf_counter()

    def evaluate_rows() -> tuple[np.ndarray, np.ndarray | None]:
        """R's row for the model as it is now, and in the class scenario its task-aware twin (one pass for both)."""
        if task_aware:
            agnostic, aware = trainer.evaluator.rows_with_task_aware(strategy, give_task_id)
            return np.asarray(agnostic), np.asarray(aware)
        return np.asarray(trainer.evaluate(strategy, give_task_id)), None

    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, device)
        strategy.load_state_dict(checkpoint["strategy"])
        _restore_rng_state(trainer, checkpoint["rng"])
        first_task = checkpoint["next_task"]
        acc_matrix[:first_task] = np.asarray(checkpoint["acc_matrix"])[:first_task]
        random_init_acc = np.asarray(checkpoint["random_init_acc"])
        if task_aware:
            acc_matrix_taw[:first_task] = np.asarray(checkpoint["acc_matrix_taw"])[:first_task]
            random_init_taw = np.asarray(checkpoint["random_init_acc_taw"])
        random_init_eval_s = checkpoint.get("random_init_eval_s", 0.0)
        fit_seconds, eval_seconds = checkpoint["fit_seconds"], checkpoint["eval_seconds"]
        graph_replays = checkpoint.get("graph_replays", [0] * first_task)
        closed_form_steps = checkpoint.get("closed_form_steps", [0] * first_task)
        learning_curves = checkpoint["learning_curves"]
        accuracy_curves = checkpoint.get("accuracy_curves", [])
        class_acc = checkpoint.get("class_acc", [])
        for logger, state in zip(loggers, checkpoint.get("loggers", []), strict=False):
            logger.load_state_dict(state)
        steps.steps, steps.samples = checkpoint.get("train_steps", (0, 0))
        control.load_state_dict(checkpoint, first_task)
        print(f"clbench: resuming {run_dir} after task {first_task - 1}")
    else:
        tick = time.perf_counter()
        random_init_acc, aware = evaluate_rows()
        if aware is not None:
            random_init_taw = aware
        control.measure(strategy, None)
        random_init_eval_s = time.perf_counter() - tick

    group = f"{stream.name}/{context.sweep_dir.name}" if context.sweep_dir is not None else stream.name
    info = RunInfo(
        run_id, run_dir, stream.name, strategy.name, stream.scenario, seed, task_names, config, group, num_tasks
    )
    for logger in loggers:
        logger.start(info)
        if control.active:
            logger.log_control(None, control.before)
        for t in range(first_task):
            logger.log_task(t, acc_matrix, random_init_acc)
            if control.active:
                logger.log_control(t, control.after_task[t])

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "running",
        "run_id": run_id,
        "stream": stream.name,
        "strategy": strategy.name,
        "scenario": stream.scenario,
        "protocol": config.get("protocol_name"),
        "strategy_settings": config.get("strategy_settings"),
        "seed": seed,
        "uses_task_oracle": strategy.uses_task_oracle,
        "units": "percent",
        "definitions": "R[i][j] = test accuracy on task j after training task i; see clbench/metrics.py",
        "tasks": [{"id": t.id, "name": t.name, "classes": list(t.classes), "num_train": t.num_train} for t in stream],
        "config": config,
        "model_checkpoint_identity": (identity.get("model") or {}).get("checkpoint"),
        "versions": package_versions(),
        "provenance": made_by.record(),
        "device": str(device),
        "host": socket.gethostname(),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "paths": {"run_dir": str(run_dir), "result": str(result_path), "checkpoint": str(checkpoint_path)},
    }

    def snapshot(status: str, error: str | None = None) -> dict[str, Any]:
        done = int(np.isfinite(acc_matrix).all(axis=1).sum())
        result.update(
            status=status,
            acc_matrix=acc_matrix[:done].tolist(),
            random_init_acc=random_init_acc.tolist(),
            tasks_completed=done,
            timings={
                "fit_s": fit_seconds,
                "eval_s": eval_seconds,
                "random_init_eval_s": random_init_eval_s,
                "total_s": time.perf_counter() - started,
                "graph_replays": graph_replays,
                "closed_form_steps": closed_form_steps,
            },
            learning_curves=learning_curves,
            train_acc_curves=accuracy_curves,
        )
        if task_aware:
            result.update(acc_matrix_taw=acc_matrix_taw[:done].tolist(), random_init_acc_taw=random_init_taw.tolist())
        if not stream.square:
            result.update(acc_over_time=acc_matrix[:done].mean(axis=1).tolist(), class_acc=class_acc[:done])
        result.update(control.result_fields(done))
        if error is not None:
            result["error"] = error
        return result

    def record_failure(error: Exception) -> None:
        """The result file says failed, with the error and every finished task; the loggers finish with it."""
        failed = snapshot("failed", f"{type(error).__name__}: {error}")
        write_result(result_path, failed)
        for logger in loggers:
            logger.finish(failed)

    write_result(result_path, snapshot("running"))
    check_extra_results(strategy, result)
    try:
        for task in stream.tasks[first_task:]:
            curves_before, replays_before = len(trainer.epoch_losses), sum(trainer.graph_replays)
            closed_before = sum(trainer.closed_form_steps)
            tick = clock()
            strategy.fit_task(task, trainer)
            strategy.after_task(task)
            fit_seconds.append(clock() - tick)
            graph_replays.append(sum(trainer.graph_replays) - replays_before)
            closed_form_steps.append(sum(trainer.closed_form_steps) - closed_before)
            learning_curves.append(trainer.epoch_losses[curves_before:])
            accuracy_curves.append(trainer.epoch_accuracies[curves_before:])
            tick = clock()
            acc_matrix[task.id], aware = evaluate_rows()
            if aware is not None:
                acc_matrix_taw[task.id] = aware
            if not stream.square:
                class_acc.append(
                    trainer.class_accuracy(strategy, stream.evaluation_tasks[0], stream.num_classes, give_task_id)
                )
            control.measure(strategy, task.id)
            eval_seconds.append(clock() - tick)
            for logger in loggers:
                logger.log_task(task.id, acc_matrix, random_init_acc)
                if control.active:
                    logger.log_control(task.id, control.after_task[task.id])
            atomic_torch_save(
                {
                    "next_task": task.id + 1,
                    "strategy": strategy.state_dict(),
                    "rng": _rng_state(trainer),
                    "acc_matrix": acc_matrix,
                    "random_init_acc": random_init_acc,
                    "acc_matrix_taw": acc_matrix_taw,
                    "random_init_acc_taw": random_init_taw,
                    "random_init_eval_s": random_init_eval_s,
                    "fit_seconds": fit_seconds,
                    "graph_replays": graph_replays,
                    "closed_form_steps": closed_form_steps,
                    "eval_seconds": eval_seconds,
                    "learning_curves": learning_curves,
                    "accuracy_curves": accuracy_curves,
                    "class_acc": class_acc,
                    "train_steps": (steps.steps, steps.samples),
                    "loggers": [logger.state_dict() for logger in loggers],
                    **control.state_dict(),
                },
                checkpoint_path,
            )
            first_task = task.id + 1  # where a rerun resumes from
            write_result(result_path, snapshot("running"))
    except Exception as error:
        record_failure(error)
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(first_task) from None

    # Summaries after the last task can fail too (a metric that refuses a strategy's curves, a plot, the cost
    # probe): the result file then says failed, not running, and a rerun resumes after the last task.
    try:
        title = f"{strategy.name} on {stream.name}"
        plots = bool(cfg.get("plots", True))
        if stream.square:
            # references found at run time; clbench.report recomputes both from whatever runs it reads, in any order
            where = (Path(str(cfg.results_dir)), stream.name, seed, config["stream"], config.get("model"))
            reference = find_reference_run(*where)
            joint = find_reference_run(*where, "joint")
            if strategy.name == "independent":
                reference = {"acc_matrix": acc_matrix.tolist(), "train_acc_curves": accuracy_curves}
            if strategy.name == "joint":
                joint = {"acc_matrix": acc_matrix.tolist()}
            reference_acc = None if reference is None else np.diag(np.asarray(reference["acc_matrix"])).tolist()
            joint_acc = None if joint is None else metrics.joint_reference(joint["acc_matrix"])
            result["reference_acc"] = reference_acc
            result["joint_reference_acc"] = joint_acc
            result["metrics"] = metrics.summarize(acc_matrix, random_init_acc, joint_acc, reference_acc)
            if task_aware:
                result["metrics_taw"] = metrics.summarize(acc_matrix_taw, random_init_taw)
            result["metrics"].update(
                summarize_l2m(
                    acc_matrix,
                    random_init_acc,
                    ste_acc=reference_acc,
                    curves=flat_curves(accuracy_curves),
                    ste_curves=None if reference is None else flat_curves(reference.get("train_acc_curves")),
                )
            )
            result["matrices"] = {
                "forgetting": metrics.forgetting_matrix(acc_matrix),
                "backward_transfer": metrics.backward_transfer_matrix(acc_matrix),
                "forward_transfer": metrics.forward_transfer_matrix(acc_matrix, random_init_acc),
            }
            if plots:
                from clbench.heatmap import save_matrix

                result["paths"]["heatmap"] = str(save_matrix(acc_matrix, f"{title}: R (%)", run_dir / "acc_matrix.png"))
        else:
            over_time = acc_matrix.mean(axis=1).tolist()
            result["metrics"] = accumulation_summary(over_time)
            if plots:
                from clbench.plots import save_curve

                result["paths"]["curve"] = str(
                    save_curve(over_time, f"{title}: full test set", run_dir / "acc_over_time.png")
                )
        result["metrics"].update(control.metrics())
        count_flops = cfg.get("count_flops", "auto")
        count_flops = context.multirun if count_flops == "auto" else bool(count_flops)
        result["cost"] = cost.measure(strategy, trainer, stream.tasks[-1], steps, device, count_flops)
        extra = strategy.extra_results()
        clashing = sorted(set(extra) & set(result))
        if clashing:
            raise ValueError(
                f"strategy {strategy.name!r} extra_results keys {clashing} clash with the result file's own"
            )
        result.update(extra)
        result["finished_at"] = datetime.now(timezone.utc).isoformat()
    except Exception as error:
        record_failure(error)
        raise
    snapshot("completed")
    for logger in loggers:  # before the file says completed: an interrupted W&B finish is redone on rerun
        logger.finish(result)
    write_result(result_path, result)
    return result


# keys the runner adds to result.json only once the run is done
LATE_RESULT_KEYS = ("metrics", "matrices", "reference_acc", "joint_reference_acc", "cost", "finished_at", "error")


def check_extra_results(strategy: Strategy, result: dict[str, Any]) -> None:
    """Probe ``strategy.extra_results()`` before training, so a key that clashes with the result file's own
    stops the run at its start rather than after all the training (checked again at the end)."""
    try:
        keys = set(strategy.extra_results())
    except Exception:  # its values may need trained state; the end-of-run check still holds
        return
    clashing = sorted(keys & (set(result) | set(LATE_RESULT_KEYS)))
    if clashing:
        raise ConfigError(
            f"strategy {strategy.name!r} extra_results keys {clashing} clash with the result file's own: rename them"
        )


def flat_curves(curves: list[list[list[float]]] | None) -> list[list[float]] | None:
    """Per task, the training-accuracy curve over all its fits (epochs of every ``trainer.fit`` call); None where
    a task has none (a strategy that trains outside ``trainer.fit``, such as the Avalanche bridge), since the
    curve-based L2M metrics need one for every task."""
    if not curves:
        return None
    flat = [[point for fit in task for point in fit] for task in curves]
    return flat if all(flat) else None
