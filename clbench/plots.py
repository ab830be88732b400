"""The report's figures (matplotlib): mean-R grids, accuracy curves, BWT/FWT scatter, Pareto fronts, and a long
stream's accuracy curve. A run's own heatmaps are :mod:`clbench.heatmap`'s."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from clbench.heatmap import MAX_TICKS, text_colour


def save_curve(values: Sequence[float], title: str, path: Path) -> Path:
    """Accuracy after each task (percent) as a line: the view of a long stream whose R is not square."""
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(1, len(values) + 1), values, lw=1.5)
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


MAX_LABELLED = 16
"""Up to this many preferences the Pareto plot names every one; beyond it, only the front."""


def trade_off_pair(final_acc: np.ndarray) -> tuple[int, int]:
    """The two tasks whose final accuracies trade off most across preferences: the most negative covariance
    (a conflict over a wide range, so the 2-D view shows the front, not a blob); with no conflict at all,
    the two that vary most."""
    values = np.asarray(final_acc, dtype=np.float64)
    pairs = [(a, b) for a in range(values.shape[1]) for b in range(a + 1, values.shape[1])]
    if not pairs:
        return 0, 0
    centred = values - values.mean(axis=0)
    covariance = {pair: float((centred[:, pair[0]] * centred[:, pair[1]]).mean()) for pair in pairs}
    spread = {pair: float(values[:, pair[0]].std() + values[:, pair[1]].std()) for pair in pairs}
    most_conflicting = min(pairs, key=lambda pair: (covariance[pair], -spread[pair]))
    return most_conflicting if covariance[most_conflicting] < 0 else max(pairs, key=lambda pair: spread[pair])


def short_task_label(name: str, index: int) -> str:
    """``T<index>`` plus what a stream's task name holds in brackets (its classes), one class a line."""
    inner = name[name.find("[") + 1 : name.rfind("]")] if "[" in name and name.endswith("]") else name
    return f"T{index}\n" + "\n".join(inner.split(",")) if inner and inner != f"task {index}" else f"T{index}"


def save_pareto(
    final_acc: np.ndarray | Sequence[Sequence[float]],
    non_dominated: Sequence[bool],
    preferences: np.ndarray | Sequence[Sequence[float]],
    title: str,
    path: Path,
    task_names: Sequence[str] | None = None,
) -> Path:
    """Per-preference final accuracies (IBCL's Pareto front) in two views.

    Left, parallel coordinates: one line per preference across the tasks, Pareto-optimal preferences in
    colour (legend below: the preference vector), dominated ones grey and dashed. Right, the two tasks that
    trade off most (:func:`trade_off_pair`): one labelled point per preference and the front of that pair as
    a staircase. With a single task only the left view is drawn.
    """
    values = np.asarray(final_acc, dtype=np.float64)
    weights = np.asarray(preferences, dtype=np.float64)
    flags = list(non_dominated)
    num_prefs, num_tasks = values.shape
    names = list(task_names) if task_names is not None else [f"task {j}" for j in range(num_tasks)]
    labels = [short_task_label(name, j) for j, name in enumerate(names)]
    colours = plt.get_cmap("tab10")
    optimal = [p for p in range(num_prefs) if flags[p]]
    colour_of = {p: colours(k % 10) for k, p in enumerate(optimal)}
    panels = 2 if num_tasks > 1 else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 5.6), squeeze=False)
    left = axes[0, 0]
    positions = np.arange(num_tasks)
    for p in range(num_prefs):
        if not flags[p]:
            left.plot(positions, values[p], color="0.7", ls="--", lw=0.9, zorder=1)
    for p in optimal:
        label = f"p{p}: " + " ".join(f"{w:.2f}" for w in weights[p]) if len(optimal) <= MAX_LABELLED else None
        left.plot(positions, values[p], color=colour_of[p], marker="o", ms=4, lw=1.5, label=label, zorder=2)
    if len(optimal) > MAX_LABELLED:
        left.plot([], [], color=colour_of[optimal[0]], marker="o", ms=4, label=f"Pareto-optimal ({len(optimal)})")
    if num_prefs > len(optimal):
        left.plot([], [], color="0.7", ls="--", label=f"dominated ({num_prefs - len(optimal)})")
    left.set_xticks(positions)
    left.set_xticklabels(labels, fontsize=7)
    left.set_ylabel("final accuracy (%)")
    left.set_title("per-task accuracy, one line per preference", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(
        fontsize=6.5,
        title="Pareto-optimal preferences: weight of T0 ... T" + str(num_tasks - 1),
        title_fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=2,
    )
    if panels == 2:
        a, b = trade_off_pair(values)
        right = axes[0, 1]
        pair = values[:, [a, b]]
        front = [p for p in range(num_prefs) if not ((pair >= pair[p]).all(1) & (pair > pair[p]).any(1)).any()]
        front = sorted(front, key=lambda p: pair[p, 0])
        for p in range(num_prefs):
            colour = colour_of.get(p, "0.6")
            right.scatter(values[p, a], values[p, b], color=colour, s=30 if flags[p] else 18, zorder=2)
            if num_prefs <= MAX_LABELLED or p in front:  # many preferences: label the pair's front only
                point = (values[p, a], values[p, b])
                right.annotate(f"p{p}", point, fontsize=7, xytext=(3, 3), textcoords="offset points")
        right.step(
            pair[front, 0], pair[front, 1], where="pre", color="black", lw=1, alpha=0.6, label="front of these two"
        )
        right.set_xlabel(f"T{a} accuracy (%)")
        right.set_ylabel(f"T{b} accuracy (%)")
        right.set_title(f"the two tasks that trade off most: T{a} vs T{b} (colour: Pareto-optimal on all)", fontsize=9)
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _legend_below(figure: Figure, axes, entries: int) -> None:
    """The legend under the axes, in as many columns as fit: labels never overlap the data or each other."""
    if entries:
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, entries), frameon=False)


def save_matrix_grid(groups: Sequence[tuple[str, Sequence[np.ndarray]]], path: Path) -> Path:
    """Per group, the mean accuracy matrix over its seeds; each annotated cell (up to 12 tasks) reads
    ``mean`` over ``± sd`` (the seed spread), in the colour that reads on that cell (:func:`text_colour`)."""
    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    # constrained layout spaces the rows by what each panel's title and axis labels need: with the default fixed
    # fractions a panel's two-line title ran into the x label of the panel above
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.4 * rows), squeeze=False, layout="constrained")
    for axis in axes.flat[len(groups) :]:
        axis.axis("off")
    image = None
    for axis, (label, matrices) in zip(axes.flat, groups, strict=False):
        stack = np.stack([np.asarray(m, dtype=np.float64) for m in matrices])
        mean = stack.mean(axis=0)
        spread = stack.std(axis=0, ddof=1) if len(stack) > 1 else None
        image = axis.imshow(mean, vmin=0, vmax=100, cmap="viridis")
        if mean.shape[0] <= 12:
            for (i, j), value in np.ndenumerate(mean):
                text = f"{value:.0f}" if spread is None else f"{value:.0f}\n±{spread[i, j]:.1f}"
                axis.text(
                    j, i, text, ha="center", va="center", fontsize=6, color=text_colour(image.cmap(image.norm(value)))
                )
        ticks = range(0, mean.shape[0], -(-mean.shape[0] // MAX_TICKS))
        axis.set_xticks(ticks)
        axis.set_yticks(ticks)
        # long group names wrap at the panel's width instead of running into the neighbouring panel
        axis.set_title(f"{textwrap.fill(label, 44)}\n(n = {len(stack)})", fontsize=8)
        axis.set_xlabel("evaluated on task j")
        axis.set_ylabel("after training task i")
    if image is not None:
        figure.colorbar(image, ax=axes, fraction=0.02, label="accuracy (%)")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _band(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: mean and Student-t confidence bounds over the rows (seeds); the bounds are the mean for one row."""
    from scipy import stats as scipy_stats

    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, mean, mean
    half = (
        scipy_stats.t.ppf(0.5 + level / 2, values.shape[0] - 1) * values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])
    )
    return mean, mean - half, mean + half


MARKERS = "osD^v<>pXh"


def group_style(k: int) -> dict[str, object]:
    """Colour and marker of the k-th group: 20 colours (tab20) times 10 markers, so no two of up to 200 groups
    look alike (matplotlib's default cycle repeats its 10 colours, and a leaderboard has 18 strategies)."""
    return {"color": plt.get_cmap("tab20")(k % 20), "marker": MARKERS[(k // 20 + k) % len(MARKERS)]}


def save_curves(groups: Sequence[tuple[str, Sequence[np.ndarray]]], path: Path, level: float = 0.95) -> Path:
    """:func:`curves_figure` written to ``path``."""
    figure = curves_figure(groups, level)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def curves_figure(groups: Sequence[tuple[str, Sequence[np.ndarray]]], level: float = 0.95) -> Figure:
    """Mean accuracy on the tasks seen so far after each task, per group, with its confidence band over seeds;
    the x axis counts tasks in integers. A band is drawn within [0, 100], the range an accuracy can take (with
    3 seeds a t band is wide)."""
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    longest = 1
    for k, (label, matrices) in enumerate(groups):
        seen = np.array([[m[i, : i + 1].mean() for i in range(m.shape[0])] for m in matrices])
        mean, low, high = _band(seen, level)
        steps = np.arange(1, seen.shape[1] + 1)
        longest = max(longest, seen.shape[1])
        style = group_style(k)
        axes.plot(steps, mean, ms=3, label=f"{label} (n = {seen.shape[0]})", **style)
        axes.fill_between(steps, np.clip(low, 0, 100), np.clip(high, 0, 100), color=style["color"], alpha=0.18, lw=0)
    axes.set_xticks(range(1, longest + 1, -(-longest // MAX_TICKS)))
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("mean accuracy on tasks seen (%)")
    axes.set_title(f"ACC over tasks: mean over seeds, {level:.0%} confidence band")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes, len(groups))
    return figure


def save_bwt_fwt(
    groups: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path, level: float = 0.95
) -> Path:
    """One point per group at its mean (FWT, BWT) with confidence-interval bars on both axes; the groups are named
    in a legend below the plot, not beside the points, so labels never overlap."""
    figure, axes = plt.subplots(figsize=(7.0, 5.2))
    for k, (label, fwt, bwt) in enumerate(groups):
        pairs = np.array([(f, b) for f, b in zip(fwt, bwt, strict=True) if np.isfinite(f) and np.isfinite(b)])
        if pairs.size == 0:
            continue
        mean, low, high = _band(pairs, level)
        axes.errorbar(
            mean[0],
            mean[1],
            xerr=[[mean[0] - low[0]], [high[0] - mean[0]]],
            yerr=[[mean[1] - low[1]], [high[1] - mean[1]]],
            fmt=str(group_style(k)["marker"]),
            color=group_style(k)["color"],
            capsize=3,
            label=f"{label} (n = {len(pairs)})",
        )
    axes.axhline(0, color="grey", lw=0.8)
    axes.axvline(0, color="grey", lw=0.8)
    axes.set_xlabel("FWT (%)")
    axes.set_ylabel("BWT (%)")
    axes.set_title(f"Backward vs forward transfer: mean over seeds, {level:.0%} confidence intervals")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes, len(groups))
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
