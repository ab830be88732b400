"""``python -m clbench.report <dir>...``: compare runs as tables with confidence intervals, paired tests against
a baseline, ranks and cost, plus plots.

A leaderboard for one protocol, as committed in ``benchmarks/results/``::

    python -m clbench -m protocol=<protocol> 'strategy=glob(*)' seed=0,1,2 results_dir=results/<protocol>
    python -m clbench.report results/<protocol> --baseline finetune --format md \\
        > benchmarks/results/leaderboard_<protocol>.md

What it does, in order:

1. Reads every ``result.json`` under the folders and every sweep ``index.json`` there
   (``<results_dir>/_hydra/sweeps/*/index.json``); failed, missing, unreadable and skipped jobs are listed,
   never averaged in (``--strict``: exit 1 when any failed or is missing). A folder that does not exist is an
   error (exit 2).
2. Groups runs by identity: every config value that changes results (what the run id hashes: stream, model,
   trainer schedule, strategy hyper-parameters; a model checkpoint by what it held when the run ran, as the run
   recorded it, not by its path), never by stream x strategy alone; ``--by KEY`` picks the label columns (any
   dotted config key), ``--ignore KEY`` pools over a key on purpose. Keys that tell apart rows with the same
   label become columns. A seed found twice in a group counts once (the newest run).
3. Computes, from the reference runs found in the folders whatever order they ran in, intransigence (a joint
   run: a*_k = R_joint[k][k], Chaudhry et al. 2018), its single-task variant and the L2M expert metrics (an
   independent run).
4. Per group and metric: mean, 95 % interval (Student t; ``--ci bootstrap``), n. Against ``--baseline``:
   the paired difference over matching seeds, p-values of the paired t, Wilcoxon and exact permutation tests
   (:mod:`clbench.stats`), the one of ``--test`` Holm-corrected across the table, and a mark where significant.
   Per protocol, each strategy's average rank over seeds. Cost: training and evaluation time, training FLOPs,
   peak memory, bytes kept between tasks.
5. ``--matrix taw``: class-scenario runs are summarised from R with the task given (``acc_matrix_taw``,
   task-aware, as FACIL's TAw) instead of the task-agnostic R (TAg, the default); runs of other scenarios have
   one matrix and keep it.
6. ``--format csv|json``: one column per statistic, numbers only (notes on stderr); ``md|latex|html``: a
   table to publish with its legend.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from clbench import stats
from clbench.l2m import summarize_l2m
from clbench.metrics import intransigence, joint_reference
from clbench.results import (
    experiment_identity,
    pretrain_cache_identity,
    recorded_checkpoint_identity,
    recorded_source_digest,
)

DEFAULT_METRICS = ("acc", "bwt", "fwt", "forgetting")
OPTIONAL_METRICS = (
    "intransigence",
    "intransigence_single_task",
    "acc_final",
    "acc_mean_over_time",
    "accumulation_gain",
    "control_acc_final",  # runs with a control set (clbench/control.py): its final accuracy and change
    "control_change",
)
LOWER_IS_BETTER = ("forgetting", "intransigence", "intransigence_single_task")
LABELS = {
    "acc": "ACC",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting": "Forgetting",
    "intransigence": "Intransigence",
    "intransigence_single_task": "Intransigence (single-task)",
    "control_acc_final": "Control acc",
    "control_change": "Control change",
}
L2M_METRICS = (
    "l2m_performance_maintenance",
    "l2m_forward_transfer_contrast",
    "l2m_backward_transfer_contrast",
    "l2m_relative_performance",
    "l2m_sample_efficiency",
)
L2M_REFERENCE_METRICS = (
    "l2m_relative_final_performance",
    "l2m_relative_performance",
    "l2m_sample_efficiency",
    "l2m_sample_efficiency_saturation",
    "l2m_sample_efficiency_experience",
)
COST_COLUMNS = ("train_s", "eval_s", "train_flops", "peak_memory_bytes", "kept_bytes")
FORMATS = ("markdown", "md", "latex", "csv", "json", "html")
BASE_LABELS = ("protocol", "stream", "scenario", "strategy")
UNSUCCESSFUL = ("failed", "missing", "unreadable", "running", "unknown")
PUBLISHED = Path(__file__).resolve().parent / "reference" / "published.csv"
LEADERBOARD = (
    "python -m clbench -m protocol=<protocol> 'strategy=glob(*)' seed=0,1,2 results_dir=results/<protocol>, then "
    "python -m clbench.report results/<protocol> --baseline finetune --format md "
    "> benchmarks/results/leaderboard_<protocol>.md"
)


class ReportError(ValueError):
    """Bad report input (a folder that does not exist, an unknown key): one line, exit code 2."""


@dataclass
class Run:
    """One completed run as the report sees it: every config value by its dotted key, its identity keys, seed,
    scalar metrics, cost, and where it came from."""

    fields: dict[str, Any]
    identity_keys: frozenset[str]
    seed: Any
    metrics: dict[str, float]
    cost: dict[str, float]
    source: str | None
    finished: str
    path: str
    result: dict[str, Any]


@dataclass
class Collection:
    """Runs found under the report's folders, split by what can enter a table."""

    completed: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. jobs that composed config files edited during their sweep

    def unsuccessful(self) -> list[dict[str, str]]:
        """Failed, missing, unreadable or unfinished runs and jobs (skipped pairs are not among them)."""
        return [p for p in self.problems if p["status"] != "skipped"]


@dataclass
class Options:
    """What the command line asks of :func:`summarize`."""

    by: Sequence[str] | None = None
    ignore: Sequence[str] = ()
    metrics: Sequence[str] | None = None
    baseline: str | None = None
    compare: Sequence[str] = ("acc",)
    test: str = "t"
    ci: str = "t"
    level: float = 0.95
    alpha: float = 0.05


@dataclass
class Report:
    """The numeric table (one row per group), its label columns, the metrics in it, and notes for stderr."""

    table: pd.DataFrame
    labels: list[str]
    metrics: list[str]
    options: Options
    notes: list[str] = field(default_factory=list)
    groups: list[list[Run]] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------------------------
def _job_result(index_path: Path, job: dict[str, Any]) -> Path | None:
    """Where a sweep job's result file is now: the recorded path (relative ones were relative to the folder the
    sweep ran in), else the same ``<stream>/<strategy>/<run id>/result.json`` under the results folder that holds
    the sweep (``<results_dir>/_hydra/sweeps/<time>/index.json``), so a moved or copied results folder still
    matches. None when neither exists."""
    recorded = Path(job["result"])
    candidates = [recorded]
    if len(index_path.parents) > 3 and len(recorded.parts) >= 4:
        candidates.append(index_path.parents[3] / Path(*recorded.parts[-4:]))
    return next((path for path in candidates if path.exists()), None)


def _job_problem(index_path: Path, job: dict[str, Any]) -> dict[str, str] | None:
    """Why a sweep job left no completed result (failed, missing, skipped, or completed but its result file is
    gone); None when its result is there."""
    status = str(job.get("status", "unknown"))
    where = " ".join(job.get("overrides", [])) or job.get("job_dir") or f"job {job.get('job_num')}"
    where = f"{index_path.parent.name} job {job.get('job_num', '?')}: {where}"
    if status == "completed":
        if job.get("result") and _job_result(index_path, job) is None:
            return {"path": where, "status": "missing", "reason": f"{job['result']} is gone"}
        return None
    reason = job.get("error") or job.get("reason") or "no result.json was written"
    return {"path": where, "status": status, "reason": str(reason)}


def _sweep_problems(indexes: Sequence[Path]) -> list[dict[str, str]]:
    """The jobs of the sweeps' ``index.json`` files that left no completed result. A job launched again by a
    later sweep into the same results folder (the same overrides: a relaunch that resumes or reruns it) is
    judged by its latest launch only, so a failure that a relaunch repaired is not listed."""
    problems: list[dict[str, str]] = []
    latest: dict[tuple, tuple[Path, dict[str, Any]]] = {}
    for index_path in sorted(indexes, key=lambda path: (path.parent.name, str(path))):  # sweep folders are times
        try:
            jobs = json.loads(index_path.read_text()).get("jobs", [])
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            problems.append({"path": str(index_path), "status": "unreadable", "reason": str(error).splitlines()[0]})
            continue
        root = str(index_path.parents[3]) if len(index_path.parents) > 3 else str(index_path.parent)
        for job in jobs:
            overrides = job.get("overrides") or [f"{index_path}#{job.get('job_num')}"]
            latest[(root, tuple(sorted(overrides)))] = (index_path, job)
    for index_path, job in latest.values():
        problem = _job_problem(index_path, job)
        if problem is not None:
            problems.append(problem)
    return problems


def collect(folders: Sequence[Path]) -> Collection:
    """Read every result under ``folders`` and every sweep index there; anything not completed goes to
    ``problems`` with a reason. A folder that does not exist raises :class:`ReportError`."""
    found = Collection()
    missing = [str(folder) for folder in folders if not Path(folder).is_dir()]
    if missing:
        raise ReportError(f"no such folder: {', '.join(missing)} (pass the results_dir the runs wrote to)")
    paths: set[Path] = set()
    for folder in folders:
        paths |= {p.resolve() for p in Path(folder).rglob("result.json")}
        indexes = sorted(Path(folder).rglob("index.json"))
        found.problems += _sweep_problems(indexes)
        for index in indexes:
            try:
                jobs = json.loads(index.read_text()).get("jobs", [])
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            found_paths = (_job_result(index, job) for job in jobs if job.get("result"))
            paths |= {path.resolve() for path in found_paths if path is not None}
            for job in jobs:
                if job.get("config_files_changed"):
                    found.notes.append(
                        f"{index.parent.name} job {job.get('job_num')} ({' '.join(job.get('overrides', []))}) "
                        f"composed config files edited while its sweep ran: {', '.join(job['config_files_changed'])}"
                    )
    for path in sorted(paths):
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            found.problems.append({"path": str(path), "status": "unreadable", "reason": str(error).splitlines()[0]})
            continue
        status = result.get("status", "unknown")
        if status != "completed" or not isinstance(result.get("metrics"), dict):
            reason = result.get("error") or f"{result.get('tasks_completed', '?')} tasks finished"
            found.problems.append({"path": str(path), "status": str(status), "reason": str(reason)})
            continue
        result["_path"] = str(path)
        result.setdefault("_mtime", path.stat().st_mtime)
        found.completed.append(result)
    return found


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted key: value}``; lists become their JSON text, so every value is hashable."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node)}
    return {prefix[:-1]: node} if prefix else {}


def _cost(result: dict[str, Any]) -> dict[str, float]:
    timings, recorded = result.get("timings") or {}, result.get("cost") or {}
    cost: dict[str, float] = {}
    if timings.get("fit_s"):
        cost["train_s"] = float(sum(timings["fit_s"]))
    if timings.get("eval_s"):
        cost["eval_s"] = float(sum(timings["eval_s"]) + (timings.get("random_init_eval_s") or 0.0))
    for key in ("train_flops", "peak_memory_bytes", "kept_bytes"):
        if isinstance(recorded.get(key), int | float):
            cost[key] = float(recorded[key])
    return cost


MATRICES = ("tag", "taw")


def task_aware_view(result: dict[str, Any]) -> dict[str, Any]:
    """A class-scenario result as read with the task given: its TAw matrix and metrics in place of the
    task-agnostic ones (the runner stores both); a result without a TAw matrix is returned unchanged."""
    if not isinstance(result.get("metrics_taw"), dict):
        return result
    view = dict(result)
    view["metrics"] = dict(result["metrics_taw"])
    for key in ("acc_matrix", "random_init_acc"):
        view[key] = result.get(f"{key}_taw", result.get(key))
    return view


def to_run(result: dict[str, Any]) -> Run:
    """The report's view of one completed result. ``model.checkpoint`` stands for what the file held when the run
    ran (the identity its runner recorded: ``sha256:<hex>`` or ``pretrain:<hash>``), never for its path: weights
    saved into the same file between two runs make two experiments, and the file is not read here (it may hold
    other weights now, or be gone). A result written before clbench recorded it keeps its path (a pretraining
    cache file its ``pretrain:<hash>``, as in its run id, so it still pairs with later runs of that cache)."""
    config = result.get("config") or {}
    recorded = recorded_checkpoint_identity(result)
    identity = experiment_identity(config, identify=lambda path: recorded or pretrain_cache_identity(path))
    identity.pop("seed", None)
    fields = flatten(config)
    model = identity.get("model")
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
        fields["model.checkpoint"] = model["checkpoint"]
    fields.update(
        protocol=result.get("protocol") or config.get("protocol_name") or "",
        stream=result.get("stream"),
        scenario=result.get("scenario"),
        strategy=result.get("strategy"),
        seed=result.get("seed"),
        model=str((config.get("model") or {}).get("_target_", "")).rsplit(".", 1)[-1],
    )
    metrics = {
        k: float(v) for k, v in result["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    # keys that only repeat the seed (stream.seed: ${seed}) are the seed, not part of what is compared
    keys = {
        k for k in flatten(identity) if not (k.rsplit(".", 1)[-1] == "seed" and fields.get(k) == result.get("seed"))
    }
    return Run(
        fields=fields,
        identity_keys=frozenset(keys),
        seed=result.get("seed"),
        metrics=metrics,
        cost=_cost(result),
        source=recorded_source_digest(result),
        finished=str(result.get("finished_at") or result.get("_mtime") or ""),
        path=str(result.get("_path", "")),
        result=result,
    )


def runs_frame(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per completed result: its label fields, seed, task order and every scalar metric (for scripts
    that tabulate runs themselves, e.g. ``benchmarks/task_order_robustness.py``)."""
    rows = []
    for run in map(to_run, results):
        row = {key: run.fields.get(key) for key in (*BASE_LABELS, "model", "seed", "stream.order_seed")}
        rows.append({**row, **run.metrics, "path": run.path})
    return pd.DataFrame(rows)


# -- post-hoc references ---------------------------------------------------------------------------------
def _reference_key(run: Run) -> tuple:
    """What a reference run must share with a run: the stream (data paths aside), the model and the seed."""
    return (
        tuple(
            sorted(
                (k, v) for k, v in run.fields.items() if k.startswith(("stream.", "model.")) and k in run.identity_keys
            )
        ),
        run.seed,
    )


def _trainer(run: Run) -> tuple:
    return tuple(sorted((k, v) for k, v in run.fields.items() if k.startswith("trainer.") and k in run.identity_keys))


def _pick(candidates: list[Run], run: Run) -> Run | None:
    """The reference among ``candidates``: one with the run's own trainer schedule if any, the newest first."""
    if not candidates:
        return None
    same = [c for c in candidates if _trainer(c) == _trainer(run)]
    return max(same or candidates, key=lambda c: c.finished)


def add_reference_metrics(runs: Sequence[Run]) -> list[str]:
    """Intransigence against a joint run (a*_k = R_joint[k][k], Chaudhry et al. 2018), its single-task variant
    and the L2M expert metrics against an independent run, for every run whose reference is among ``runs``,
    whatever order they ran in. A run without a reference here keeps what its runner computed. Returns notes."""
    by_key: dict[str, dict[tuple, list[Run]]] = {"joint": {}, "independent": {}}
    for run in runs:
        if run.fields.get("strategy") in by_key:
            by_key[run.fields["strategy"]].setdefault(_reference_key(run), []).append(run)
    counts = {"joint": 0, "independent": 0}
    for run in runs:
        matrix = np.asarray(run.result.get("acc_matrix", []), dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
            continue
        if "joint_reference_acc" not in run.result and "intransigence" in run.metrics:
            # written before clbench followed Chaudhry et al.: that figure was against single-task experts
            run.metrics["intransigence_single_task"] = run.metrics.pop("intransigence")
        joint = _pick(by_key["joint"].get(_reference_key(run), []), run)
        if joint is not None and np.shape(joint.result["acc_matrix"]) == matrix.shape:
            run.metrics["intransigence"] = intransigence(matrix, joint_reference(joint.result["acc_matrix"]))
            counts["joint"] += 1
        expert = _pick(by_key["independent"].get(_reference_key(run), []), run)
        if expert is not None and np.shape(expert.result["acc_matrix"]) == matrix.shape:
            ste_acc = np.diag(np.asarray(expert.result["acc_matrix"], dtype=np.float64)).tolist()
            run.metrics["intransigence_single_task"] = intransigence(matrix, ste_acc)
            curves, ste_curves = _flat(run.result.get("train_acc_curves")), _flat(expert.result.get("train_acc_curves"))
            try:
                l2m = summarize_l2m(matrix, run.result.get("random_init_acc"), ste_acc, curves, ste_curves)
            except (ValueError, TypeError):
                l2m = {}
            run.metrics.update({k: float(v) for k, v in l2m.items() if k in L2M_REFERENCE_METRICS})
            counts["independent"] += 1
    return [
        f"{counts['joint']} run(s) got intransigence from a joint run and {counts['independent']} the single-task "
        "and L2M expert metrics from an independent run found in these folders"
    ]


def _flat(curves: Any) -> list[list[float]] | None:
    if not curves:
        return None
    return [[point for fit in task for point in fit] for task in curves]


# -- grouping --------------------------------------------------------------------------------------------
def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == item or key.startswith(f"{item}.") for item in ignore)


def group_runs(runs: Sequence[Run], options: Options) -> tuple[list[list[Run]], list[str], list[str]]:
    """Runs grouped by identity (every identity key but the seed, plus the label keys, minus ``--ignore``),
    a seed that appears twice in a group kept once (the newest), and the label columns: the ``--by`` keys (by
    default protocol, stream, scenario, strategy) plus every key whose values tell apart groups that share
    those labels. Returns the groups, the label columns, and notes."""
    notes: list[str] = []
    present = set().union(*(run.fields for run in runs)) if runs else set()
    by = list(options.by) if options.by else [k for k in BASE_LABELS if any(run.fields.get(k) for run in runs)]
    unknown = [
        key
        for key in [*by, *options.ignore]
        if key not in present and not any(p.startswith(f"{key}.") for p in present)
    ]
    if unknown:
        examples = ", ".join(sorted(k for k in present if k.startswith(("trainer.", "stream.")))[:6])
        raise ReportError(f"{', '.join(unknown)} is not a config key or run attribute: use e.g. {examples}")
    keys = sorted({k for run in runs for k in run.identity_keys} | set(by))
    keys = [k for k in keys if not _ignored(k, options.ignore)]
    grouped: dict[tuple, list[Run]] = {}
    for run in runs:
        grouped.setdefault(tuple(json.dumps(run.fields.get(k), sort_keys=True) for k in keys), []).append(run)
    groups = []
    for members in grouped.values():
        newest: dict[str, Run] = {}
        for run in sorted(members, key=lambda r: r.finished):
            # the same seed of the same config (ignored keys included: pooling over them is on purpose)
            seed = json.dumps([run.seed, *(run.fields.get(k) for k in sorted(run.identity_keys))])
            if seed in newest:
                notes.append(
                    f"seed {run.seed} of {_describe(run, by)} ran more than once: counted once, the newest "
                    f"({run.path}; also {newest[seed].path})"
                )
            newest[seed] = run
        groups.append(sorted(newest.values(), key=lambda r: str(r.seed)))
    # keys that tell apart groups sharing the label columns become label columns too
    extra: list[str] = []
    shared: dict[tuple, list[list[Run]]] = {}
    for members in groups:
        shared.setdefault(tuple(json.dumps(members[0].fields.get(k)) for k in by), []).append(members)
    for siblings in shared.values():
        if len(siblings) < 2:
            continue
        for key in keys:
            if key not in by and key not in extra and len({json.dumps(g[0].fields.get(key)) for g in siblings}) > 1:
                extra.append(key)
    labels = [*by, *extra]
    groups.sort(key=lambda g: tuple(str(g[0].fields.get(k)) for k in labels))
    return groups, labels, notes


def _describe(run: Run, labels: Sequence[str]) -> str:
    return " / ".join(f"{run.fields.get(k)}" for k in labels)


SETTINGS_DIR = Path(__file__).resolve().parent.parent / "conf" / "settings"


def _settings_file_keys(path: Path) -> set[str]:
    """The dotted config keys one ``conf/settings`` file sets, with those of the settings files it includes."""
    data = yaml.safe_load(path.read_text()) or {}
    keys = set(flatten({k: v for k, v in data.items() if k not in ("defaults", "strategy_settings")}))
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/settings/"):
            keys |= _settings_file_keys(SETTINGS_DIR / f"{entry.removeprefix('/settings/')}.yaml")
    return keys


@functools.cache
def settings_keys(protocol: str) -> frozenset[str]:
    """Config keys that some strategy's settings on ``protocol`` change (``conf/settings/<protocol>/*.yaml``):
    a strategy may need them on that protocol (SupSup's bias-free MLP, EWC's lr), so they do not make two
    runs of the protocol incomparable."""
    folder = SETTINGS_DIR / protocol
    if not protocol or not folder.is_dir():
        return frozenset()
    return frozenset(key for path in folder.glob("*.yaml") for key in _settings_file_keys(path))


def _context(run: Run) -> tuple:
    """What two groups must share to be compared or ranked together (one protocol): the protocol name and every
    identity key outside the strategy, the trainer schedule and the keys a strategy's settings on the protocol
    change (a protocol's per-strategy settings may change the schedule or the model's biases; where several
    baseline groups fit, the one with the same schedule is taken)."""
    protocol = str(run.fields.get("protocol") or "")
    varied = settings_keys(protocol)
    kept = sorted(
        (k, json.dumps(v))
        for k, v in run.fields.items()
        if k in run.identity_keys and not k.startswith(("strategy.", "trainer.")) and k not in varied
    )
    return ("protocol", run.fields.get("protocol")), *kept


# -- statistics ------------------------------------------------------------------------------------------
def summarize(runs: Sequence[Run], options: Options) -> Report:
    """The numeric table: per group its labels, n, per metric mean / CI / sd / n, against the baseline the paired
    difference and p-values (Holm across the table), per protocol the average rank, and the mean cost."""
    groups, labels, notes = group_runs(runs, options)
    present = {m for run in runs for m in run.metrics}
    metrics = (
        list(options.metrics) if options.metrics else [m for m in (*DEFAULT_METRICS, *OPTIONAL_METRICS) if m in present]
    )
    rows: list[dict[str, Any]] = []
    for members in groups:
        row: dict[str, Any] = {key: members[0].fields.get(key) for key in labels}
        row["n"] = len(members)
        row["seeds"] = " ".join(str(run.seed) for run in members)
        versions = {run.source for run in members}
        row["code_versions"] = len(versions)
        if len(versions) > 1:
            notes.append(
                f"{_describe(members[0], labels)} mixes {len(versions)} versions of the strategy's code "
                f"({', '.join(sorted(str(v) for v in versions))}): rerun the stale seeds"
            )
        for metric in metrics:
            interval = stats.mean_interval(
                [run.metrics.get(metric, math.nan) for run in members], options.level, options.ci
            )
            row.update(
                {
                    f"{metric}_mean": interval.mean,
                    f"{metric}_ci_low": interval.low,
                    f"{metric}_ci_high": interval.high,
                    f"{metric}_sd": interval.sd,
                    f"{metric}_n": interval.n,
                }
            )
        for key in COST_COLUMNS:
            values = [run.cost[key] for run in members if key in run.cost]
            row[key] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if options.baseline is not None and not table.empty:
        notes += _compare(table, groups, options)
    if not table.empty:
        _rank(table, groups, metrics[:1] if metrics else [])
    return Report(table, labels, metrics, options, notes, groups)


def _compare(table: pd.DataFrame, groups: list[list[Run]], options: Options) -> list[str]:
    """Paired tests of every group against the baseline group of its context, Holm-corrected over the table."""
    notes = []
    baselines = [k for k, g in enumerate(groups) if g[0].fields.get("strategy") == options.baseline]
    if not baselines:
        return [f"no {options.baseline} runs among these results: no comparison against a baseline"]
    family: list[tuple[int, str]] = []
    raw: list[float] = []
    for k, members in enumerate(groups):
        if k in baselines:
            continue
        matches = [b for b in baselines if _context(groups[b][0]) == _context(members[0])]
        exact = [b for b in matches if _trainer(groups[b][0]) == _trainer(members[0])]
        chosen = (exact or matches or [None])[0]
        if chosen is None:
            notes.append(f"{_describe(members[0], table.columns[:3])}: no {options.baseline} run on the same protocol")
            continue
        base = {json.dumps(run.seed): run for run in groups[chosen]}
        pairs = [(run, base[json.dumps(run.seed)]) for run in members if json.dumps(run.seed) in base]
        for metric in options.compare:
            pairs_m = [
                (a.metrics[metric], b.metrics[metric]) for a, b in pairs if metric in a.metrics and metric in b.metrics
            ]
            if not pairs_m:
                continue
            ours, theirs = zip(*pairs_m, strict=True)
            result = stats.paired_comparison(ours, theirs)
            table.loc[k, f"{metric}_diff_vs_baseline"] = result.mean_difference
            table.loc[k, f"{metric}_n_pairs"] = result.n
            table.loc[k, f"{metric}_p_t"] = result.p_t
            table.loc[k, f"{metric}_p_wilcoxon"] = result.p_wilcoxon
            table.loc[k, f"{metric}_p_permutation"] = result.p_permutation
            table.loc[k, f"{metric}_p_vs_baseline"] = result.p(options.test)
            family.append((k, metric))
            raw.append(result.p(options.test))
            floor = stats.smallest_attainable_p(options.test, result.n)
            if floor > options.alpha:
                notes.append(
                    f"with {result.n} paired seeds the {options.test} test cannot go below p = {floor:.3g}: "
                    f"no difference can be significant at {options.alpha} (use --test t or more seeds)"
                )
    for (k, metric), adjusted in zip(family, stats.holm(raw), strict=True):
        table.loc[k, f"{metric}_p_holm"] = adjusted
        table.loc[k, f"{metric}_significant"] = (
            float(adjusted < options.alpha) if not math.isnan(adjusted) else math.nan
        )
    return sorted(set(notes), key=notes.index)


def _rank(table: pd.DataFrame, groups: list[list[Run]], metrics: Sequence[str]) -> None:
    """Per protocol (groups sharing a context), each group's average rank over the seeds all of them ran."""
    for metric in metrics:
        contexts: dict[tuple, list[int]] = {}
        for k, members in enumerate(groups):
            contexts.setdefault(_context(members[0]), []).append(k)
        for indices in contexts.values():
            if len(indices) < 2:
                continue
            scores = {
                str(k): {json.dumps(run.seed): run.metrics[metric] for run in groups[k] if metric in run.metrics}
                for k in indices
            }
            ranks = stats.average_ranks(scores, higher_is_better=metric not in LOWER_IS_BETTER)
            for k in indices:
                table.loc[k, f"{metric}_rank_mean"] = ranks[str(k)].mean
                table.loc[k, f"{metric}_rank_sd"] = ranks[str(k)].sd


def published_table(path: Path = PUBLISHED) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def add_published(table: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Published ACC / BWT beside groups whose (protocol, strategy) the reference file lists."""
    if table.empty or "protocol" not in table or "strategy" not in table:
        return table
    merged = table.merge(
        published[["protocol", "strategy", "acc", "bwt"]].rename(
            columns={"acc": "published_acc", "bwt": "published_bwt"}
        ),
        on=["protocol", "strategy"],
        how="left",
    )
    if merged["published_acc"].notna().any():
        return merged
    return table


# -- rendering -------------------------------------------------------------------------------------------
def _number(value: float, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval_cell(row: pd.Series, metric: str) -> str:
    mean, low, high = row.get(f"{metric}_mean"), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if mean is None or math.isnan(mean):
        return "–"
    if low is None or math.isnan(low):
        return f"{mean:.2f}"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


SI_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
BINARY_PREFIXES = ((2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki"))


def _scaled(value: float | None, unit: str, prefixes: Sequence[tuple[float, str]], plain: str = ".3g") -> str:
    """``value`` with the largest prefix it reaches (3 significant digits), "–" when missing."""
    if value is None or math.isnan(value):
        return "–"
    for factor, prefix in prefixes:
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:{plain}} {unit}"


def _si(value: float, unit: str) -> str:
    return _scaled(value, unit, SI_PREFIXES)


def _bytes(value: float) -> str:
    return _scaled(value, "B", BINARY_PREFIXES, plain=".0f")


def _marks(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def display_table(report: Report) -> pd.DataFrame:
    """The table a reader sees: labels, n, each metric as ``mean [CI]``, the difference from the baseline with
    its Holm-corrected p and significance marks, the average rank, and the cost."""
    table, options = report.table, report.options
    rows = []
    for _, row in table.iterrows():
        shown: dict[str, Any] = {
            key: "" if row[key] is None or (isinstance(row[key], float) and math.isnan(row[key])) else row[key]
            for key in report.labels
        }
        shown["n"] = int(row["n"]) if row["code_versions"] <= 1 else f"{int(row['n'])}†"
        for metric in report.metrics:
            shown[LABELS.get(metric, metric)] = _interval_cell(row, metric)
        for metric in options.compare if options.baseline else ():
            if f"{metric}_p_holm" not in table:
                continue
            diff, p = row.get(f"{metric}_diff_vs_baseline"), row.get(f"{metric}_p_holm")
            name = f"Δ {LABELS.get(metric, metric)} vs {options.baseline}"
            shown[name] = "" if diff is None or math.isnan(diff) else f"{diff:+.2f}{_marks(p)}"
            shown[f"p (Holm, {options.test})"] = "" if p is None or math.isnan(p) else f"{p:.3g}"
        for metric in report.metrics[:1]:
            if f"{metric}_rank_mean" in table:
                mean, sd = row.get(f"{metric}_rank_mean"), row.get(f"{metric}_rank_sd")
                shown["rank"] = (
                    ""
                    if mean is None or math.isnan(mean)
                    else (f"{mean:.2f}" if sd is None or math.isnan(sd) else f"{mean:.2f} ± {sd:.2f}")
                )
        if "published_acc" in table:
            shown["published ACC"] = _number(row.get("published_acc"))
            shown["published BWT"] = _number(row.get("published_bwt"))
        shown["train time"] = "–" if math.isnan(row["train_s"]) else f"{row['train_s']:.1f} s"
        shown["eval time"] = "–" if math.isnan(row["eval_s"]) else f"{row['eval_s']:.1f} s"
        shown["train FLOPs"] = _si(row["train_flops"], "FLOP")
        shown["peak memory"] = _bytes(row["peak_memory_bytes"])
        shown["kept between tasks"] = _bytes(row["kept_bytes"])
        rows.append(shown)
    return pd.DataFrame(rows)


def legend(report: Report) -> str:
    """What the published table's cells mean, for the lines below it."""
    options = report.options
    interval = "Student-t" if options.ci == "t" else "BCa bootstrap"
    lines = [
        f"Cells: mean [{options.level:.0%} {interval} confidence interval] over the n seeds (percent); † the group "
        "mixes code versions.",
    ]
    if options.baseline:
        test = {
            "t": "paired t-test",
            "wilcoxon": "Wilcoxon signed-rank test",
            "permutation": "exact paired permutation test",
        }
        lines.append(
            f"Δ: mean paired difference from {options.baseline} over matching seeds; p: {test[options.test]}, "
            f"Holm-corrected across the table; * p < 0.05, ** p < 0.01, *** p < 0.001."
        )
    if "rank" in display_table(report).columns:
        lines.append(
            f"rank: average rank by {LABELS.get(report.metrics[0], report.metrics[0])} among the strategies of the "
            "protocol over the seeds all ran (1 = best) ± sd."
        )
    lines.append(
        "Cost: training and evaluation wall time, training FLOPs (one step x steps, torch.utils.flop_counter), peak "
        "memory (GPU allocation, or the process's resident set on a CPU), bytes a strategy keeps between tasks."
    )
    return "\n".join(lines)


def render(report: Report, fmt: str) -> str:
    """The table in ``fmt``: csv / json numbers only; markdown / latex / html the display table."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if report.table.empty:
        return "(no completed runs)" if fmt not in ("csv", "json") else ("" if fmt == "csv" else "[]")
    if fmt == "csv":
        return report.table.to_csv(index=False)
    if fmt == "json":
        return report.table.to_json(orient="records", indent=1)
    table = display_table(report)
    if fmt in ("markdown", "md"):
        header = "| " + " | ".join(map(str, table.columns)) + " |"
        rule = "|" + "|".join("---" for _ in table.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
        return "\n".join([header, rule, *body, "", legend(report)])
    if fmt == "latex":
        return table.to_latex(index=False, escape=True)
    return table.to_html(index=False, escape=True)


def problem_lines(problems: Iterable[dict[str, str]]) -> list[str]:
    return [f"- {p['status']}: {p['path']} ({p['reason']})" for p in problems]


# -- plots and W&B ---------------------------------------------------------------------------------------
def write_plots(report: Report, folder: Path) -> list[Path]:
    """Mean R per group with the seed spread, accuracy-over-tasks curves with confidence bands, the BWT-FWT
    scatter with interval bars (:mod:`clbench.plots`), and per IBCL run its Pareto front."""
    from clbench.plots import save_bwt_fwt, save_curves, save_matrix_grid

    folder.mkdir(parents=True, exist_ok=True)
    # name groups by the labels that differ between them (what all share would only lengthen every legend entry)
    varying = [k for k in report.labels if len({str(g[0].fields.get(k)) for g in report.groups}) > 1]
    names = [_describe(group[0], varying or report.labels[-1:]) for group in report.groups]
    matrices = [[np.asarray(run.result["acc_matrix"], dtype=np.float64) for run in group] for group in report.groups]
    square = [
        (name, [m for m in ms if m.shape == ms[0].shape])
        for name, ms in zip(names, matrices, strict=True)
        if ms and ms[0].ndim == 2 and ms[0].shape[0] == ms[0].shape[1] and ms[0].size
    ]
    written = []
    if square:
        written.append(save_matrix_grid(square, folder / "acc_matrices.png"))
        written.append(save_curves(square, folder / "acc_over_tasks.png", report.options.level))
    points = [
        (name, [run.metrics.get("fwt", math.nan) for run in group], [run.metrics.get("bwt", math.nan) for run in group])
        for name, group in zip(names, report.groups, strict=True)
    ]
    if any(np.isfinite(f).any() for _, f, _ in points):
        written.append(save_bwt_fwt(points, folder / "bwt_vs_fwt.png", report.options.level))
    written += write_pareto_plots([run.result for group in report.groups for run in group], folder)
    return written


def write_pareto_plots(results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One Pareto-front figure per IBCL run (a result holding ``ibcl.pareto_front``): per-preference final
    accuracies, ``ibcl_pareto_<stream>_<run id>.png``. Runs of other strategies are skipped."""
    from clbench.plots import save_pareto

    written = []
    for result in results:
        front = (result.get("ibcl") or {}).get("pareto_front") or {}
        if not front.get("final_acc"):
            continue
        names = [task.get("name", f"task {k}") for k, task in enumerate(result.get("tasks", []))] or None
        run = result.get("run_id") or f"seed{result.get('seed')}"
        title = f"IBCL on {result.get('stream')} ({run}): final accuracy per preference, Pareto-optimal in colour"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ibcl_pareto_{result.get('stream')}_{run}.png"
        written.append(
            save_pareto(front["final_acc"], front["non_dominated"], result["ibcl"]["preferences"], title, path, names)
        )
    return written


def log_to_wandb(table: pd.DataFrame, plots: Sequence[Path], mode: str, project: str, directory: Path) -> None:
    """Log the summary table and plots as one W&B run in ``directory`` (offline unless ``mode`` says so)."""
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        mode=mode,
        project=project,
        job_type="report",
        dir=str(directory),
        reinit="create_new",  # its own run, whatever other run this process has open
        settings=wandb.Settings(silent=True),
    )
    payload: dict[str, Any] = {"summary": wandb.Table(dataframe=table.astype(str))}
    payload.update({path.stem: wandb.Image(str(path)) for path in plots})
    run.log(payload)
    run.finish()


# -- command line ----------------------------------------------------------------------------------------
def _keys(text: str | None) -> list[str]:
    return [key.strip() for key in (text or "").split(",") if key.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m clbench.report",
        description=doc.split("\n\n")[0].replace("\n", " "),
        epilog=f"A leaderboard for one protocol (as in the module docstring): {LEADERBOARD}",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="results or sweep folders to read")
    parser.add_argument("--format", default="markdown", choices=FORMATS)
    parser.add_argument(
        "--by", default=None, help="label columns, any dotted config key (default: protocol,stream,scenario,strategy)"
    )
    parser.add_argument("--ignore", default=None, help="comma-separated config keys to pool over on purpose")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default: ACC, BWT, FWT, ...)")
    parser.add_argument("--l2m", action="store_true", help="add the L2M lifelong-learning metrics")
    parser.add_argument("--baseline", default=None, help="strategy to compare every other one with (paired over seeds)")
    parser.add_argument("--compare", default="acc", help="metrics tested against the baseline (default: acc)")
    parser.add_argument("--test", default="t", choices=stats.TESTS, help="the test whose Holm-corrected p decides")
    parser.add_argument("--ci", default="t", choices=stats.CI_METHODS, help="interval of the mean: t or bootstrap")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction")
    parser.add_argument(
        "--matrix", default="tag", choices=MATRICES, help="class scenario: task-agnostic R (tag) or task-aware (taw)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when any job failed or is missing")
    parser.add_argument("--plots", type=Path, default=None, help="folder for PNG plots (default: <first>/report)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--wandb", choices=("offline", "online"), default=None, help="also log the table to W&B")
    parser.add_argument("--wandb-project", default="clbench")
    args = parser.parse_args(argv)

    try:
        found = collect(args.folders)
        view = task_aware_view if args.matrix == "taw" else (lambda result: result)
        runs = [to_run(view(result)) for result in found.completed]
        notes = add_reference_metrics(runs) if runs else []
        metrics = _keys(args.metrics) or None
        if args.l2m:
            present = {m for run in runs for m in run.metrics}
            base = metrics or [m for m in (*DEFAULT_METRICS, *OPTIONAL_METRICS) if m in present]
            metrics = [*base, *(m for m in L2M_METRICS if m in present)]
        options = Options(
            by=_keys(args.by) or None,
            ignore=_keys(args.ignore),
            metrics=metrics,
            baseline=args.baseline,
            compare=_keys(args.compare),
            test=args.test,
            ci=args.ci,
            alpha=args.alpha,
        )
        present = {m for run in runs for m in run.metrics}
        unknown = [m for m in options.compare if runs and m not in present]
        if unknown:
            raise ReportError(f"--compare {','.join(unknown)}: no run has it; use some of {', '.join(sorted(present))}")
        report = summarize(runs, options)
        report.notes = notes + report.notes
        report.table = add_published(report.table, published_table())
        text = render(report, args.format)
    except ReportError as error:
        print(f"clbench.report: error: {error}", file=sys.stderr)
        return 2
    numeric = args.format in ("csv", "json")
    print(text)
    problems = problem_lines(found.problems)
    if problems:
        heading = f"{len(found.problems)} run(s) or job(s) not in the table:"
        print("\n".join(["", heading, *problems]), file=sys.stderr if numeric else sys.stdout)
    for note in [*found.notes, *report.notes]:
        print(f"clbench.report: note: {note}", file=sys.stderr)
    plots: list[Path] = []
    output_dir = args.plots or args.folders[0] / "report"
    if report.groups and not args.no_plots:
        plots = write_plots(report, output_dir)
        print("plots: " + ", ".join(str(p) for p in plots), file=sys.stderr)
    if args.wandb and not report.table.empty:
        log_to_wandb(display_table(report), plots, args.wandb, args.wandb_project, output_dir)
    if args.strict and found.unsuccessful():
        print(
            f"clbench.report: {len(found.unsuccessful())} failed or missing run(s)/job(s) (--strict)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
