"""Annotated heatmaps of a run's matrices (R, forgetting, transfer), drawn straight into a PIL image.

Every run draws one for its folder (``acc_matrix.png``) and four more for W&B at its end. Through a matplotlib
figure (colour bar, ``tight_layout`` measuring every label, an Agg render) each cost 0.2-0.3 s here, five of them
more than a default run's whole training, and a sweep or a population draws hundreds. A heatmap is a fixed layout:
cells coloured through the colour map's lookup as one array, PIL's text on top, a colour bar beside; about 10 ms.
The report's multi-panel figures (:mod:`clbench.plots`) stay matplotlib figures: they are drawn once per report.

The picture follows the matplotlib one it replaces: rows are 'after training task i', columns 'task j'; R is
drawn on a fixed 0-100 scale, the difference matrices on a scale symmetric about zero (white is 0 on RdBu);
missing cells (NaN) stay white; up to :data:`MAX_ANNOTATED` rows every finite cell carries its value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_ANNOTATED = 25
"""Up to this many rows (and columns) every finite cell carries its value; beyond it the text would be unreadable."""
MAX_TICKS = 25
"""At most this many labelled ticks per axis (every k-th task beyond it)."""
CELL_PX = 48
"""A cell's side for small matrices: room for a value like '100.0' in :data:`VALUE_FONT_PX`."""
MAX_GRID_PX = 1200
"""The grid never grows past this many pixels a side (a 100-task R gets 12-pixel cells, not a 5,000-pixel image)."""
MIN_CELL_PX = 2
"""Cells never shrink below this (past 600 tasks the grid is allowed to exceed :data:`MAX_GRID_PX`)."""
MIN_GRID_PX = 200
"""The grid is at least this many pixels each way (cells of a one-row R get taller): the axis labels need it."""
TEXT_FONT_PX = 14
"""Title, axis labels and tick labels."""
VALUE_FONT_PX = 12
"""The values written in the cells."""
COLOUR_BAR_PX = 16
"""The colour bar's width."""
GAP_PX = 8
"""Space between parts (title and grid, grid and colour bar, tick and its label)."""
TICK_PX = 4
"""Length of a tick mark."""
COLOUR_BAR_TICKS = 5
"""About this many labelled values on the colour bar (nice numbers: 1, 2, 2.5 or 5 times a power of ten)."""


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``: black where the cell's relative
    luminance (WCAG 2.x, from linearised sRGB) exceeds 0.179, the point where both contrast ratios are equal.
    A fixed threshold on the value fails on diverging maps, whose middle (0.0 on RdBu) is white."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"


def nice_ticks(low: float, high: float, count: int = COLOUR_BAR_TICKS) -> list[float]:
    """About ``count`` round values from ``low`` to ``high`` (both included when they are round): the step is
    1, 2, 2.5 or 5 times a power of ten, the smallest of those that gives at most ``count`` intervals."""
    span = high - low
    if not math.isfinite(span) or span <= 0:
        return [low]
    raw = span / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(power * m for m in (1.0, 2.0, 2.5, 5.0, 10.0) if power * m >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= high + step * 1e-9:
        ticks.append(round(first + k * step, 10) + 0.0)  # + 0.0: no '-0'
        k += 1
    return ticks


@dataclass(frozen=True)
class CellValue:
    """One annotated cell: its row, column, the text written and the colour that reads on the cell."""

    row: int
    column: int
    text: str
    colour: str


@dataclass(frozen=True)
class HeatmapLayout:
    """Everything a heatmap shows, before any pixel is drawn (what the tests check)."""

    rgb: np.ndarray  # [rows, columns, 3] uint8, white where the value is missing
    vmin: float
    vmax: float
    cell_px: tuple[int, int]  # a cell's (width, height): square unless one side would fall below MIN_GRID_PX
    values: list[CellValue]
    x_ticks: list[int]
    y_ticks: list[int]
    bar_ticks: list[float]
    bar_rgb: np.ndarray  # [COLOUR_BAR steps, 3] uint8, from vmax (top) to vmin (bottom)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def _limits(values: np.ndarray, symmetric: bool) -> tuple[float, float]:
    if not symmetric:
        return 0.0, 100.0
    finite = values[np.isfinite(values)]
    bound = max(1e-9, float(np.abs(finite).max())) if finite.size else 1.0
    return -bound, bound


def layout(matrix: np.ndarray, cmap: str = "viridis", symmetric: bool = False) -> HeatmapLayout:
    """Colours, annotations and ticks of ``matrix``'s heatmap: R on 0-100, a difference matrix (``symmetric``)
    on +-its largest magnitude."""
    from matplotlib import colormaps  # the colour maps only: pyplot and its figure machinery are not imported

    values = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    rows, columns = values.shape
    vmin, vmax = _limits(values, symmetric)
    colour_map = colormaps[cmap]
    scaled = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    rgba = colour_map(np.nan_to_num(scaled))  # [rows, columns, 4] floats in [0, 1]
    finite = np.isfinite(values)
    rgb = np.where(finite[..., None], np.rint(rgba[..., :3] * 255), 255).astype(np.uint8)
    annotated = []
    if rows <= MAX_ANNOTATED and columns <= MAX_ANNOTATED:
        annotated = [
            CellValue(i, j, f"{values[i, j]:.1f}", text_colour(rgba[i, j]))
            for i, j in zip(*np.nonzero(finite), strict=True)
        ]
    side = max(MIN_CELL_PX, min(CELL_PX, MAX_GRID_PX // max(rows, columns)))
    cell_px = (max(side, -(-MIN_GRID_PX // columns)), max(side, -(-MIN_GRID_PX // rows)))
    bar_steps = max(2, rows * cell_px[1])
    bar = colour_map(np.linspace(1.0, 0.0, bar_steps))[:, :3]
    return HeatmapLayout(
        rgb=rgb,
        vmin=vmin,
        vmax=vmax,
        cell_px=cell_px,
        values=annotated,
        x_ticks=list(range(0, columns, -(-columns // MAX_TICKS))),
        y_ticks=list(range(0, rows, -(-rows // MAX_TICKS))),
        bar_ticks=nice_ticks(vmin, vmax),
        bar_rgb=np.rint(bar * 255).astype(np.uint8),
    )


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib ships it, so the heatmaps look like the report's figures), else PIL's own."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return math.ceil(right - left), math.ceil(bottom - top)


def _bar_label(value: float) -> str:
    return f"{value:g}"


def render(plan: HeatmapLayout, title: str) -> Image.Image:
    """The heatmap of ``plan`` as an RGB image: title on top, the grid with its tick labels and axis labels,
    the colour bar on the right."""
    text_font, value_font = _font(TEXT_FONT_PX), _font(VALUE_FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, columns = plan.shape
    cell_w, cell_h = plan.cell_px
    grid_w, grid_h = columns * cell_w, rows * cell_h
    x_label, y_label = "evaluated on task j", "after training task i"
    line_h = _text_size(measure, "0123456789", text_font)[1]
    title_w = _text_size(measure, title, text_font)[0]
    y_tick_w = max(_text_size(measure, str(t), text_font)[0] for t in plan.y_ticks)
    bar_label_w = max(_text_size(measure, _bar_label(t), text_font)[0] for t in plan.bar_ticks)
    left = GAP_PX + line_h + GAP_PX + y_tick_w + GAP_PX // 2 + TICK_PX
    top = GAP_PX + line_h + GAP_PX * 2
    bottom = TICK_PX + GAP_PX // 2 + line_h + GAP_PX * 2 + line_h + GAP_PX
    bar_left = left + grid_w + GAP_PX * 2
    width = max(bar_left + COLOUR_BAR_PX + TICK_PX + GAP_PX // 2 + bar_label_w + GAP_PX, title_w + 2 * GAP_PX)
    height = top + grid_h + bottom
    image = Image.new("RGB", (width, height), "white")
    cells = np.repeat(np.repeat(plan.rgb, cell_h, axis=0), cell_w, axis=1)
    image.paste(Image.fromarray(np.ascontiguousarray(cells), "RGB"), (left, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + grid_w, top + grid_h), outline="black")
    for value in plan.values:
        centre = (left + value.column * cell_w + cell_w / 2, top + value.row * cell_h + cell_h / 2)
        draw.text(centre, value.text, fill=value.colour, font=value_font, anchor="mm")
    for j in plan.x_ticks:
        x = left + j * cell_w + cell_w // 2
        draw.line((x, top + grid_h, x, top + grid_h + TICK_PX), fill="black")
        draw.text((x, top + grid_h + TICK_PX + GAP_PX // 2), str(j), fill="black", font=text_font, anchor="mt")
    for i in plan.y_ticks:
        y = top + i * cell_h + cell_h // 2
        draw.line((left - 1 - TICK_PX, y, left - 1, y), fill="black")
        draw.text((left - TICK_PX - GAP_PX // 2, y), str(i), fill="black", font=text_font, anchor="rm")
    draw.text((left + grid_w / 2, top + grid_h + bottom - GAP_PX), x_label, fill="black", font=text_font, anchor="md")
    label_w = _text_size(measure, y_label, text_font)[0]
    rotated = Image.new("RGB", (label_w + 2, line_h + 4), "white")
    ImageDraw.Draw(rotated).text((1, 0), y_label, fill="black", font=text_font, anchor="lt")
    rotated = rotated.rotate(90, expand=True)
    image.paste(rotated, (GAP_PX, top + max(0, (grid_h - rotated.height) // 2)))
    # over the grid where it fits, moved in just enough to stay inside the image where it does not
    title_x = min(max(left + grid_w / 2, GAP_PX + title_w / 2), width - GAP_PX - title_w / 2)
    draw.text((title_x, GAP_PX), title, fill="black", font=text_font, anchor="mt")
    bar = np.repeat(plan.bar_rgb[:, None, :], COLOUR_BAR_PX, axis=1)
    bar_image = Image.fromarray(np.ascontiguousarray(bar), "RGB").resize((COLOUR_BAR_PX, grid_h), Image.NEAREST)
    image.paste(bar_image, (bar_left, top))
    draw.rectangle((bar_left - 1, top - 1, bar_left + COLOUR_BAR_PX, top + grid_h), outline="black")
    for tick in plan.bar_ticks:
        y = top + grid_h - (tick - plan.vmin) / (plan.vmax - plan.vmin) * grid_h
        x = bar_left + COLOUR_BAR_PX
        draw.line((x, y, x + TICK_PX, y), fill="black")
        draw.text((x + TICK_PX + GAP_PX // 2, y), _bar_label(tick), fill="black", font=text_font, anchor="lm")
    return image


def matrix_image(matrix: np.ndarray | Sequence[Sequence[float]], title: str, **kwargs) -> Image.Image:
    """The annotated heatmap of ``matrix`` (keyword arguments: ``cmap``, ``symmetric``, as :func:`layout`)."""
    return render(layout(np.asarray(matrix, dtype=np.float64), **kwargs), title)


def save_matrix(matrix: np.ndarray | Sequence[Sequence[float]], title: str, path: Path, **kwargs) -> Path:
    """:func:`matrix_image` written to ``path`` as a PNG."""
    matrix_image(matrix, title, **kwargs).save(path, format="PNG")
    return path
