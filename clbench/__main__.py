"""``python -m clbench``: one run; ``python -m clbench -m key=a,b ...``: a Hydra multirun sweep.

Bad input ends with one line on stderr that names the fix and exit code 2, before any training
(``HYDRA_FULL_ERROR=1`` shows the traceback): group names are checked here, Hydra's own composition errors
(a misspelled key) are turned into one line with the nearest valid key, and every value is checked against
:mod:`clbench.schema` before the run builds anything. Ctrl-C is one line and exit code 130; the same
command resumes. In a multirun a failing job is recorded as failed and the other jobs still run.

Config groups are found in clbench's ``conf/``, then in ``./conf`` of the current folder, the folders in
``CLBENCH_CONFIG_PATH`` and the packages that declare a ``clbench.configs`` entry point, so a user's own
strategy YAML needs no ``--config-dir``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import traceback
from importlib import metadata
from pathlib import Path

import hydra
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from clbench.sweeps import every_job_refused, job_context, register_resolvers, unsuccessful_jobs, write_job_record

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CHECKED_GROUPS = ("stream", "model", "strategy", "trainer", "logger", "experiment", "protocol")
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
CONFIG_PATH_VARIABLE = "CLBENCH_CONFIG_PATH"
ENTRY_POINT_GROUP = "clbench.configs"  # an entry point's value names a package whose folder holds config groups
# the traceback is the user's to ask for; clbench sets HYDRA_FULL_ERROR itself so Hydra's errors reach main()
_SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


def _root_cause(error: BaseException) -> BaseException:
    """Hydra wraps errors raised while building objects; the user needs the original one."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _is_user_error(error: BaseException) -> bool:
    from clbench.data import DatasetMissingError
    from clbench.lock import RunLockedError
    from clbench.runner import ConfigError
    from clbench.strategy import UnsupportedScenarioError
    from clbench.trainer import NonFiniteLossError

    return isinstance(
        error,
        ConfigError | DatasetMissingError | UnsupportedScenarioError | NonFiniteLossError | RunLockedError | ValueError,
    )


def _is_skip(error: BaseException) -> bool:
    """A pair that cannot run by design (the strategy does not support the protocol's scenario): a sweep records
    it as skipped; a single run still stops with the one-line error."""
    from clbench.strategy import UnsupportedScenarioError

    return isinstance(error, UnsupportedScenarioError)


def user_config_dirs(cwd: Path | None = None) -> list[Path]:
    """Folders of a user's own config groups, after clbench's: ``./conf`` of the current folder, each folder
    in ``CLBENCH_CONFIG_PATH`` (``os.pathsep``-separated), and each installed package that declares a
    ``clbench.configs`` entry point (``my_package = my_package.conf`` in its metadata)."""
    own = Path(CONFIG_DIR).resolve()
    found: list[Path] = []
    local = (cwd or Path.cwd()) / "conf"
    if local.is_dir():
        found.append(local)
    found += [Path(p) for p in os.environ.get(CONFIG_PATH_VARIABLE, "").split(os.pathsep) if p]
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        spec = importlib.util.find_spec(entry.value.split(":")[0])
        if spec is not None and spec.submodule_search_locations:
            found.append(Path(next(iter(spec.submodule_search_locations))))
    unique: dict[Path, None] = {}
    for folder in found:
        resolved = folder.resolve()
        if resolved != own and resolved.is_dir():
            unique.setdefault(resolved, None)
    return list(unique)


def with_user_search_path(argv: list[str], dirs: list[Path]) -> list[str]:
    """``argv`` plus a ``hydra.searchpath`` override naming ``dirs``, unless the user set one."""
    if not dirs or any(arg.lstrip("+").startswith("hydra.searchpath") for arg in argv):
        return argv
    return [*argv, "hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"]


def _config_dirs(argv: list[str]) -> list[Path] | None:
    """The folders Hydra will search for config groups, or None when the search path is customised."""
    dirs = [Path(CONFIG_DIR), *user_config_dirs()]
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
    """Compose the config, run it, and return ACC (what a Hydra sweeper optimises); the run checks the
    config first (:func:`clbench.schema.check_config`)."""
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
        write_job_record(context, {"status": "failed", "error": message, "user_error": _is_user_error(cause)})
        if _SHOW_TRACEBACK and not context.multirun:
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


def composition_error_line(error: BaseException) -> str:
    """One line for an error Hydra raised while composing the config: a misspelled key gets the nearest
    valid one; anything else, the first line of Hydra's own message."""
    from clbench.schema import flat_keys, unknown_key_message

    cause = error.__cause__
    key, parent = getattr(cause, "full_key", None), getattr(cause, "parent_node", None)
    if key and parent is not None and "not in struct" in str(cause):
        return unknown_key_message(str(key), flat_keys(parent._get_root()))
    first = str(error).strip().splitlines()
    return first[0] if first else type(error).__name__


def _plain_value(argv: list[str], key: str) -> str | None:
    """The value ``key=...`` (or ``+key=`` / ``++key=``) gets on the command line, when it is one value."""
    for arg in argv:
        name, sep, value = arg.lstrip("+").partition("=")
        if sep and name == key and "," not in value and "(" not in value:
            return value
    return None


def usage() -> str:
    """``python -m clbench --help``: clbench's own usage (Hydra's is ``--hydra-help``)."""
    dirs = [Path(CONFIG_DIR), *user_config_dirs()]
    groups = sorted({p.name for d in dirs for p in d.iterdir() if p.is_dir() and p.name != "hydra"})
    lines = [
        "usage: python -m clbench [group=name ...] [key=value ...]        one run",
        "       python -m clbench -m [group=a,b ...] [key=x,y ...]       a sweep (Hydra multirun)",
        "",
        "Trains a strategy task after task, fills the accuracy matrix R, prints ACC / BWT / FWT / forgetting",
        "and writes <results_dir>/<stream>/<strategy>/<run id>/result.json. The same command resumes an",
        "interrupted run and skips a completed one (resume=false starts afresh).",
        "",
        "config groups (group=name):",
    ]
    for group in groups:
        names = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
        if names:
            lines.append(f"  {group:<10} {', '.join(names)}")
    lines += [
        "",
        "main overrides:",
        "  stream.num_tasks=N  stream.scenario=task|domain|class  stream.root=PATH  stream.download=true",
        "  trainer.epochs=N  trainer.batch_size=N  trainer.lr=F  trainer.optimizer=sgd|adam|adamw",
        "  seed=N  device=auto|cpu|cuda  deterministic=true  cpu_threads=N  results_dir=PATH",
        "  logger=wandb|none  resume=true|false  verbose=false  plots=false  strategy.<its key>=VALUE",
        "",
        "examples:",
        "  python -m clbench strategy=joint stream=split_digits",
        "  python -m clbench protocol=gpm_pfmnist strategy=gpm",
        "  python -m clbench -m strategy=finetune,joint,independent seed=0,1,2",
        "  python -m clbench --cfg job                      print the composed config, run nothing",
        "  python -m clbench.report results/                tables and plots across runs",
        "  python -m clbench.check strategy=NAME            conformance checks for your own strategy",
        "",
        "Your own configs: ./conf/<group>/<name>.yaml, folders in CLBENCH_CONFIG_PATH, or packages declaring a",
        "clbench.configs entry point. Bad input stops before training with one line and exit code 2",
        "(HYDRA_FULL_ERROR=1 shows the traceback); Ctrl-C exits with 130. Hydra's own options: --hydra-help.",
    ]
    return "\n".join(lines)


def version() -> str:
    try:
        return metadata.version("clbench")
    except metadata.PackageNotFoundError:
        from clbench import __version__

        return __version__


def main() -> None:
    """The process entry point (``python -m clbench``): answer ``--help`` / ``--version``, check group names
    and ``results_dir`` (one clear line each), add the user's config folders to Hydra's search path, hand
    over to Hydra (whose composition errors come back here as one line), then freeze the heap for a quick
    exit. In-process callers (a notebook, a script) use ``clbench.runner.run`` on a composed config instead,
    whose heap stays collectable."""
    from clbench.schema import ConfigError, check_results_dir

    argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return
    if "--version" in argv:
        print(f"clbench {version()}")
        return
    register_resolvers()
    problem = check_group_choices(argv)
    results_dir = _plain_value(argv, "results_dir")
    if problem is None and results_dir is not None:
        try:
            check_results_dir(results_dir)
        except ConfigError as error:
            problem = str(error)
    if problem is not None:
        _fail(problem)
        sys.exit(USER_ERROR_EXIT)
    sys.argv = [sys.argv[0], *with_user_search_path(argv, user_config_dirs())]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors here instead of printing them
    try:
        _hydra_main()
    except KeyboardInterrupt as interrupt:
        _interrupted(interrupt)
    except (HydraException, OmegaConfBaseException) as error:
        if _SHOW_TRACEBACK:
            raise
        _fail(composition_error_line(error))
        sys.exit(USER_ERROR_EXIT)
    finally:
        if not _SHOW_TRACEBACK:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    # Everything is written. The interpreter's last garbage collection would now walk every object torch
    # made at import (~200k): about a third of a second, a tenth of a short run. Frozen objects are skipped;
    # nothing else of the shutdown changes (exit handlers and flushes still run).
    gc.freeze()
    if unsuccessful_jobs():  # a sweep whose jobs failed (or vanished) says so in its exit code; skipped ones do not
        # every job refused on bad input before training (cpu_threads=0 for all): bad input's exit code, as one run
        sys.exit(USER_ERROR_EXIT if every_job_refused() else 1)


def _interrupted(interrupt: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying where, and the shell's exit code for it."""
    where = str(interrupt) or "interrupted; rerun the same command to resume"
    print(f"clbench: {where}", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
