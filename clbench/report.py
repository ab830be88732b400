"""``python -m clbench.report <dir>...``: compare runs as tables (mean +- sd over seeds) and plots.

Reads every ``result.json`` under the given folders (a sweep folder's ``index.json`` is followed to its
results), groups completed runs (by stream and strategy unless ``--by`` says otherwise), and prints
ACC / BWT / FWT / forgetting (and intransigence or any other metric present) as mean +- sd with the
number of seeds. Failed, unfinished and unreadable result files are listed below the table, never mixed
into it. Published numbers from ``clbench/reference/published.csv`` stand beside a group whose runs name a
``reference`` (set by the paper presets in ``conf/experiment/``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_METRICS = ("acc", "bwt", "fwt", "forgetting")
LABELS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "intransigence": "Intransigence"}
OPTIONAL_METRICS = ("intransigence", "acc_final", "acc_mean_over_time", "accumulation_gain")
L2M_METRICS = (
    "l2m_performance_maintenance",
    "l2m_forward_transfer_contrast",
    "l2m_backward_transfer_contrast",
    "l2m_relative_performance",
    "l2m_sample_efficiency",
)
FORMATS = ("markdown", "latex", "csv", "html")
PUBLISHED = Path(__file__).resolve().parent / "reference" / "published.csv"


@dataclass
class Collection:
    """Runs found under the report's folders, split by what can enter a table."""

    completed: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)


def _result_paths(folder: Path) -> list[Path]:
    paths = set(folder.rglob("result.json"))
    for index in folder.rglob("index.json"):
        try:
            jobs = json.loads(index.read_text()).get("jobs", [])
        except (OSError, json.JSONDecodeError):
            continue
        paths |= {Path(job["result"]) for job in jobs if job.get("result")}
    return sorted(paths)


def collect(folders: Sequence[Path]) -> Collection:
    """Read every result under ``folders``; anything not completed goes to ``problems`` with a reason."""
    found = Collection()
    for folder in folders:
        if not folder.exists():
            found.problems.append({"path": str(folder), "status": "missing", "reason": "no such folder"})
            continue
        for path in _result_paths(folder):
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
            found.completed.append(result)
    return found


def runs_frame(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: identity columns, every scalar metric, and the preset's reference key."""
    rows = []
    for result in results:
        config = result.get("config", {})
        row = {
            "stream": result.get("stream"),
            "strategy": result.get("strategy"),
            "scenario": result.get("scenario"),
            "seed": result.get("seed"),
            "experiment": config.get("experiment_name") or "",
            "reference": config.get("reference") or "",
            "model": str(config.get("model", {}).get("_target_", "")).rsplit(".", 1)[-1],
            "num_tasks": len(result.get("acc_matrix", [])),
            "order_seed": config.get("stream", {}).get("order_seed"),
            "path": result.get("_path"),
        }
        for key, value in result["metrics"].items():
            if isinstance(value, int | float):
                row[key] = float(value)
        rows.append(row)
    return pd.DataFrame(rows)


def _format(mean: float, sd: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {sd:.2f}"


def published_table(path: Path = PUBLISHED) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def summary_table(
    frame: pd.DataFrame,
    by: Sequence[str] = ("stream", "strategy"),
    metrics: Sequence[str] | None = None,
    published: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Mean ± sd (sample sd, ddof=1) over the runs in each group (seeds, task orders), with their number ``n``."""
    if frame.empty:
        return pd.DataFrame()
    missing = [key for key in by if key not in frame.columns]
    if missing:
        raise ValueError(f"--by {','.join(missing)} is not a run attribute: use some of {', '.join(frame.columns)}")
    if metrics is None:
        metrics = [m for m in (*DEFAULT_METRICS, *OPTIONAL_METRICS) if m in frame.columns]
    rows = []
    for keys, group in frame.groupby(list(by), sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row: dict[str, Any] = dict(zip(by, keys, strict=True))
        row["n"] = len(group)
        for metric in metrics:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            mean = float(values.mean()) if len(values) else float("nan")
            sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[LABELS.get(metric, metric)] = _format(mean, sd, len(values))
        if published is not None:
            references = {r for r in group.get("reference", []) if r}
            match = published[published["key"].isin(references)] if references else published.iloc[0:0]
            row["published ACC"] = f"{match['acc'].iloc[0]:.2f}" if len(match) else ""
            row["published BWT"] = (
                f"{match['bwt'].iloc[0]:.2f}" if len(match) and not pd.isna(match["bwt"].iloc[0]) else ""
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    if published is not None and not (table["published ACC"] != "").any():
        table = table.drop(columns=["published ACC", "published BWT"])
    return table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if table.empty:
        return "(no completed runs)"
    if fmt == "markdown":
        header = "| " + " | ".join(map(str, table.columns)) + " |"
        rule = "|" + "|".join("---" for _ in table.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
        return "\n".join([header, rule, *body])
    if fmt == "latex":
        return table.to_latex(index=False, escape=True)
    if fmt == "csv":
        return table.to_csv(index=False)
    return table.to_html(index=False, escape=True)


def mean_matrices(results: Sequence[dict[str, Any]], by: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean accuracy matrix per group (runs of different task counts are not averaged together)."""
    grouped: dict[str, list[np.ndarray]] = {}
    for result in results:
        label = " / ".join(str(result.get(key, "")) for key in by)
        grouped.setdefault(label, []).append(np.asarray(result["acc_matrix"], dtype=np.float64))
    return {
        label: np.mean([m for m in matrices if m.shape == matrices[0].shape], axis=0)
        for label, matrices in grouped.items()
    }


def write_plots(results: Sequence[dict[str, Any]], frame: pd.DataFrame, by: Sequence[str], folder: Path) -> list[Path]:
    """The grid of mean accuracy-matrix heatmaps, ACC-over-tasks curves, the BWT-vs-FWT scatter, and per IBCL
    run its Pareto front (:func:`write_pareto_plots`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    matrices = mean_matrices(results, by)
    written = []

    columns = min(4, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False)
    for axis in axes.flat[len(matrices) :]:
        axis.axis("off")
    for axis, (label, matrix) in zip(axes.flat, matrices.items(), strict=False):
        image = axis.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        if matrix.shape[0] <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(
                    j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 50 else "black"
                )
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("task j")
        axis.set_ylabel("after task i")
    figure.colorbar(image, ax=axes, fraction=0.02, label="accuracy (%)")
    path = folder / "acc_matrices.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, matrix in matrices.items():
        seen = [matrix[i, : i + 1].mean() for i in range(matrix.shape[0])]
        axis.plot(range(1, len(seen) + 1), seen, marker="o", label=label)
    axis.set_xlabel("tasks trained")
    axis.set_ylabel("mean accuracy on tasks seen (%)")
    axis.set_title("ACC over tasks (mean over seeds)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = folder / "acc_over_tasks.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for keys, group in frame.groupby(list(by), sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        axis.scatter(group["fwt"], group["bwt"], label=" / ".join(map(str, keys)), alpha=0.8)
    axis.axhline(0, color="grey", lw=0.8)
    axis.axvline(0, color="grey", lw=0.8)
    axis.set_xlabel("FWT (%)")
    axis.set_ylabel("BWT (%)")
    axis.set_title("Backward vs forward transfer (one point per run)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = folder / "bwt_vs_fwt.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    written += write_pareto_plots(results, folder)
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
        mode=mode, project=project, job_type="report", dir=str(directory), settings=wandb.Settings(silent=True)
    )
    payload: dict[str, Any] = {"summary": wandb.Table(dataframe=table.astype(str))}
    payload.update({path.stem: wandb.Image(str(path)) for path in plots})
    run.log(payload)
    run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clbench.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="results or sweep folders to read")
    parser.add_argument("--format", default="markdown", choices=FORMATS)
    parser.add_argument("--by", default="stream,strategy", help="comma-separated grouping keys")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default: ACC, BWT, FWT, ...)")
    parser.add_argument("--l2m", action="store_true", help="add the L2M lifelong-learning metrics")
    parser.add_argument("--plots", type=Path, default=None, help="folder for PNG plots (default: <first>/report)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--wandb", choices=("offline", "online"), default=None, help="also log the table to W&B")
    parser.add_argument("--wandb-project", default="clbench")
    args = parser.parse_args(argv)

    found = collect(args.folders)
    by = [key.strip() for key in args.by.split(",") if key.strip()]
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    frame = runs_frame(found.completed)
    if args.l2m:
        base = metrics or [m for m in (*DEFAULT_METRICS, *OPTIONAL_METRICS) if m in frame.columns]
        metrics = [*base, *(m for m in L2M_METRICS if m in frame.columns)]
    try:
        table = summary_table(frame, by, metrics, published_table())
        text = render(table, args.format)
    except (ValueError, KeyError) as error:
        print(f"clbench.report: error: {error}", file=sys.stderr)
        return 2
    print(text)
    print(f"\n{len(found.completed)} completed runs; accuracies in percent; ± is the sample sd over the n runs.")
    if found.problems:
        print(f"\n{len(found.problems)} result file(s) not in the table:")
        for problem in found.problems:
            print(f"- {problem['status']}: {problem['path']} ({problem['reason']})")
    plots: list[Path] = []
    output_dir = args.plots or args.folders[0] / "report"
    if found.completed and not args.no_plots:
        plots = write_plots(found.completed, frame, by, output_dir)
        print("\nplots: " + ", ".join(str(p) for p in plots))
    if args.wandb and not table.empty:
        log_to_wandb(table, plots, args.wandb, args.wandb_project, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
