"""The report's figures: integer task ticks, bands, legends clear of the data, titles clear of labels."""

import matplotlib.pyplot as plt
import numpy as np


def test_report_figures_have_integer_task_ticks_bands_and_legends_below(tmp_path):
    from clbench.plots import save_bwt_fwt, save_curves, save_matrix_grid

    rng = np.random.default_rng(0)
    groups = [(f"strategy {k}", [rng.uniform(0, 100, (4, 4)) for _ in range(3)]) for k in range(5)]
    for path in (
        save_matrix_grid(groups, tmp_path / "grid.png"),
        save_curves(groups, tmp_path / "curves.png"),
        save_bwt_fwt([(name, [1.0, 2.0, 3.0], [-1.0, -2.0, -4.0]) for name, _ in groups], tmp_path / "scatter.png"),
    ):
        assert path.stat().st_size > 5000
    from clbench.plots import curves_figure

    figure = curves_figure(groups)
    axes = figure.axes[0]
    assert list(axes.get_xticks()) == [1, 2, 3, 4]  # tasks, in integers
    assert len(axes.collections) == 5  # one confidence band per group
    legend = axes.get_legend()
    figure.canvas.draw()
    assert legend.get_window_extent().y1 <= axes.get_window_extent().y0  # below the axes: never over the data
    plt.close(figure)


def test_matrix_grid_titles_clear_the_x_labels_of_the_panels_above(tmp_path, monkeypatch):
    """A leaderboard's mean-R grid (45 groups on the default protocol) had each panel's two-line title drawn over
    the x label of the panel above."""
    import clbench.plots as plots

    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    groups = [(f"default / permuted_mnist5k / domain / strategy_{k}", [np.full((5, 5), 50.0)] * 3) for k in range(9)]
    plots.save_matrix_grid(groups, tmp_path / "grid.png")
    figure = kept[0]
    renderer = figure.canvas.get_renderer()
    axes = np.asarray(figure.axes[:9]).reshape(3, 3)
    for row in range(1, 3):
        for column in range(3):
            title = axes[row, column].title.get_window_extent(renderer)
            label_above = axes[row - 1, column].xaxis.label.get_window_extent(renderer)
            assert title.y1 <= label_above.y0, (row, column)
    plt.close(figure)


def test_eighteen_groups_get_eighteen_looks_and_bands_stay_within_accuracy_range():
    """A leaderboard's 18 strategies drew with 10 repeating colours, and 3-seed t bands reached 120 %."""
    from clbench.plots import curves_figure, group_style

    looks = {(group_style(k)["color"], group_style(k)["marker"]) for k in range(18)}
    assert len(looks) == 18
    wild = [np.array([[90.0, 0.0], [10.0, 100.0]]), np.array([[95.0, 0.0], [90.0, 10.0]])]
    figure = curves_figure([("a", wild), ("b", wild)])
    for band in figure.axes[0].collections:
        ys = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
        assert ys.min() >= 0.0 and ys.max() <= 100.0
    plt.close(figure)
