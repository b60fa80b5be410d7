"""Aggregate the results.json files of a sweep into one tidy table (CSV + markdown).

    python -m t2ilab.analysis.collect multirun/2024-01-01/12-00-00
    python -m t2ilab.analysis.collect outputs/run --out table.csv --markdown table.md

One row per run: `run_dir` (relative to the given folder), `experiment`, `status`, `reason`,
`steps`, `wall_time_s`, then `factor.<dotted key>` and `metric.<name>` columns (the union over
runs; a run without one gets NaN). results.csv holds every column; results.md and the printed
table leave out the columns that are the same in every run and list them once above the table
("Same in every run: model.name=toy_sd, seed=0"). A corrupt results.json is reported and
skipped, so one broken run never blocks the table of the others (if none can be read, the
command fails and names the file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from t2ilab.cli import (
    ArgumentParser,
    check_output,
    first_line,
    one_line_errors,
    print_warning,
    text_starts_with,
)
from t2ilab.errors import UserError
from t2ilab.utils.atomic import write_text_atomic

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


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the results, None), or (None, why the file cannot be used)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return None, f"not valid JSON, truncated or corrupt ({e})"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({e})"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {type(data).__name__}"
    for key in ("factors", "metrics"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return None, f"'{key}' must be a mapping, got {type(data[key]).__name__}"
    return data, None


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


def results_root(path: str | os.PathLike) -> Path:
    """The folder to search: `path` itself, or the run folder of a results.json. Raises
    UserError when it does not exist or is some other file."""
    root = Path(path).expanduser()
    if root.is_file() and root.name == RESULTS_FILE:
        return root.parent  # one run's results.json: its run folder
    if not root.exists():
        raise UserError(
            f"{root} does not exist: point at a run folder or a multirun sweep folder "
            "(e.g. logs/train/multiruns/<timestamp>)"
        )
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder: point at the run or sweep folder")
    return root


def load_results(root: str | os.PathLike) -> pd.DataFrame:
    """One row per readable results.json under `root`; columns as in the module docstring.

    Raises UserError when `root` is not a folder or holds no readable results.json; warns
    (UnreadableResults) for each file it skips.
    """
    root = results_root(root)
    files = find_results(root)
    if not files:
        raise UserError(
            f"no {RESULTS_FILE} under {root}: point at a run folder or a multirun sweep "
            "folder (e.g. logs/train/multiruns/<timestamp>)"
        )
    rows, problems = [], []
    for path in files:
        data, problem = _read(path)
        if data is None:
            problems.append(f"{path}: {problem}")
        else:
            rows.append(_row(data, path.parent.relative_to(root).as_posix()))
    if not rows:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"none of the {len(files)} {RESULTS_FILE} under {root} can be read, so there is "
            f"nothing to analyse: {problems[0]}{more}: re-run those runs or restore the files"
        )
    for problem in problems:
        warnings.warn(
            f"skipping {problem}; the other runs are used", UnreadableResults, stacklevel=2
        )

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


SAME_LINE = "Same in every {noun}:"
EMPTY_LINE = "Empty in every {noun}:"
LONG_VALUE = 40  # characters; a longer path in the "same in every run" line is shortened
PATH_PARTS_KEPT = 3


def _shorten_path(text: str) -> str:
    """A long path as its last parts (`.../dreambooth/dataset/dog`): the part that tells runs
    and sweeps apart; anything that is not a path stays as it is."""
    parts = [p for p in text.split("/") if p]
    if len(text) <= LONG_VALUE or len(parts) <= PATH_PARTS_KEPT or any(c.isspace() for c in text):
        return text
    return ".../" + "/".join(parts[-PATH_PARTS_KEPT:])


def _column_label(column: str) -> str:
    """The name a user typed: `factor.model.name` -> `model.name` (`factor.experiment` keeps
    its prefix: `experiment` is a column of its own)."""
    name = column[len(FACTOR_PREFIX) :] if column.startswith(FACTOR_PREFIX) else column
    return column if name in BASE_COLUMNS else name


def split_constant_columns(
    df: pd.DataFrame, keep: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, dict[str, str]]:
    """(the table without the columns whose cells read the same in every row, {dropped column:
    its cell text, "" when empty everywhere}). `keep` columns always stay; with fewer than two
    rows nothing is dropped (one run has no "same in every run")."""
    if len(df) < 2:
        return df, {}
    constant: dict[str, str] = {}
    for column in df.columns:
        cells = {_format_cell(v) for v in df[column].astype(object)}
        if column not in keep and len(cells) == 1:
            constant[column] = cells.pop()
    return df.drop(columns=list(constant)), constant


def constant_lines(constant: dict[str, str], noun: str = "run") -> list[str]:
    """`Same in every run: model.name=toy_sd, seed=0` and `Empty in every run: reason`."""
    same = [f"{_column_label(c)}={_shorten_path(v)}" for c, v in constant.items() if v]
    empty = [c for c, v in constant.items() if not v]
    lines = []
    if same:
        lines.append(SAME_LINE.format(noun=noun) + " " + ", ".join(same))
    if empty:
        line = EMPTY_LINE.format(noun=noun) + " " + ", ".join(_column_label(c) for c in empty)
        if any(c.startswith(FACTOR_PREFIX) for c in empty):
            line += " (a factor left empty is null in results.json: the model's own value)"
        lines.append(line)
    return lines


def readable_markdown(df: pd.DataFrame, keep: tuple[str, ...], noun: str = "run") -> str:
    """The table for people (results.md and the terminal): columns that are the same in every
    row are listed once above it instead of repeated; the CSV keeps every column."""
    varying, constant = split_constant_columns(df, keep)
    return "\n\n".join([*constant_lines(constant, noun), to_markdown(varying)])


def summary(df: pd.DataFrame, skipped_files: int = 0) -> str:
    """`3 runs: 2 ok, 1 failed, 0 skipped` (+ other statuses and unreadable files, if any)."""
    counts = df["status"].fillna("unknown").astype(str).value_counts()
    parts = [f"{int(counts.get(s, 0))} {s}" for s in STATUSES]
    parts += [f"{int(n)} {s}" for s, n in counts.items() if s not in STATUSES]
    text = f"{len(df)} run{'s' if len(df) != 1 else ''}: " + ", ".join(parts)
    if skipped_files:
        text += f" ({skipped_files} unreadable {RESULTS_FILE} skipped)"
    return text


def factor_names(df: pd.DataFrame) -> list[str]:
    """What a user may group or filter by: `experiment` and every factor key of the runs."""
    names = [c[len(FACTOR_PREFIX) :] for c in df.columns if c.startswith(FACTOR_PREFIX)]
    return list(dict.fromkeys(["experiment", *names]))


def group_means(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean, std and standard error of the mean (std / sqrt(runs)) of every metric over the ok
    runs of each value of `by` (e.g. the paper's average over 30 subjects per method:
    --group-by experiment), with the run count."""
    column = f"factor.{by}" if f"factor.{by}" in df.columns else by
    if column not in df.columns:
        raise UserError(
            f"--group-by {by}: no run has this factor: use one of {', '.join(factor_names(df))}"
        )
    ok = df[df["status"] == "ok"]
    metric_columns = [c for c in ok.columns if c.startswith("metric.")]
    grouped = ok.groupby(column, dropna=False)[metric_columns]
    table = grouped.mean().add_suffix(".mean").join(grouped.std().add_suffix(".std"))
    table = table.join(grouped.sem().add_suffix(".sem"))
    table = table[sorted(table.columns)]
    table.insert(0, "runs", ok.groupby(column, dropna=False).size())
    return table.reset_index()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
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
        help="also print metric mean/std/sem per value of this factor (e.g. experiment), "
        "written to DIR/results_by_<factor>.csv",
    )
    return parser.parse_args(argv)


def load_results_and_warn(root: str | os.PathLike) -> tuple[pd.DataFrame, int]:
    """`load_results`, each skipped file printed as one `t2ilab: warning:` line; returns the
    table and how many files were skipped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableResults)
        df = load_results(root)
    skipped = 0
    for w in caught:
        if issubclass(w.category, UnreadableResults):
            skipped += 1
            print_warning(w.message)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return df, skipped


# What this tool wrote before, by the first line, so that a rerun replaces its own tables and
# never a file of the user's that happens to have the same name.
def _is_results_csv(path: Path) -> bool:
    return text_starts_with(path, ",".join(BASE_COLUMNS))


def _is_results_md(path: Path) -> bool:
    noun = "run"
    starts = ("| run_dir", SAME_LINE.format(noun=noun), EMPTY_LINE.format(noun=noun))
    return text_starts_with(path, *starts)


def _is_grouped_csv(path: Path) -> bool:
    header = first_line(path).split(",")
    return len(header) >= 2 and header[1] == "runs"


def _write_tables(tables: dict[Path, str]) -> None:
    try:
        for path, text in tables.items():
            write_text_atomic(path, text, newline="")
    except OSError as e:
        raise UserError(
            f"cannot write {e.filename or 'the table'} ({e.strerror or e}): "
            "choose a writable place with --out and --markdown"
        ) from e


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    root = results_root(args.dir)
    # every output is checked before anything is read or written
    csv_path = check_output(
        (args.out or root / "results.csv").expanduser(), "--out", _is_results_csv
    )
    md_path = check_output(
        (args.markdown or root / "results.md").expanduser(), "--markdown", _is_results_md
    )
    df, skipped = load_results_and_warn(root)
    tables = {csv_path: df.to_csv(index=False)}
    grouped = None
    if args.group_by:
        grouped = group_means(df, args.group_by)
        grouped_path = root / f"results_by_{args.group_by.replace('.', '_')}.csv"
        tables[check_output(grouped_path, "--group-by", _is_grouped_csv)] = grouped.to_csv(
            index=False
        )
    if not (df["status"] == "ok").any():
        print_warning(
            f"no run is ok ({summary(df)}): there are no metrics to compare; the table "
            "shows each run's reason"
        )
    markdown = readable_markdown(df, keep=("run_dir",))
    tables[md_path] = markdown + "\n"
    _write_tables(tables)
    print(markdown)
    print(f"{summary(df, skipped)} -> {csv_path}, {md_path}")
    if grouped is not None:
        print(readable_markdown(grouped, keep=(grouped.columns[0],), noun="group"))
        print(f"-> {grouped_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
