"""One picture of a sweep: each run's last sample grid side by side, labelled by the factors
that vary between the runs.

    python -m t2ilab.analysis.compare_grids logs/train/multiruns/<timestamp> --out grid.png
    python -m t2ilab.analysis.compare_grids SWEEP --where seed=0 --out grid.png

The runs' grids (samples/step_*.png, the prompts down the side) must share a size, as the runs
of one sweep do. Runs are ordered as `t2ilab.analysis.collect` lists them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from t2ilab.analysis.collect import FACTOR_PREFIX, load_results
from t2ilab.errors import UserError

LABEL_HEIGHT = 28


def varying_factors(table) -> list[str]:
    """Factor columns with more than one value among the runs (a run that did not set a
    factor counts as one more value, "-")."""
    columns = [c for c in table.columns if c.startswith(FACTOR_PREFIX)]
    return [c for c in columns if table[c].fillna("-").astype(str).nunique() > 1]


def compare_grids(sweep: Path, where: dict[str, str] | None = None) -> Image.Image:
    table = load_results(sweep)
    for key, value in (where or {}).items():
        column = FACTOR_PREFIX + key
        if column not in table.columns:
            raise UserError(f"--where {key}=...: no factor {key} in {sweep}")
        table = table[table[column].astype(str) == value]
    factors = varying_factors(table)
    panels = []
    for _, row in table.iterrows():
        grids = sorted((sweep / row["run_dir"] / "samples").glob("step_*.png"))
        if not grids:
            continue
        names = [c[len(FACTOR_PREFIX) :].split(".")[-1] for c in factors]
        values = ["-" if pd.isna(row[c]) else row[c] for c in factors]
        label = ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
        panels.append((label, Image.open(grids[-1]).convert("RGB")))
    if not panels:
        raise UserError(f"{sweep}: no run has a samples/step_*.png grid (callbacks.samples)")
    width, height = panels[0][1].size
    if any(panel.size != (width, height) for _, panel in panels):
        raise UserError(f"{sweep}: the runs' sample grids differ in size; compare one sweep")
    out = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, panel) in enumerate(panels):
        out.paste(panel, (i * width, LABEL_HEIGHT))
        # two lines of at most ~width/6 characters each: the factors of this run
        cut = max(1, width // 6)
        draw.text((i * width + 2, 1), label[:cut], fill="black")
        draw.text((i * width + 2, 14), label[cut : 2 * cut], fill="black")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (or one run folder)")
    parser.add_argument("--out", type=Path, required=True, help="PNG path to write")
    parser.add_argument(
        "--where", nargs="*", default=[], metavar="KEY=VALUE", help="keep runs with these factors"
    )
    args = parser.parse_args(argv)
    where = dict(item.split("=", 1) for item in args.where)
    compare_grids(args.sweep, where).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
