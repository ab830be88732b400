"""Annotated heatmaps of accuracy, forgetting and transfer matrices (files and W&B images)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def matrix_figure(matrix: np.ndarray, title: str, cmap: str = "viridis", symmetric: bool = False) -> Figure:
    """A heatmap with every finite cell annotated; rows are 'after training task i', columns 'task j'."""
    values = np.asarray(matrix, dtype=np.float64)
    size = max(3.0, 0.6 * values.shape[1] + 1.5)
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    finite = values[np.isfinite(values)]
    if symmetric and finite.size:
        bound = max(1e-9, float(np.abs(finite).max()))
        limits = {"vmin": -bound, "vmax": bound}
    else:
        limits = {"vmin": 0.0, "vmax": 100.0} if not symmetric else {}
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, **limits)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if values.shape[0] <= 25:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                axes.text(
                    j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < 50 else "black"
                )
    axes.set_xlabel("evaluated on task j")
    axes.set_ylabel("after training task i")
    axes.set_xticks(range(values.shape[1]))
    axes.set_yticks(range(values.shape[0]))
    axes.set_title(title)
    figure.tight_layout()
    return figure


def save_matrix(matrix: np.ndarray | Sequence[Sequence[float]], title: str, path: Path, **kwargs) -> Path:
    figure = matrix_figure(np.asarray(matrix, dtype=np.float64), title, **kwargs)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


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
