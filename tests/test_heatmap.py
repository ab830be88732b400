"""A run's heatmaps: small matrices carry their values in a colour that reads, large ones stay a bounded image,
and the pixels are the colour map's colours."""

import sys

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from clbench.heatmap import (
    CELL_PX,
    MAX_GRID_PX,
    MAX_TICKS,
    MIN_GRID_PX,
    layout,
    matrix_image,
    nice_ticks,
    save_matrix,
    text_colour,
)


def test_small_matrix_annotates_every_finite_cell():
    values = np.tril(np.full((5, 5), 42.0))
    values[np.triu_indices(5, k=1)] = np.nan
    plan = layout(values)
    assert len(plan.values) == 15 and {v.text for v in plan.values} == {"42.0"}
    assert {(v.row, v.column) for v in plan.values} == {(i, j) for i in range(5) for j in range(i + 1)}
    assert plan.cell_px == (CELL_PX, CELL_PX)


def test_missing_cells_are_white_and_finite_ones_take_the_colour_maps_colour():
    values = np.array([[0.0, np.nan], [50.0, 100.0]])
    plan = layout(values)
    viridis = colormaps["viridis"]
    for (i, j), value in np.ndenumerate(values):
        expected = [255, 255, 255] if np.isnan(value) else np.rint(np.array(viridis(value / 100.0)[:3]) * 255)
        assert plan.rgb[i, j].tolist() == list(expected)


def test_image_cells_show_the_layouts_colours():
    """The drawn grid, sampled at a cell's corner (away from its text), is the layout's colour."""
    values = np.array([[10.0, 90.0], [np.nan, 55.0]])
    plan = layout(values)
    image = np.asarray(matrix_image(values, "R"))
    # find the grid: the first row and column of pixels holding cell (0, 0)'s colour
    hits = np.argwhere((image == plan.rgb[0, 0]).all(axis=2))
    top, left = hits.min(axis=0)
    width, height = plan.cell_px
    for (i, j), _ in np.ndenumerate(values):
        assert image[top + i * height + 2, left + j * width + 2].tolist() == plan.rgb[i, j].tolist()


def test_hundred_task_matrix_is_bounded_and_unannotated(tmp_path):
    values = np.random.default_rng(0).uniform(0, 100, size=(100, 100))
    plan = layout(values)
    assert not plan.values
    assert len(plan.x_ticks) <= MAX_TICKS and len(plan.y_ticks) <= MAX_TICKS
    assert plan.cell_px[0] * 100 <= MAX_GRID_PX
    path = save_matrix(values, "R", tmp_path / "r.png")
    width, height = Image.open(path).size
    assert width < MAX_GRID_PX + 300 and height < MAX_GRID_PX + 200


def test_one_row_matrix_keeps_room_for_its_labels():
    plan = layout(np.array([[50.0, 60.0, 70.0]]))
    width, height = plan.cell_px
    assert height * 1 >= MIN_GRID_PX and width * 3 >= MIN_GRID_PX


def test_cell_text_reads_on_every_cell_colour():
    # a diverging map's middle is white: 0.0 used to print white on white
    plan = layout(np.array([[0.0, -30.0], [30.0, np.nan]]), cmap="RdBu", symmetric=True)
    colours = {v.text: v.colour for v in plan.values}
    assert colours == {"0.0": "black", "-30.0": "white", "30.0": "white"}
    assert (plan.vmin, plan.vmax) == (-30.0, 30.0)
    plan = layout(np.array([[0.0, 100.0]]))
    assert {v.text: v.colour for v in plan.values} == {"0.0": "white", "100.0": "black"}  # viridis: purple, yellow


def test_text_colour_by_luminance():
    assert text_colour((1.0, 1.0, 1.0, 1.0)) == "black" and text_colour((0.0, 0.0, 0.0, 1.0)) == "white"
    assert text_colour((0.0, 0.0, 1.0, 1.0)) == "white" and text_colour((1.0, 1.0, 0.0, 1.0)) == "black"


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.0, 100.0, [0.0, 25.0, 50.0, 75.0, 100.0]),
        (-30.0, 30.0, [-20.0, 0.0, 20.0]),
        (-1.0, 1.0, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        (-0.37, 0.37, [-0.2, 0.0, 0.2]),
    ],
)
def test_colour_bar_ticks_are_round_and_inside(low, high, expected):
    assert nice_ticks(low, high) == expected


def test_all_missing_difference_matrix_still_draws():
    plan = layout(np.full((2, 2), np.nan), cmap="RdBu", symmetric=True)
    assert not plan.values and (plan.rgb == 255).all()
    assert matrix_image(np.full((2, 2), np.nan), "empty", cmap="RdBu", symmetric=True).size[0] > 0


def test_drawing_a_heatmap_does_not_import_pyplot():
    """The point of the module: a run's heatmaps cost no matplotlib figure (0.2-0.3 s each)."""
    import subprocess

    code = (
        "import sys, numpy as np; from clbench.heatmap import matrix_image; "
        "matrix_image(np.eye(3) * 50, 'R'); print('matplotlib.pyplot' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
