"""Paired differences across seeds: is an effect larger than the seed spread?

    python -m t2ilab.analysis.paired SWEEP --factor data.identifier --baseline sks
    python -m t2ilab.analysis.paired SWEEP --factor noise.snr_gamma --metrics dino prior_div

A sweep that crosses a factor with seeds (`data.identifier=sks,plain seed=0,1,2,3`) gives, for
each seed, runs that differ in that factor alone. Each level is compared with the baseline
level run by run: runs are paired when every other factor (the seed among them) is equal, and
the table gives, per metric, the mean over the pairs of (level - baseline), its standard error
and a t confidence interval (scipy's `ttest_rel`). When the interval excludes 0 the effect is
larger than what the seeds alone move; otherwise the sweep cannot tell it from seed noise. The
table is printed and written to SWEEP/paired_<factor>.csv.

Factors that come with a level are part of it, not a reason to leave runs unpaired: each of
the four Improved-DreamBooth arms (`experiment=...`) sets its own noise.beta_schedule and
noise.zero_terminal_snr, so those are compared along with the experiment.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from t2ilab.analysis.collect import (
    FACTOR_PREFIX,
    METRIC_ORDER,
    METRIC_PREFIX,
    factor_names,
    load_results_and_warn,
    results_root,
)
from t2ilab.cli import ArgumentParser, check_output, first_line, one_line_errors
from t2ilab.errors import UserError
from t2ilab.utils.atomic import write_text_atomic

COLUMNS = [
    "level",
    "metric",
    "pairs",
    "baseline_mean",
    "level_mean",
    "difference",
    "se",
    "ci_low",
    "ci_high",
    "beyond_seed_spread",
]


def _key(value) -> str:
    """Factor values compared as text (NaN: the factor was not set in that run)."""
    return "" if isinstance(value, float) and math.isnan(value) else str(value)


def other_factors(ok: pd.DataFrame, column: str) -> list[str]:
    return [c for c in ok.columns if c.startswith(FACTOR_PREFIX) and c != column]


def factors_of_the_level(ok: pd.DataFrame, column: str) -> list[str]:
    """The other factors that each level of `column` fixes to one value, and that differ between
    levels: an experiment's beta schedule, say. They belong to the level compared."""
    found = []
    for other in other_factors(ok, column):
        keys = ok[other].map(_key)
        fixed = keys.groupby(ok[column].map(_key)).nunique().le(1).all()
        if fixed and keys.nunique() > 1:
            found.append(other)
    return found


def paired_differences(
    df: pd.DataFrame,
    factor: str,
    baseline: str,
    metrics: list[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per (other level, metric): the paired comparison with the baseline level."""
    from scipy import stats

    column = FACTOR_PREFIX + factor
    if column not in df.columns:
        raise UserError(
            f"--factor {factor}: no run has this factor: use one of {', '.join(factor_names(df))}"
        )
    ok = df[df["status"] == "ok"].copy()
    ok["_level"] = ok[column].map(_key)
    levels = list(dict.fromkeys(ok["_level"]))
    if baseline not in levels:
        raise UserError(
            f"--baseline {baseline}: no ok run has {factor}={baseline}: use one of "
            f"{', '.join(levels) or '(none)'}"
        )
    available = [c[len(METRIC_PREFIX) :] for c in ok.columns if c.startswith(METRIC_PREFIX)]
    metrics = metrics or sorted(
        available, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else 99, m)
    )
    missing = [m for m in metrics if m not in available]
    if missing:
        raise UserError(f"--metrics {' '.join(missing)}: no run has it: use {', '.join(available)}")
    with_level = factors_of_the_level(ok, column)
    others = [c for c in other_factors(ok, column) if c not in with_level]
    ok["_pair"] = ok[others].apply(lambda row: tuple(_key(v) for v in row), axis=1)
    duplicated = ok.duplicated(["_pair", "_level"])
    if duplicated.any():
        raise UserError(
            f"two ok runs have the same factors ({ok.loc[duplicated, 'run_dir'].iloc[0]}): "
            "collect one sweep at a time, or give the runs different seeds"
        )
    base = ok[ok["_level"] == baseline].set_index("_pair")
    rows = []
    for level in levels:
        if level == baseline:
            continue
        other = ok[ok["_level"] == level].set_index("_pair")
        common = base.index.intersection(other.index)
        for metric in metrics:
            name = METRIC_PREFIX + metric
            a = other.loc[common, name].astype(float)
            b = base.loc[common, name].astype(float)
            keep = a.notna() & b.notna()
            a, b = a[keep].to_numpy(), b[keep].to_numpy()
            row = {"level": level, "metric": metric, "pairs": len(a)}
            row.update(_compare(a, b, confidence, stats))
            rows.append(row)
    if not rows:
        raise UserError(f"only one level of {factor} among the ok runs: nothing to compare")
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["with_level"] = [c[len(FACTOR_PREFIX) :] for c in with_level]
    return table


def _compare(a, b, confidence: float, stats) -> dict:
    nan = float("nan")
    if len(a) == 0:
        return dict.fromkeys(COLUMNS[3:], nan) | {"beyond_seed_spread": None}
    diff = a - b
    result = {
        "baseline_mean": float(b.mean()),
        "level_mean": float(a.mean()),
        "difference": float(diff.mean()),
        "se": nan,
        "ci_low": nan,
        "ci_high": nan,
        "beyond_seed_spread": None,  # one pair has no spread to compare with
    }
    if len(a) >= 2:
        result["se"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        if result["se"] == 0:  # every pair moved by the same amount
            result["ci_low"] = result["ci_high"] = result["difference"]
        else:
            low, high = stats.ttest_rel(a, b).confidence_interval(confidence)
            result["ci_low"], result["ci_high"] = float(low), float(high)
        result["beyond_seed_spread"] = bool(result["ci_low"] > 0 or result["ci_high"] < 0)
    return result


def to_markdown(table: pd.DataFrame, factor: str, baseline: str, confidence: float) -> str:
    pct = f"{confidence:.0%}"
    with_level = table.attrs.get("with_level", [])
    comes_with = (
        f" ({', '.join(with_level)} {'changes' if len(with_level) == 1 else 'change'} with "
        f"{factor}: part of its levels)"
        if with_level
        else ""
    )
    head = (
        f"Paired by every other factor, the seed among them{comes_with}: {factor} level - "
        f"{baseline}, mean over pairs, standard error, {pct} t interval.\n\n"
        f"| {factor} | metric | pairs | {baseline} | level | difference | se | {pct} CI | "
        "beyond the seed spread |\n|---|---|---|---|---|---|---|---|---|"
    )

    def number(value) -> str:
        return (
            "-"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (f"{value:.3f}")
        )

    lines = [head]
    for r in table.itertuples(index=False):
        verdict = {True: "yes", False: "no", None: "-"}[r.beyond_seed_spread]
        ci = f"[{number(r.ci_low)}, {number(r.ci_high)}]"
        lines.append(
            f"| {r.level} | {r.metric} | {r.pairs} | {number(r.baseline_mean)} | "
            f"{number(r.level_mean)} | {number(r.difference)} | {number(r.se)} | {ci} | "
            f"{verdict} |"
        )
    return "\n".join(lines) + "\n"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m t2ilab.analysis.paired",
        description="Paired differences of each level of a factor from a baseline level, "
        "across seeds, with confidence intervals.",
    )
    parser.add_argument("dir", type=Path, help="a multirun sweep folder")
    parser.add_argument("--factor", required=True, help="the factor compared, e.g. data.identifier")
    parser.add_argument("--baseline", required=True, help="the level the others are compared with")
    parser.add_argument("--metrics", nargs="+", default=None, help="default: every metric")
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence {args.confidence}: give a level between 0 and 1, e.g. 0.95")
    return args


def _is_paired_csv(path: Path) -> bool:
    return first_line(path).startswith(",".join(COLUMNS[:3]))


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    root = results_root(args.dir)
    out = check_output(
        root / f"paired_{args.factor.replace('.', '_')}.csv", "--factor", _is_paired_csv
    )
    df, _ = load_results_and_warn(root)
    table = paired_differences(df, args.factor, args.baseline, args.metrics, args.confidence)
    write_text_atomic(out, table.to_csv(index=False), newline="")
    print(to_markdown(table, args.factor, args.baseline, args.confidence))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
