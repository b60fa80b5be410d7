"""One picture of a sweep: each run's last sample grid side by side, labelled by the factors
that vary between the runs.

    python -m t2ilab.analysis.compare_grids logs/train/multiruns/<timestamp> --out grid.png
    python -m t2ilab.analysis.compare_grids SWEEP --where seed=0 --out grid.png

The runs' grids (samples/step_*.png, the prompts down the side) must share a size, as the runs
of one sweep do. Runs are ordered as `t2ilab.analysis.collect` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from t2ilab.analysis.collect import (
    FACTOR_PREFIX,
    factor_names,
    load_results_and_warn,
    results_root,
    summary,
)
from t2ilab.cli import (
    PNG_SOFTWARE,
    ArgumentParser,
    check_png_output,
    one_line_errors,
    save_marked_png,
)
from t2ilab.errors import UserError

LINE_HEIGHT = 13
LABEL_LINES = 2  # the factors of a run, wrapped
LABEL_HEIGHT = LINE_HEIGHT * (LABEL_LINES + 1) + 3  # + the title line
SOFTWARE = f"{PNG_SOFTWARE}.analysis.compare_grids"


def varying_factors(table) -> list[str]:
    """Factor columns with more than one value among the runs (a run that did not set a
    factor counts as one more value, "-")."""
    columns = [c for c in table.columns if c.startswith(FACTOR_PREFIX)]
    return [c for c in columns if table[c].fillna("-").astype(str).nunique() > 1]


def parse_where(items: list[str]) -> dict[str, str]:
    """`["seed=0", "method.prior=True"]` -> {"seed": "0", "method.prior": "True"}."""
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--where {item}: expected KEY=VALUE: write e.g. --where seed=0")
        where[key] = value
    return where


def _select(table: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    for key, value in where.items():
        column = FACTOR_PREFIX + key
        if column not in table.columns:
            raise UserError(
                f"--where {key}={value}: no factor {key} in the runs: use one of "
                + ", ".join(factor_names(table)[1:])
            )
        values = table[column].astype(str)
        if not (values == value).any():
            raise UserError(
                f"--where {key}={value}: no run has this value: use one of "
                + ", ".join(dict.fromkeys(values))
            )
        table = table[values == value]
    return table


def _wrap(draw: ImageDraw.ImageDraw, label: str, width: int) -> list[str]:
    """`a=1, b=2, ...` in lines of at most `width` pixels, broken between factors."""
    lines = [""]
    for part in label.split(", "):
        candidate = f"{lines[-1]}, {part}" if lines[-1] else part
        if draw.textlength(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(part)
    return lines


def _fits(draw: ImageDraw.ImageDraw, label: str, width: int) -> bool:
    lines = _wrap(draw, label, width)
    return len(lines) <= LABEL_LINES and all(draw.textlength(line) <= width for line in lines)


def _label_lines(draw: ImageDraw.ImageDraw, label: str, width: int) -> list[str]:
    """The label in at most LABEL_LINES lines that fit `width`; what does not fit ends in "…"."""
    lines = _wrap(draw, label, width)
    for i, line in enumerate(lines):
        while draw.textlength(line) > width and len(line) > 1:
            line = line[:-2] + "…"
        lines[i] = line
    if len(lines) > LABEL_LINES:
        lines = lines[:LABEL_LINES]
        lines[-1] = lines[-1][:-2] + "…"
    return lines


def _panel_labels(
    draw: ImageDraw.ImageDraw, names: list[str], values: list[list], width: int
) -> tuple[list[str], str]:
    """(each panel's label, what the title adds): `name=value, ...` when every label fits its
    panel; else the values alone, and the names once in the title."""
    named = [", ".join(f"{n}={v}" for n, v in zip(names, row, strict=True)) for row in values]
    if all(_fits(draw, label, width) for label in named):
        return named, ""
    return [", ".join(map(str, row)) for row in values], f"; labels: {', '.join(names)}"


def short_paths(values: list) -> list:
    """Path-valued factors (e.g. `model.init_from`) as the fewest trailing parts that still tell
    the runs apart: a panel label shows `pixart_ln/stage1`, not the whole absolute path."""
    paths = [v for v in values if isinstance(v, str) and "/" in v]
    if not paths:
        return values
    parts = {v: v.rstrip("/").split("/") for v in paths}
    for keep in range(1, max(map(len, parts.values())) + 1):
        short = {v: "/".join(p[-keep:]) for v, p in parts.items()}
        if len(set(short.values())) == len(parts):
            break
    return [short.get(v, v) if isinstance(v, str) else v for v in values]


def _open_grid(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(
            f"{path} cannot be read as an image ({type(e).__name__}): re-run that run, or "
            "delete the file to show the run's previous grid"
        ) from None


def compare_grids(sweep: Path, where: dict[str, str] | None = None) -> Image.Image:
    root = results_root(sweep)
    table, _ = load_results_and_warn(root)
    all_runs = table
    table = _select(table, where or {})
    factors = varying_factors(table)
    names = [c[len(FACTOR_PREFIX) :].split(".")[-1] for c in factors]
    panels, values = [], []
    for _, row in table.iterrows():
        grids = sorted((root / row["run_dir"] / "samples").glob("step_*.png"))
        if not grids:
            continue
        values.append(["-" if pd.isna(row[c]) else row[c] for c in factors] or [row["run_dir"]])
        step = grids[-1].stem.removeprefix("step_").lstrip("0") or "0"
        panels.append((step, _open_grid(grids[-1])))
    if not panels:
        raise UserError(
            f"no run under {root} has a sample grid (<run>/samples/step_*.png; "
            f"{summary(all_runs)}): the samples callback writes one at the end of each run "
            "that finishes; keep callbacks.samples on, or pick runs that finished"
        )
    columns = [short_paths(list(column)) for column in zip(*values, strict=True)]
    values = [list(row) for row in zip(*columns, strict=True)]
    width, height = panels[0][1].size
    if any(panel.size != (width, height) for _, panel in panels):
        raise UserError(f"{root}: the runs' sample grids differ in size: compare one sweep")
    out = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    labels, names_note = _panel_labels(draw, names or ["run"], values, width - 4)
    steps = list(dict.fromkeys(step for step, _ in panels))
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(steps)}"
    title = f"{root.resolve().name}: each run's last sample grid ({at})"
    if where:
        title += ", " + ", ".join(f"{k}={v}" for k, v in where.items())
    draw.text((2, 1), title + names_note, fill="black")
    for i, (label, (_, panel)) in enumerate(zip(labels, panels, strict=True)):
        out.paste(panel, (i * width, LABEL_HEIGHT))
        for j, line in enumerate(_label_lines(draw, label, width - 4)):
            draw.text((i * width + 2, LINE_HEIGHT * (j + 1) + 1), line, fill="black")
    return out


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m t2ilab.analysis.compare_grids", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", type=Path, help="a multirun folder (or one run folder)")
    parser.add_argument("--out", type=Path, required=True, help="PNG path to write")
    parser.add_argument(
        "--where", nargs="*", default=[], metavar="KEY=VALUE", help="keep runs with these factors"
    )
    args = parser.parse_args(argv)
    where = parse_where(args.where)
    out = check_png_output(args.out.expanduser())
    picture = compare_grids(args.sweep, where)
    try:
        save_marked_png(picture, out, SOFTWARE)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}): choose a writable --out") from e
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
