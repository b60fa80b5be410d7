"""Figures of an ANOVA: the metric per level of each factor, and the input x output position
heatmap of mean metric (the figures of Xiang et al. 2023).

matplotlib is optional: it is imported only when a figure is drawn, through the Agg canvas
(no pyplot, no display, no global backend switch), and its absence raises
PlottingUnavailable, one line that says how to get it. The data behind the heatmap
(`heatmap_grid`) needs only pandas.

`data` is a model frame of `t2ilab.analysis.anova` (`AnovaResult.data`): one row per run,
factor columns holding string levels, and the metric column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from t2ilab.analysis.levels import distinct_decimals, level_order, short
from t2ilab.errors import UserError
from t2ilab.utils.atomic import atomic_file

INPUT_POSITION = "input_position"
OUTPUT_POSITION = "output_position"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class PlottingUnavailable(UserError):
    """matplotlib is not installed: figures are skipped, tables are still written."""


def new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlottingUnavailable(
            "figures need matplotlib, which is not installed (pip install matplotlib); "
            "the ANOVA tables were written without them"
        ) from e
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches the Agg canvas: PNGs without pyplot or a display
    return figure


def save_png(figure: Any, path: Path, tool: str = "t2ilab.analysis.anova") -> Path:
    """PNG via a temp file in the same folder, so a crash never leaves half an image; the
    "Software" text chunk names the tool, so that a rerun knows the file is its own."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, metadata={"Software": tool})
    return path


def plain_numbers(axis: Any) -> None:
    """Tick labels as the values themselves: no `1e-5+8.219e-1` offset, no scientific
    multiplier, however close together the values are."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def file_stem(column: str) -> str:
    """`factor.adapter.input_position` -> `adapter.input_position`, safe as a file name."""
    return _UNSAFE.sub("_", short(column)).strip("_") or "factor"


def find_position_pair(columns: Sequence[str]) -> tuple[str, str] | None:
    """The first (…input_position, …output_position) pair among `columns`, else None."""
    inputs = [c for c in columns if short(c).endswith(INPUT_POSITION)]
    outputs = [c for c in columns if short(c).endswith(OUTPUT_POSITION)]
    return (inputs[0], outputs[0]) if inputs and outputs else None


def heatmap_grid(
    data: pd.DataFrame,
    metric_column: str,
    row: str,
    col: str,
    levels: tuple[Sequence[str], Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Mean metric per (row level, col level); NaN where the sweep has no ok run of that cell.
    Index and columns are the levels in `level_order` (or `levels`, e.g. also those of skipped
    runs), named by the factors."""
    rows, cols = levels or (level_order(data[row]), level_order(data[col]))
    means = data.groupby([row, col], sort=False)[metric_column].mean().unstack(col)
    grid = means.reindex(index=list(rows), columns=list(cols)).astype(float)
    grid.index.name, grid.columns.name = short(row), short(col)
    return grid


def box_figure(data: pd.DataFrame, metric_column: str, factor: str) -> Any:
    """The metric per level of `factor`: boxes with every run as a jittered point."""
    metric = short(metric_column)
    levels = level_order(data[factor])
    groups = [data.loc[data[factor] == level, metric_column].to_numpy(float) for level in levels]
    figure = new_figure(max(4.5, 0.9 * len(levels) + 2.0), 3.8)
    ax = figure.add_subplot()
    positions = np.arange(1, len(levels) + 1)
    ax.boxplot(groups, positions=positions, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)  # the same figure every time
    for x, values in zip(positions, groups, strict=True):
        ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6)
    ax.set_xticks(positions, levels, rotation=30 if len(levels) > 4 else 0)
    plain_numbers(ax.yaxis)
    ax.set_xlabel(short(factor))
    ax.set_ylabel(f"{metric} (one dot per run)")
    ax.set_title(
        f"{metric} by {short(factor)}\n{len(data)} ok runs; box: quartiles, line: median",
        fontsize=9,
    )
    return figure


def box_plot(data: pd.DataFrame, metric_column: str, factor: str, path: Path) -> Path:
    """`box_figure` as the PNG `path`."""
    return save_png(box_figure(data, metric_column, factor), path)


def box_plots(
    data: pd.DataFrame, metric_column: str, factors: Sequence[str], out_dir: Path
) -> list[Path]:
    """`box_<factor>.png` in `out_dir` for each factor."""
    return [
        box_plot(data, metric_column, f, Path(out_dir) / f"box_{file_stem(f)}.png") for f in factors
    ]


MISSING_HATCH = "///"
# What a cell without a mean says, and what the legend says that means.
MISSING_MEANINGS = {
    "skipped": "skipped (the configuration cannot run)",
    "failed": "failed (see the run's reason)",
    "n/a": "n/a (no run with the metric)",
}


def _mark_missing(ax: Any, i: int, j: int, note: str) -> None:
    from matplotlib.patches import Rectangle

    box = Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="0.6")
    box.set_hatch(MISSING_HATCH)
    ax.add_patch(box)
    ax.text(
        j,
        i,
        note,
        ha="center",
        va="center",
        fontsize=8,
        color="0.25",
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
    )


def heatmap_figure(
    data: pd.DataFrame,
    metric_column: str,
    row: str,
    col: str,
    notes: dict[tuple[str, str], str] | None = None,
    levels: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Any:
    """Mean metric over (row level, col level), each cell labelled with as many digits as tell
    the cells apart; a cell without a mean is hatched and says why (`notes[(row, col)]`:
    skipped, failed; else n/a), and a legend says what the hatching means."""
    from matplotlib import colormaps  # importable: new_figure checks matplotlib
    from matplotlib.patches import Patch

    grid = heatmap_grid(data, metric_column, row, col, levels)
    values = grid.to_numpy(float)
    metric = short(metric_column)
    figure = new_figure(max(4.5, 0.9 * len(grid.columns) + 3.0), max(3.4, 0.6 * len(grid) + 2.4))
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormaps["viridis"], aspect="auto")
    low, high = np.nanmin(values), np.nanmax(values)
    decimals = distinct_decimals(values)
    shown = set()
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            light = high > low and (value - low) / (high - low) > 0.6
            color = "black" if light else "white"
            ax.text(
                j, i, f"{value:.{decimals}f}", ha="center", va="center", color=color, fontsize=8
            )
        else:
            note = (notes or {}).get((grid.index[i], grid.columns[j]), "n/a")
            _mark_missing(ax, i, j, note)
            shown.add(note)
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=30)
    ax.set_yticks(range(len(grid.index)), [str(r) for r in grid.index])
    ax.set_xlim(-0.5, len(grid.columns) - 0.5)
    ax.set_ylim(len(grid.index) - 0.5, -0.5)
    ax.set_xlabel(short(col))
    ax.set_ylabel(short(row))
    runs = int(data[metric_column].notna().sum())
    ax.set_title(f"mean {metric} per cell ({runs} ok runs)", fontsize=10)
    colorbar = figure.colorbar(image, ax=ax, label=f"mean {metric}")
    plain_numbers(colorbar.ax.yaxis)
    if shown:
        hatch = Patch(facecolor="white", edgecolor="0.6", hatch=MISSING_HATCH)
        meaning = "; ".join(MISSING_MEANINGS.get(n, n) for n in sorted(shown))
        figure.legend(
            [hatch], [f"hatched, no mean: {meaning}"], loc="outside lower center", fontsize=8
        )
    return figure


def heatmap(
    data: pd.DataFrame,
    metric_column: str,
    row: str,
    col: str,
    out_dir: Path,
    name: str = "heatmap.png",
    notes: dict[tuple[str, str], str] | None = None,
    levels: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Path:
    """`heatmap_figure` as `out_dir`/`name`."""
    figure = heatmap_figure(data, metric_column, row, col, notes, levels)
    return save_png(figure, Path(out_dir) / name)
