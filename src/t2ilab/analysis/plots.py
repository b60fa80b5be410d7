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

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from t2ilab.analysis.anova import level_order, short
from t2ilab.errors import UserError

INPUT_POSITION = "input_position"
OUTPUT_POSITION = "output_position"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class PlottingUnavailable(UserError):
    """matplotlib is not installed: figures are skipped, tables are still written."""


def _figure(width: float, height: float) -> Any:
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


def _save(figure: Any, path: Path) -> Path:
    """PNG via a temp file in the same folder, so a crash never leaves half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_stem(column: str) -> str:
    """`factor.adapter.input_position` -> `adapter.input_position`, safe as a file name."""
    return _UNSAFE.sub("_", short(column)).strip("_") or "factor"


def find_position_pair(columns: Sequence[str]) -> tuple[str, str] | None:
    """The first (…input_position, …output_position) pair among `columns`, else None."""
    inputs = [c for c in columns if short(c).endswith(INPUT_POSITION)]
    outputs = [c for c in columns if short(c).endswith(OUTPUT_POSITION)]
    return (inputs[0], outputs[0]) if inputs and outputs else None


def heatmap_grid(data: pd.DataFrame, metric_column: str, row: str, col: str) -> pd.DataFrame:
    """Mean metric per (row level, col level); NaN where the sweep has no run of that cell.
    Index and columns are the levels in `level_order`, named by the factors."""
    rows = level_order(data[row])
    cols = level_order(data[col])
    means = data.groupby([row, col], sort=False)[metric_column].mean().unstack(col)
    grid = means.reindex(index=rows, columns=cols).astype(float)
    grid.index.name, grid.columns.name = short(row), short(col)
    return grid


def box_plot(data: pd.DataFrame, metric_column: str, factor: str, path: Path) -> Path:
    """The metric per level of `factor`: boxes with every run as a jittered point."""
    levels = level_order(data[factor])
    groups = [data.loc[data[factor] == level, metric_column].to_numpy(float) for level in levels]
    figure = _figure(max(4.0, 0.9 * len(levels) + 2.0), 3.6)
    ax = figure.add_subplot()
    positions = np.arange(1, len(levels) + 1)
    ax.boxplot(groups, positions=positions, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)  # the same figure every time
    for x, values in zip(positions, groups, strict=True):
        ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6)
    ax.set_xticks(positions, levels, rotation=30 if len(levels) > 4 else 0)
    ax.set_xlabel(short(factor))
    ax.set_ylabel(short(metric_column))
    ax.set_title(f"{short(metric_column)} by {short(factor)}")
    return _save(figure, path)


def box_plots(
    data: pd.DataFrame, metric_column: str, factors: Sequence[str], out_dir: Path
) -> list[Path]:
    """`box_<factor>.png` in `out_dir` for each factor."""
    return [
        box_plot(data, metric_column, f, Path(out_dir) / f"box_{file_stem(f)}.png") for f in factors
    ]


def heatmap(
    data: pd.DataFrame,
    metric_column: str,
    row: str,
    col: str,
    out_dir: Path,
    name: str = "heatmap.png",
) -> Path:
    """Mean metric over (row level, col level), each cell annotated; missing cells empty."""
    grid = heatmap_grid(data, metric_column, row, col)
    values = grid.to_numpy(float)
    figure = _figure(max(4.0, 0.8 * len(grid.columns) + 2.5), max(3.0, 0.6 * len(grid) + 1.8))
    from matplotlib import colormaps  # importable: _figure succeeded

    ax = figure.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    low, high = np.nanmin(values), np.nanmax(values)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            light = high > low and (value - low) / (high - low) > 0.6
            color = "black" if light else "white"
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=30)
    ax.set_yticks(range(len(grid.index)), [str(r) for r in grid.index])
    ax.set_xlabel(short(col))
    ax.set_ylabel(short(row))
    ax.set_title(f"mean {short(metric_column)}")
    figure.colorbar(image, ax=ax, label=short(metric_column))
    return _save(figure, Path(out_dir) / name)
