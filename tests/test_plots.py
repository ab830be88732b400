"""Heatmaps: small matrices carry their values, large ones stay a bounded image."""

import matplotlib.pyplot as plt
import numpy as np

from clbench.plots import MAX_INCHES, MAX_TICKS, matrix_figure, save_matrix


def test_small_matrix_annotates_every_finite_cell():
    values = np.tril(np.full((5, 5), 42.0))
    values[np.triu_indices(5, k=1)] = np.nan
    figure = matrix_figure(values, "R")
    texts = [t.get_text() for t in figure.axes[0].texts]
    measured = [t.get_in_layout() for t in figure.axes[0].texts]
    plt.close(figure)
    assert len(texts) == 15 and set(texts) == {"42.0"}
    assert not any(measured)  # inside their cells: tight_layout does not measure them (its cost grows with T^2)


def test_hundred_task_matrix_is_bounded_and_unannotated(tmp_path):
    values = np.random.default_rng(0).uniform(0, 100, size=(100, 100))
    figure = matrix_figure(values, "R")
    width, height = figure.get_size_inches()
    axes = figure.axes[0]
    assert width <= MAX_INCHES and height <= MAX_INCHES
    assert not axes.texts
    assert len(axes.get_xticks()) <= MAX_TICKS and len(axes.get_yticks()) <= MAX_TICKS
    plt.close(figure)
    path = save_matrix(values, "R", tmp_path / "r.png")
    assert path.stat().st_size > 0
