"""Aggregate the results.json files of a sweep into one tidy table (CSV + markdown).

    python -m t2ilab.analysis.collect multirun/2024-01-01/12-00-00
    python -m t2ilab.analysis.collect outputs/run --out table.csv --markdown table.md

One row per run: `run_dir` (relative to the given folder), `experiment`, `status`, `reason`,
`steps`, `wall_time_s`, then `factor.<dotted key>` and `metric.<name>` columns (the union over
runs; a run without one gets NaN). A corrupt results.json is reported and skipped, so one
broken run never blocks the table of the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from t2ilab.errors import UserError

RESULTS_FILE = "results.json"
BASE_COLUMNS = ["run_dir", "experiment", "status", "reason", "steps", "wall_time_s"]
FACTOR_PREFIX = "factor."
METRIC_PREFIX = "metric."
STATUSES = ("ok", "failed", "skipped")
# Metric columns come in this order (t2ilab.metrics.METRIC_NAMES, repeated here so that the
# aggregator does not import torch); any other metric follows, alphabetically.
METRIC_ORDER = ("dino", "clip_i", "clip_t", "pres", "div", "prior_div", "fid", "kid")


class UnreadableResults(UserWarning):
    """A results.json that could not be read or parsed; its run is left out of the table."""


def _natural_key(path: str) -> list[Any]:
    # multirun subdirs are 0, 1, ..., 10: sort them as numbers, not as strings
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def find_results(root: str | os.PathLike) -> list[Path]:
    """Every results.json under `root` (itself included), in natural run order."""
    root = Path(root)
    files = [p for p in root.rglob(RESULTS_FILE) if p.is_file()]
    return sorted(files, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"skipping {path}: unreadable ({e})", UnreadableResults, stacklevel=3)
        return None
    if not isinstance(data, dict):
        warnings.warn(
            f"skipping {path}: expected a JSON object, got {type(data).__name__}",
            UnreadableResults,
            stacklevel=3,
        )
        return None
    for key in ("factors", "metrics"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            warnings.warn(
                f"skipping {path}: '{key}' must be a mapping, got {type(data[key]).__name__}",
                UnreadableResults,
                stacklevel=3,
            )
            return None
    return data


def _cell(value: Any) -> Any:
    """Factor values as table cells: lists and dicts become JSON strings, scalars stay."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _metric(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _row(data: dict[str, Any], run_dir: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run_dir": run_dir}
    for key in BASE_COLUMNS[1:]:
        row[key] = data.get(key)
    for key, value in (data.get("factors") or {}).items():
        row[FACTOR_PREFIX + str(key)] = _cell(value)
    for key, value in (data.get("metrics") or {}).items():
        row[METRIC_PREFIX + str(key)] = _metric(value)
    return row


def _metric_sort_key(column: str) -> tuple[int, str]:
    name = column[len(METRIC_PREFIX) :]
    rank = METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER)
    return rank, name


def load_results(root: str | os.PathLike) -> pd.DataFrame:
    """One row per readable results.json under `root`; columns as in the module docstring.

    Raises UserError when `root` is not a folder or holds no readable results.json; warns
    (UnreadableResults) for each file it skips.
    """
    root = Path(root).expanduser()
    if root.is_file() and root.name == RESULTS_FILE:
        root = root.parent  # one run's results.json: its run folder
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise UserError(f"{what}: {root}")
    files = find_results(root)
    if not files:
        raise UserError(
            f"no {RESULTS_FILE} under {root}: point at a run or a multirun sweep folder"
        )
    rows = []
    for path in files:
        data = _read(path)
        if data is not None:
            rows.append(_row(data, path.parent.relative_to(root).as_posix()))
    if not rows:
        raise UserError(f"none of the {len(files)} {RESULTS_FILE} files under {root} is readable")

    # factors in first-seen order (the order a sweep's overrides were given), metrics canonical
    factors: dict[str, None] = {}
    metrics: dict[str, None] = {}
    for row in rows:
        for column in row:
            if column.startswith(FACTOR_PREFIX):
                factors.setdefault(column)
            elif column.startswith(METRIC_PREFIX):
                metrics.setdefault(column)
    columns = BASE_COLUMNS + list(factors) + sorted(metrics, key=_metric_sort_key)
    df = pd.DataFrame(rows, columns=columns)
    df["wall_time_s"] = pd.to_numeric(df["wall_time_s"], errors="coerce")
    steps = pd.to_numeric(df["steps"], errors="coerce")
    whole = steps.dropna()
    df["steps"] = steps.astype("Int64") if (whole == whole.round()).all() else steps
    for column in metrics:
        df[column] = df[column].astype(float)
    return df


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    # a pipe would end the cell; a newline would end the row
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _pipe_table(df: pd.DataFrame) -> str:
    """A GitHub pipe table, for when `tabulate` (behind DataFrame.to_markdown) is missing."""
    header = [str(c) for c in df.columns]
    body = [[_format_cell(v) for v in row] for row in df.astype(object).itertuples(index=False)]
    widths = [max([len(h), 3, *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if num else "-" * (w + 2)
        for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(header), rule + "|", *(line(r) for r in body)])


def to_markdown(df: pd.DataFrame) -> str:
    """The table as markdown: DataFrame.to_markdown when tabulate is installed, else a
    hand-written pipe table of the same shape (header, rule, one line per run)."""
    try:
        import tabulate  # noqa: F401  (optional; pandas needs it for to_markdown)
    except ImportError:
        return _pipe_table(df)
    return df.to_markdown(index=False, missingval="")


def summary(df: pd.DataFrame, skipped_files: int = 0) -> str:
    """`3 runs: 2 ok, 1 failed, 0 skipped` (+ other statuses and unreadable files, if any)."""
    counts = df["status"].fillna("unknown").astype(str).value_counts()
    parts = [f"{int(counts.get(s, 0))} {s}" for s in STATUSES]
    parts += [f"{int(n)} {s}" for s, n in counts.items() if s not in STATUSES]
    text = f"{len(df)} run{'s' if len(df) != 1 else ''}: " + ", ".join(parts)
    if skipped_files:
        text += f" ({skipped_files} unreadable {RESULTS_FILE} skipped)"
    return text


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def group_means(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean and std of every metric over the ok runs of each value of `by` (e.g. the paper's
    average over 30 subjects per method: --group-by experiment), with the run count."""
    column = f"factor.{by}" if f"factor.{by}" in df.columns else by
    if column not in df.columns:
        raise UserError(f"--group-by {by}: no such column; use a factor such as experiment")
    ok = df[df["status"] == "ok"]
    metric_columns = [c for c in ok.columns if c.startswith("metric.")]
    grouped = ok.groupby(column, dropna=False)[metric_columns]
    table = grouped.mean().add_suffix(".mean").join(grouped.std().add_suffix(".std"))
    table = table[sorted(table.columns)]
    table.insert(0, "runs", ok.groupby(column, dropna=False).size())
    return table.reset_index()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2ilab.analysis.collect",
        description="Collect every results.json under DIR (a run or a Hydra multirun folder) "
        "into one table: one row per run, factor.* and metric.* columns.",
    )
    parser.add_argument("dir", type=Path, help="a run folder or a multirun sweep folder")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default DIR/results.csv)")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="markdown path (default DIR/results.md)"
    )
    parser.add_argument(
        "--group-by",
        default=None,
        help="also print metric mean/std per value of this factor (e.g. experiment), "
        "written to DIR/results_by_<factor>.csv",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    root = args.dir.expanduser()
    if root.is_file() and root.name == RESULTS_FILE:
        root = root.parent
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableResults)
        try:
            df = load_results(root)
        except UserError as e:
            error = e
    skipped = 0
    for w in caught:
        if issubclass(w.category, UnreadableResults):
            skipped += 1
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2

    markdown = to_markdown(df)
    csv_path = (args.out or root / "results.csv").expanduser()
    md_path = (args.markdown or root / "results.md").expanduser()
    try:
        _write_atomic(csv_path, df.to_csv(index=False))
        _write_atomic(md_path, markdown + "\n")
    except OSError as e:
        print(f"error: cannot write the table: {e}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"{summary(df, skipped)} -> {csv_path}, {md_path}")
    if args.group_by:
        try:
            grouped = group_means(df, args.group_by)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        grouped_path = root / f"results_by_{args.group_by.replace('.', '_')}.csv"
        _write_atomic(grouped_path, grouped.to_csv(index=False))
        print(to_markdown(grouped))
        print(f"-> {grouped_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
