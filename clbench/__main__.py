"""``python -m clbench``: one run; ``python -m clbench -m key=a,b ...``: a Hydra multirun sweep.

Bad input ends with one line on stderr that names the fix and a non-zero exit (``HYDRA_FULL_ERROR=1``
shows the traceback). In a multirun a failing job is recorded as failed and the other jobs still run.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from clbench.sweeps import job_context, register_resolvers, unsuccessful_jobs, write_job_record

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CHECKED_GROUPS = ("stream", "model", "strategy", "trainer", "logger", "experiment", "protocol")
USER_ERROR_EXIT = 2


def _root_cause(error: BaseException) -> BaseException:
    """Hydra wraps errors raised while building objects; the user needs the original one."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _is_user_error(error: BaseException) -> bool:
    from clbench.data import DatasetMissingError
    from clbench.runner import ConfigError
    from clbench.strategy import UnsupportedScenarioError
    from clbench.trainer import NonFiniteLossError

    return isinstance(
        error, ConfigError | DatasetMissingError | UnsupportedScenarioError | NonFiniteLossError | ValueError
    )


def _is_skip(error: BaseException) -> bool:
    """A pair that cannot run by design (the strategy does not support the protocol's scenario): a sweep records
    it as skipped; a single run still stops with the one-line error."""
    from clbench.strategy import UnsupportedScenarioError

    return isinstance(error, UnsupportedScenarioError)


def _config_dirs(argv: list[str]) -> list[Path] | None:
    """The folders Hydra will search for config groups, or None when the search path is customised."""
    dirs = [Path(CONFIG_DIR)]
    for k, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and k + 1 < len(argv):
            dirs.append(Path(argv[k + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.startswith(("hydra.searchpath", "--config-path", "-cp", "+hydra.searchpath")):
            return None
    return dirs


def check_group_choices(argv: list[str]) -> str | None:
    """One line naming the known options when ``group=name`` names no config file, else None."""
    dirs = _config_dirs(argv)
    if dirs is None:
        return None
    for arg in argv:
        group, sep, value = arg.partition("=")
        if not sep or group not in CHECKED_GROUPS or "(" in value or value in ("null", ""):
            continue
        known = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
        for name in value.split(","):
            if name and name not in known:
                return f"unknown {group} {name!r}: known {group} configs are {', '.join(known)}"
    return None


def _fail(message: str) -> None:
    print(f"clbench: error: {message}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Compose the config, run it, and return ACC (what a Hydra sweeper optimises)."""
    from clbench.runner import run

    context = job_context()
    try:
        result = run(cfg)
    except Exception as error:  # every failure is reported, and isolated in a sweep
        cause = _root_cause(error)
        if context.multirun and _is_skip(cause):
            # a comparison sweep over every strategy meets pairs that cannot run (a scenario the strategy does not
            # support): recorded with the reason, not counted as a failure, and the sweep goes on
            write_job_record(context, {"status": "skipped", "reason": str(cause)})
            print(f"clbench: skipped: {cause}", file=sys.stderr)
            return None
        message = f"{type(cause).__name__}: {cause}" if not _is_user_error(cause) else str(cause)
        write_job_record(context, {"status": "failed", "error": message})
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not context.multirun:
            raise
        _fail(message)
        if not _is_user_error(cause):
            traceback.print_exception(cause, file=sys.stderr)
        if context.multirun:
            return None
        sys.exit(USER_ERROR_EXIT if _is_user_error(cause) else 1)
    write_job_record(
        context,
        {
            "status": result.get("status"),
            "result": result.get("paths", {}).get("result"),
            "metrics": result.get("metrics"),
        },
    )
    return result.get("metrics", {}).get("acc")


def main() -> None:
    """The process entry point (``python -m clbench``): check group names first (one clear line), then hand
    over to Hydra, then freeze the heap for a quick exit. In-process callers (a notebook, a script) use
    ``clbench.runner.run`` on a composed config instead, whose heap stays collectable."""
    register_resolvers()
    problem = check_group_choices(sys.argv[1:])
    if problem is not None:
        _fail(problem)
        sys.exit(USER_ERROR_EXIT)
    _hydra_main()
    # Everything is written. The interpreter's last garbage collection would now walk every object torch
    # made at import (~200k): about a third of a second, a tenth of a short run. Frozen objects are skipped;
    # nothing else of the shutdown changes (exit handlers and flushes still run).
    gc.freeze()
    if unsuccessful_jobs():  # a sweep whose jobs failed (or vanished) says so in its exit code; skipped ones do not
        sys.exit(1)


if __name__ == "__main__":
    main()
