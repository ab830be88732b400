"""What clbench adds to Hydra's multirun: a per-job record, a sweep index, worker counts, GPU pinning.

Scheduling itself is left to Hydra's launcher plugins (basic, joblib, submitit, Ray); clbench never runs
its own scheduler. Each job writes ``job.json`` into its Hydra output folder; when the sweep ends, the
:class:`SweepIndex` callback gathers them into ``<sweep dir>/index.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from clbench.results import atomic_write_bytes, json_ready


@dataclass(frozen=True)
class JobContext:
    """Where a run sits in a sweep (``multirun`` False for a single run or a run outside Hydra)."""

    multirun: bool = False
    job_num: int = 0
    output_dir: Path | None = None
    sweep_dir: Path | None = None
    overrides: tuple[str, ...] = ()


def job_context() -> JobContext:
    """The current Hydra job's place in its sweep, or the default context outside a Hydra app."""
    if not HydraConfig.initialized():
        return JobContext()
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return JobContext(
        multirun=multirun,
        job_num=int(hydra_cfg.job.get("num", 0) or 0),
        output_dir=Path(hydra_cfg.runtime.output_dir),
        sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
        overrides=tuple(hydra_cfg.overrides.task),
    )


def default_workers() -> int:
    """Parallel jobs for a local launcher: one per GPU where there are GPUs, else one per CPU core."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return max(1, os.cpu_count() or 1)


def register_resolvers() -> None:
    """``${clbench_workers:}`` for launcher presets (registered once, before Hydra composes)."""
    if not OmegaConf.has_resolver("clbench_workers"):
        OmegaConf.register_new_resolver("clbench_workers", default_workers)


def write_job_record(context: JobContext, record: dict[str, Any]) -> None:
    """Write this job's ``job.json`` (status, result path, overrides) into its Hydra output folder, with the
    config files that changed while the sweep ran (:class:`SweepIndex`), if any."""
    if context.output_dir is None:
        return
    payload = {"job_num": context.job_num, "overrides": list(context.overrides), **record}
    changed = read_config_changes(context.output_dir)
    if changed:
        payload["config_files_changed"] = changed
    _write_job_json(context.output_dir, payload)


def _write_job_json(output_dir: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(output_dir / "job.json", json.dumps(json_ready(payload), indent=2).encode())


def write_lost_job(config: DictConfig, overrides: list[str], error: str) -> None:
    """A ``failed`` job.json for a job whose process ended before the job returned (a launcher's worker killed
    or out of memory), in the job's own folder, unless the job wrote one itself: without it a job that never
    started would have no folder and go unlisted, and the sweep would exit 0."""
    output_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    if (output_dir / "job.json").exists():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_job_json(
        output_dir, {"job_num": config.hydra.job.num, "overrides": overrides, "status": "failed", "error": error}
    )


UNSUCCESSFUL = ("failed", "missing", "unreadable")  # statuses that make a sweep exit non-zero ("skipped" does not)
_last_jobs: list[dict[str, Any]] = []  # the jobs of the sweep that just ended in this process (read by the entry point)


def unsuccessful_jobs() -> int:
    """How many jobs of the sweep that ended in this process failed, left no record, or left an unreadable one."""
    return sum(job.get("status") in UNSUCCESSFUL for job in _last_jobs)


def every_job_refused() -> bool:
    """Whether every job of the sweep that just ended failed on bad input (a config value, missing data, an
    unsupported scenario: ``user_error`` in its job.json), so that none of them trained."""
    return bool(_last_jobs) and all(job.get("status") == "failed" and job.get("user_error") for job in _last_jobs)


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of a sweep folder, in job order: its ``job.json``, or a ``missing`` record for a job folder whose
    job ended before writing one (killed, out of memory), so that no job of a sweep goes unlisted."""
    jobs = []
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()] if sweep_dir.is_dir() else []
    for folder in sorted(folders, key=lambda p: int(p.name)):
        path = folder / "job.json"
        if not path.exists():
            jobs.append({"job_num": int(folder.name), "job_dir": str(folder), "status": "missing"})
            continue
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            jobs.append({"job_num": int(folder.name), "job_dir": str(folder), "status": "unreadable"})
    return jobs


CONFIG_SNAPSHOT = "config_files.json"  # in the sweep folder: each config file's digest when the sweep started
CONFIG_CHANGES = "config_changed.json"  # in a job's folder: the config files that differed when it started


def config_file_digests(folders: list[str]) -> dict[str, str]:
    """The sha256 of every YAML file under ``folders`` (a sweep's file config sources), by path."""
    digests = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
    return digests


def changed_files(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Files added, removed or edited between two :func:`config_file_digests`."""
    return sorted(path for path in before.keys() | now.keys() if before.get(path) != now.get(path))


def read_config_changes(output_dir: Path) -> list[str]:
    """The config files a job found changed when it started (written by :class:`SweepIndex`), or none."""
    try:
        changed = json.loads((output_dir / CONFIG_CHANGES).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [str(path) for path in changed] if isinstance(changed, list) else []


class SweepIndex(Callback):
    """Hydra callback: at the end of a multirun, write ``index.json`` listing every job and its result.

    It also guards a sweep against edits of its config files. Hydra composes each job's config from the files
    when the job starts, not when the sweep does, so a file edited while a long sweep runs (a strategy's YAML
    changed for the next experiment) silently reaches the jobs that start after it. The digests of every config
    file are taken when the sweep starts (``config_files.json`` in the sweep folder); a job that finds them
    changed says so in one line, and its ``job.json`` and the index list the files (``config_files_changed``),
    which the report prints. Such a job still runs: its result.json holds the config it really used."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sources = [str(s.path) for s in config.hydra.runtime.config_sources if s.schema == "file"]
        snapshot = {"sources": sources, "digests": config_file_digests(sources)}
        self.snapshot = snapshot  # in-process launchers (and pickled ones) read it here, others from the file
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(sweep_dir / CONFIG_SNAPSHOT, json.dumps(snapshot, indent=1).encode())

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        snapshot = getattr(self, "snapshot", None)
        if snapshot is None:
            try:
                snapshot = json.loads((Path(str(config.hydra.sweep.dir)) / CONFIG_SNAPSHOT).read_text())
            except (OSError, json.JSONDecodeError):
                return
        changed = changed_files(snapshot["digests"], config_file_digests(snapshot["sources"]))
        if not changed:
            return
        output_dir = Path(str(config.hydra.runtime.output_dir))
        atomic_write_bytes(output_dir / CONFIG_CHANGES, json.dumps(changed).encode())
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        print(
            f"clbench: job {config.hydra.job.get('num')}: config files changed since the sweep started ({shown}): "
            "this job composed the edited files; keep them unchanged while a sweep runs",
            file=sys.stderr,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = read_jobs(sweep_dir)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.get("status", "unknown")] = counts.get(job.get("status", "unknown"), 0) + 1
        _last_jobs[:] = jobs
        index = {"sweep_dir": str(sweep_dir), "jobs": jobs, "counts": counts}
        atomic_write_bytes(sweep_dir / "index.json", json.dumps(json_ready(index), indent=2).encode())
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"clbench: sweep finished ({summary}); index: {sweep_dir / 'index.json'}")
        for job in jobs:
            if job.get("status") in UNSUCCESSFUL:
                overrides = " ".join(job.get("overrides", [])) or job.get("job_dir", "")
                print(f"clbench: job {job.get('job_num')} {job['status']}: {overrides}", file=sys.stderr)
