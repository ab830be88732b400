"""``python -m clbench.check strategy=<name> [overrides]``: a conformance kit for a strategy, yours included.

It runs the strategy on a tiny deterministic CPU protocol (3 tasks of split digits, one epoch; any
override on the command line changes it; with ``protocol=`` or ``stream=`` that stream, shrunk to 3 tasks of 300
training images, and a pretrained model pretrained once for all the checks) and checks what the harness
relies on but cannot see:

* resume: a run interrupted after its first task and rerun ends with the same accuracy matrix R as an
  uninterrupted run, bit for bit (what ``deterministic=true`` promises). A strategy whose state is not all
  in ``state_dict`` (an ``anchor`` the default could not see, a cache rebuilt differently) fails here;
* state round trip: ``state_dict`` survives ``torch.save`` / ``torch.load`` into a fresh instance, and
  that instance predicts exactly as the original;
* declarations: a class that declares ``closed_form_safe`` trains the same (up to float rounding) with
  ``trainer.closed_form`` on and off; one that declares ``graph_safe`` the same with ``trainer.cuda_graphs``
  on and off (needs a CUDA device; otherwise reported as not checked); one that declares ``population_safe``
  gives two seeds run as one population (``hydra/launcher=population``) their solo runs' R, bit for bit.

It prints one line per check, ``PASS`` / ``FAIL`` / ``SKIP``, with what failed and why, and exits 1 when
any check fails (2 for bad input, as ``python -m clbench`` does).
"""

from __future__ import annotations

import io
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from clbench.__main__ import CONFIG_DIR, USER_ERROR_EXIT, check_group_choices, user_config_dirs
from clbench.sweeps import register_resolvers

# the tiny protocol: small enough for seconds on a CPU, three tasks so a resume happens mid-stream
TINY = [
    "stream=split_digits",
    "stream.num_tasks=3",
    "trainer.epochs=1",
    "seed=0",
    "deterministic=true",
    "device=cpu",
    "cpu_threads=1",
    "logger=none",
    "verbose=false",
    "plots=false",
    "trainer.progress=false",
]
# a protocol or stream of the user's choosing is kept, shrunk to this (where the stream has the key and the command
# line does not set it): its input size and classes are what the model of that protocol was built for
SHRUNK_STREAM = {"num_tasks": 3, "train_per_task": 300}
# closed-form gradients equal autograd's up to float rounding, which a few hundred steps amplify a little
PARAMETER_TOLERANCE = 1e-4


@dataclass
class Outcome:
    """One check's verdict: ``PASS``, ``FAIL`` or ``SKIP`` (could not apply here), and why."""

    check: str
    verdict: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict} {self.check}: {self.detail}"


class _Interrupt(KeyboardInterrupt):
    """Raised in place of a user's Ctrl-C right after the first checkpoint is written."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def chooses_stream(overrides: list[str]) -> bool:
    """Whether the command line picks a protocol or a stream (the kit then keeps it, shrunk)."""
    return any(_key(o) in ("protocol", "stream") for o in overrides)


def compose_checked(overrides: list[str], results_dir: Path | None) -> DictConfig:
    """The config ``python -m clbench`` would run with the tiny protocol, then ``overrides``. With a protocol or
    stream on the command line the kit keeps that stream (split digits' 8x8 images would not fit a model built for
    the protocol, e.g. a ViT with 7-pixel patches), shrunk to :data:`SHRUNK_STREAM`. ``results_dir=None`` keeps the
    configured one."""
    search = [f"file://{d}" for d in user_config_dirs()]
    extra = [f"hydra.searchpath=[{','.join(search)}]"] if search else []
    keep_stream = chooses_stream(overrides)
    tiny = [o for o in TINY if not (keep_stream and _key(o) == "stream")]
    folder = [] if results_dir is None else [f"results_dir={results_dir}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*tiny, *overrides, *extra, *folder])
    with open_dict(cfg):
        cfg.pop("hydra", None)
        given = {_key(o) for o in overrides}
        for name, value in SHRUNK_STREAM.items() if keep_stream else ():
            if name in cfg.stream and f"stream.{name}" not in given:
                cfg.stream[name] = value
    return cfg


def pretrained_once(overrides: list[str], workdir: Path) -> list[str]:
    """``model.checkpoint=pretrain`` resolved once for every run of the kit (each run has its own results folder,
    so each would pretrain again): the user's own cache (``<results_dir>/_pretrained/...``) when it holds the
    file, else pretrained once into the kit's folder. Returns the override that names the file."""
    from clbench.pretrain import PRETRAIN_TOKEN, checkpoint_path, resolve_checkpoint

    cfg = compose_checked(overrides, None)
    if cfg.model.get("checkpoint") != PRETRAIN_TOKEN:
        return []
    path = checkpoint_path(cfg)
    if not path.is_file():
        cfg = compose_checked(overrides, workdir / "pretrained")
        path = resolve_checkpoint(cfg)
    return [f"model.checkpoint='{Path(path).resolve()}'"]


def check_resume(overrides: list[str], workdir: Path) -> Outcome:
    """Interrupted after task 0 and rerun == uninterrupted, with the checkpoint as the only link."""
    from clbench import runner

    straight = runner.run(compose_checked(overrides, workdir / "straight"))
    interrupted_cfg = compose_checked(overrides, workdir / "interrupted")
    save = runner.atomic_torch_save

    def save_then_interrupt(obj: Any, path: Path) -> None:
        save(obj, path)
        raise _Interrupt

    with mock.patch.object(runner, "atomic_torch_save", save_then_interrupt):
        try:
            runner.run(interrupted_cfg)
        except KeyboardInterrupt:
            pass
        else:
            return Outcome("resume", "SKIP", "the run wrote no checkpoint to resume from (a single task?)")
    try:
        resumed = runner.run(interrupted_cfg)
    except Exception as error:
        return Outcome("resume", "FAIL", f"the rerun after an interruption failed: {type(error).__name__}: {error}")
    expected, got = np.asarray(straight["acc_matrix"]), np.asarray(resumed["acc_matrix"])
    if resumed.get("status") != "completed" or expected.shape != got.shape:
        return Outcome("resume", "FAIL", f"the resumed run ended {resumed.get('status')} with R of shape {got.shape}")
    if not np.array_equal(expected, got):
        i, j = np.argwhere(expected != got)[0]
        return Outcome(
            "resume",
            "FAIL",
            f"interrupted after task 0 and resumed, R[{i}][{j}] is {got[i, j]:.2f} instead of {expected[i, j]:.2f} "
            f"(ACC {resumed['metrics']['acc']:.2f} vs {straight['metrics']['acc']:.2f}): state_dict misses some of "
            "the strategy's state; save it there (and put it back in load_state_dict)",
        )
    return Outcome("resume", "PASS", "interrupted after task 0 and resumed, R equals the uninterrupted run's")


def _build(cfg: DictConfig, **trainer_overrides: Any) -> tuple[Any, Any, Any]:
    """Strategy, trainer and stream set up as the runner does it (same seed, same model)."""
    from clbench.runner import seed_everything

    seed_everything(int(cfg.seed), bool(cfg.deterministic))
    strategy = instantiate(cfg.strategy)
    trainer = instantiate(cfg.trainer, **trainer_overrides)
    stream = instantiate(cfg.stream)
    strategy.check_scenario(stream.scenario)
    device = torch.device(str(cfg.device) if str(cfg.device) != "auto" else "cpu")
    stream = stream.to(device)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes).to(device)
    strategy.setup(model, stream)
    trainer.attach(stream, int(cfg.seed))
    trainer.prepare(strategy)
    return strategy, trainer, stream


def _same(a: Any, b: Any, where: str = "state") -> str | None:
    """Where two saved states differ, or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return where
        return None if torch.equal(a.detach().cpu(), b.detach().cpu()) else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} (keys {sorted(map(str, a.keys() ^ b.keys()))})"
        return next((d for k in a if (d := _same(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return where
        return next((d for k, (x, y) in enumerate(zip(a, b, strict=True)) if (d := _same(x, y, f"{where}[{k}]"))), None)
    if hasattr(a, "state") and hasattr(b, "state"):  # clbench.strategy.ModuleState
        return _same(a.state, b.state, where)
    try:
        return None if bool(a == b) else where
    except Exception:
        return None if type(a) is type(b) else where


def check_round_trip(cfg: DictConfig) -> Outcome:
    """``state_dict`` -> bytes -> a fresh instance's ``load_state_dict``: same state, same predictions."""
    strategy, trainer, stream = _build(cfg)
    task = stream.tasks[0]
    strategy.fit_task(task, trainer)
    strategy.after_task(task)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    fresh, fresh_trainer, _ = _build(cfg)
    try:
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
    except Exception as error:
        return Outcome("state round trip", "FAIL", f"load_state_dict failed: {type(error).__name__}: {error}")
    differs = _same(strategy.state_dict(), fresh.state_dict())
    if differs is not None:
        return Outcome("state round trip", "FAIL", f"after save and load, {differs} differs from the original's")
    give_id = stream.scenario == "task" or strategy.uses_task_oracle
    before, after = trainer.evaluate(strategy, give_id), fresh_trainer.evaluate(fresh, give_id)
    if not np.array_equal(np.asarray(before), np.asarray(after)):
        return Outcome(
            "state round trip",
            "FAIL",
            f"a fresh instance loaded from state_dict predicts differently (accuracies {list(after)} instead of "
            f"{list(before)}): something predict() reads is not in state_dict",
        )
    return Outcome("state round trip", "PASS", "state_dict survives save / load, and predictions are unchanged")


def _trained_parameters(cfg: DictConfig, **switches: Any) -> list[torch.Tensor]:
    strategy, trainer, stream = _build(cfg, **switches)
    strategy.fit_task(stream.tasks[0], trainer)
    return [p.detach().cpu().clone() for p in strategy.model.parameters()]


def _compare_switch(cfg: DictConfig, check: str, flag: str, switch: str, needs: Callable[[], str | None]) -> Outcome:
    """Train task 0 with ``trainer.<switch>`` on and off; a class that declares ``flag`` must not change."""
    strategy = instantiate(cfg.strategy)
    if not strategy.declares(flag):
        return Outcome(check, "SKIP", f"{type(strategy).__name__} does not declare {flag} (nothing to hold)")
    missing = needs()
    if missing is not None:
        return Outcome(check, "SKIP", missing)
    try:
        on = _trained_parameters(cfg, **{switch: True})
    except ValueError as error:
        return Outcome(check, "SKIP", f"trainer.{switch}=true cannot apply here: {error}")
    off = _trained_parameters(cfg, **{switch: False})
    worst = max(float((a - b).abs().max()) for a, b in zip(on, off, strict=True))
    if worst > PARAMETER_TOLERANCE:
        return Outcome(
            check,
            "FAIL",
            f"it declares {flag}, but training with trainer.{switch} on and off gives parameters "
            f"{worst:.2e} apart (> {PARAMETER_TOLERANCE:g}): remove the declaration or fix the hook it breaks",
        )
    return Outcome(check, "PASS", f"trainer.{switch} on and off train the same parameters (within {worst:.1e})")


def check_declarations(overrides: list[str], workdir: Path) -> list[Outcome]:
    """``closed_form_safe`` on the CPU; ``graph_safe`` on a CUDA device, where there is one."""
    cpu = compose_checked(overrides, workdir / "declarations")
    outcomes = [_compare_switch(cpu, "closed_form_safe", "closed_form_safe", "closed_form", lambda: None)]
    cuda = compose_checked([*overrides, "device=cuda"], workdir / "declarations") if torch.cuda.is_available() else cpu

    def cuda_needed() -> str | None:
        return None if torch.cuda.is_available() else "needs a CUDA device to record graphs (run it on one)"

    outcomes.append(_compare_switch(cuda, "graph_safe", "graph_safe", "cuda_graphs", cuda_needed))
    return outcomes


def check_population(overrides: list[str], workdir: Path) -> Outcome:
    """A class that declares ``population_safe``: two seeds as one population give each seed its solo run's R,
    bit for bit (the tiny protocol runs on one thread, where the population promises that)."""
    from clbench import runner
    from clbench.population.coordinator import run_members

    cfg = compose_checked(overrides, workdir / "population")
    strategy = instantiate(cfg.strategy)
    if not strategy.declares("population_safe"):
        return Outcome(
            "population_safe", "SKIP", f"{type(strategy).__name__} does not declare population_safe (runs alone)"
        )
    configs = [
        compose_checked([*overrides, f"seed={seed}"], workdir / where) for where in ("solo", "pop") for seed in (0, 1)
    ]
    solo = [runner.run(c) for c in configs[:2]]
    members = run_members([lambda c=c: runner.run(c) for c in configs[2:]])
    for seed, (mine, member) in enumerate(zip(solo, members, strict=True)):
        if member.raised is not None:
            return Outcome(
                "population_safe",
                "FAIL",
                f"seed {seed} failed in a population: {type(member.raised).__name__}: {member.raised}",
            )
        if member.returned["acc_matrix"] != mine["acc_matrix"]:
            return Outcome(
                "population_safe",
                "FAIL",
                f"it declares population_safe, but seed {seed} ends with another R in a population than alone: keep "
                "every run's state in the strategy object, draw nothing from global generators in hooks, or remove "
                "the declaration",
            )
    return Outcome("population_safe", "PASS", "two seeds as one population end with their solo runs' R, bit for bit")


def run_checks(overrides: list[str]) -> list[Outcome]:
    """Every check on ``strategy=<name>`` (in ``overrides``), in a temporary results folder."""
    with tempfile.TemporaryDirectory(prefix="clbench-check-") as folder:
        workdir = Path(folder)
        overrides = [*overrides, *pretrained_once(overrides, workdir)]
        outcomes = [check_resume(overrides, workdir)]
        outcomes.append(check_round_trip(compose_checked(overrides, workdir / "round_trip")))
        outcomes += check_declarations(overrides, workdir)
        outcomes.append(check_population(overrides, workdir))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run the kit on the command line's overrides; print one line per check; 0 when none fails."""
    from clbench.__main__ import _is_user_error, _root_cause

    args = sys.argv[1:] if argv is None else argv
    if not any(arg.startswith("strategy=") for arg in args) or any(a in ("-h", "--help") for a in args):
        print("usage: python -m clbench.check strategy=NAME [key=value ...]", file=sys.stderr)
        return USER_ERROR_EXIT
    register_resolvers()
    problem = check_group_choices(args)
    if problem is not None:
        print(f"clbench.check: error: {problem}", file=sys.stderr)
        return USER_ERROR_EXIT
    try:
        outcomes = run_checks(args)
    except Exception as error:
        cause = _root_cause(error)
        if not _is_user_error(cause):
            raise
        print(f"clbench.check: error: {cause}", file=sys.stderr)
        return USER_ERROR_EXIT
    for outcome in outcomes:
        print(outcome.line())
    failed = [o for o in outcomes if o.verdict == "FAIL"]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks passed or did not apply; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
