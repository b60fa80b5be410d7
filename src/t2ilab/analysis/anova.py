"""Which config factors drive a metric? A type-II ANOVA over the runs of a sweep.

The analysis of Xiang et al. 2023 ("A Closer Look at Parameter-Efficient Tuning in Diffusion
Models"), for any sweep whose runs wrote results.json:

    python -m t2ilab.analysis.anova logs/train/multiruns/<timestamp> --metric dino
    python -m t2ilab.analysis.anova DIR --metric dino \
        --factors adapter.input_position adapter.output_position --out report/
    python -m t2ilab.analysis.anova --wandb ENTITY/PROJECT --group dreambooth --metric dino

Factors are the `factors` of results.json (W&B: the run config, same dotted keys); by default
every one with more than one value among the ok runs, except seeds and per-run identifiers.
Only `status == "ok"` runs with the metric enter the model. Each factor is categorical
(`C(Q('factor.x'))`, the quoting because of the dots); the model holds the main effects and
every two-way interaction that the design can estimate: a term whose dummy columns are not
all linearly independent of the terms before it (missing cells, confounding) is dropped, and
so is one that would leave no residual degrees of freedom. The model is therefore always of
full rank, so the type-II F tests of statsmodels' `anova_lm` are exact.

Writes anova.md, anova.csv (one row per term: df, sum_sq, F, p, partial eta squared, the
dominant term first), levels.csv (metric per factor level), box_<factor>.png and, for an
input/output position pair (or --heatmap ROW COL), heatmap.csv + heatmap.png, the paper's
figure of mean metric per cell (see plots.py), to --out. --wandb-log also logs them to a new
W&B run (job_type analysis; offline with WANDB_MODE=offline or without an API key).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from t2ilab.analysis import plots
from t2ilab.analysis.collect import (
    BASE_COLUMNS,
    FACTOR_PREFIX,
    METRIC_PREFIX,
    _cell,
    _metric_sort_key,
    load_results_and_warn,
    results_root,
    summary,
    to_markdown,
)
from t2ilab.analysis.levels import as_levels, distinct_decimals, level_order, short
from t2ilab.cli import (
    ArgumentParser,
    check_output,
    first_line,
    one_line_errors,
    png_is_ours,
    print_warning,
    text_starts_with,
)
from t2ilab.errors import UserError
from t2ilab.utils.atomic import write_text_atomic

TABLE_COLUMNS = ["term", "df", "sum_sq", "F", "p", "partial_eta_sq"]
RESIDUAL = "Residual"
# Replicates, not treatments: never a default factor (a user may still name one).
SEED_KEYS = ("seed",)
# W&B run states -> results.json statuses; any other state (running, pending) counts as skipped.
WANDB_STATES = {"finished": "ok", "failed": "failed", "crashed": "failed", "killed": "failed"}


@dataclass
class AnovaResult:
    """One fitted ANOVA. `table` has TABLE_COLUMNS, effects sorted by F (largest first), then
    the Residual row; `data` is the model frame (one row per run that entered the model, factor
    columns as string levels); `dropped` and `ignored` say which terms and factors were left
    out and why."""

    metric: str
    metric_column: str
    factors: list[str]
    terms: list[str]
    formula: str
    table: pd.DataFrame
    model: Any  # statsmodels RegressionResultsWrapper
    data: pd.DataFrame
    dropped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    n_runs: int = 0
    n_used: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    n_ok_without_metric: int = 0

    @property
    def top_term(self) -> str:
        return str(self.table["term"].iloc[0])


# --------------------------------------------------------------------------------- names


def factor_column(name: str, df: pd.DataFrame, option: str = "--factors") -> str:
    """`adapter.input_position` or `factor.adapter.input_position` -> the table column; a base
    column such as `experiment` (the W&B group) works too. `option`: what the user typed it
    after, for the error."""
    for candidate in (name, FACTOR_PREFIX + name):
        if candidate.startswith(FACTOR_PREFIX) and candidate in df.columns:
            return candidate
    if name == "experiment" and name in df.columns:
        return name  # the experiment (the W&B group) as a factor
    known = [c[len(FACTOR_PREFIX) :] for c in df.columns if c.startswith(FACTOR_PREFIX)]
    raise UserError(
        f"{option} {name}: no such factor in the runs: "
        + (
            f"use one of {', '.join(known)}"
            if known
            else "the runs record no factors (their results.json 'factors' are empty)"
        )
    )


def metric_column(name: str, df: pd.DataFrame) -> str:
    column = name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name
    if column not in df.columns or df[column].isna().all():
        known = sorted(
            (c for c in df.columns if c.startswith(METRIC_PREFIX) and df[c].notna().any()),
            key=_metric_sort_key,
        )
        names = ", ".join(c[len(METRIC_PREFIX) :] for c in known)
        raise UserError(
            f"--metric {column[len(METRIC_PREFIX) :]} is missing in all {len(df)} runs: "
            + (
                f"use one of {names}"
                if names
                else "no run recorded any metric (did evaluation run? see each run's reason)"
            )
        )
    return column


def _is_seed(column: str) -> bool:
    return short(column).rsplit(".", 1)[-1] in SEED_KEYS


# --------------------------------------------------------------------------------- model


def _term(columns: Sequence[str]) -> str:
    # repr() quotes safely whatever the key holds; C() makes every factor categorical
    return ":".join(f"C(Q({c!r}))" for c in columns)


def _pretty(columns: Sequence[str]) -> str:
    return ":".join(short(c) for c in columns)


def _rank_and_width(data: pd.DataFrame, terms: list[tuple[str, ...]]) -> tuple[int, int]:
    import patsy

    rhs = " + ".join(["1", *(_term(t) for t in terms)])
    design = np.asarray(patsy.dmatrix(rhs, data, return_type="matrix"), dtype=float)
    return int(np.linalg.matrix_rank(design)), design.shape[1]


def select_terms(
    data: pd.DataFrame, factors: Sequence[str], interactions: bool = True
) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    """Main effects, then two-way interactions, each kept only if all of its dummy columns add
    rank to the terms kept before it (no aliasing, no missing cells) and at least one residual
    degree of freedom is left. Returns (kept terms, [(dropped term, why)])."""
    n = len(data)
    kept: list[tuple[str, ...]] = []
    dropped: list[tuple[str, str]] = []
    rank, width = 1, 1
    for column in factors:
        new_rank, new_width = _rank_and_width(data, [*kept, (column,)])
        added, columns = new_rank - rank, new_width - width
        if added < columns:
            others = ", ".join(short(t[0]) for t in kept)
            how = "fully" if added == 0 else f"partly ({added} of {columns} df estimable)"
            dropped.append((short(column), f"{how} aliased with {others}"))
            continue
        kept.append((column,))
        rank, width = new_rank, new_width
    if n - rank <= 0:
        return kept, dropped  # the caller reports too few runs
    if interactions:
        for pair in itertools.combinations([t[0] for t in kept], 2):
            new_rank, new_width = _rank_and_width(data, [*kept, pair])
            added, columns = new_rank - rank, new_width - width
            if added < columns:
                dropped.append(
                    (
                        _pretty(pair),
                        f"not estimable: missing cells or confounded "
                        f"({added} of {columns} df estimable)",
                    )
                )
            elif n - new_rank <= 0:
                dropped.append((_pretty(pair), "would leave no residual degrees of freedom"))
            else:
                kept.append(pair)
                rank, width = new_rank, new_width
    return kept, dropped


def default_factors(df: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]]]:
    """Every factor column with more than one level among `df`'s rows, except seed-like keys
    and per-run identifiers (a different value in every run), fewest levels first (so a coarse
    factor is kept and a finer one aliased with it is the one dropped). Returns (factor
    columns, [(ignored factor, why)])."""
    chosen: list[tuple[int, int, str]] = []
    ignored: list[tuple[str, str]] = []
    n = len(df)
    for i, column in enumerate(c for c in df.columns if c.startswith(FACTOR_PREFIX)):
        k = as_levels(df[column]).nunique()
        if k < 2:
            continue  # constant: not a factor of this sweep, nothing to report
        if _is_seed(column):
            ignored.append((short(column), "seed (replicates, not a treatment)"))
        elif k == n:
            ignored.append((short(column), "a different value in every run (no replicates)"))
        else:
            chosen.append((k, i, column))
    return [c for _, _, c in sorted(chosen)], ignored


def fit_anova(
    df: pd.DataFrame,
    metric: str,
    factors: Sequence[str] | None = None,
    *,
    interactions: bool = True,
) -> AnovaResult:
    """Type-II ANOVA of `metric` over the ok runs of a `load_results` table.

    `factors`: names (`noise.beta_schedule` or `factor.noise.beta_schedule`); default: see
    `default_factors`. Raises UserError when no run, no metric, no factor with two levels, or
    fewer ok runs than parameters leaves nothing to test.
    """
    try:
        from statsmodels.formula.api import ols
        from statsmodels.stats.anova import anova_lm
    except ImportError as e:  # pragma: no cover - statsmodels is a dependency of the analysis
        raise UserError(f"the ANOVA needs statsmodels: pip install statsmodels ({e})") from e

    if df.empty:
        raise UserError("no results: the table has no runs")
    status_counts = df["status"].fillna("unknown").astype(str).value_counts().to_dict()
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise UserError(
            f"no ok run to analyse, all {len(df)} failed or were skipped ({summary(df)}): see "
            "each run's reason with python -m t2ilab.analysis.collect, fix it and re-run"
        )
    column = metric_column(metric, df)
    used = ok[ok[column].notna() & np.isfinite(ok[column].astype(float))]
    if used.empty:
        raise UserError(
            f"no ok run has {short(column)!r} ({summary(df)}): the runs that have it failed; "
            "see each run's reason with python -m t2ilab.analysis.collect"
        )

    ignored: list[tuple[str, str]] = []
    if factors:
        columns = list(dict.fromkeys(factor_column(f, df) for f in factors))
        chosen = []
        for c in columns:
            k = as_levels(used[c]).nunique()
            if k < 2:
                only = as_levels(used[c]).iloc[0]
                ignored.append((short(c), f"one level ({only}) among the ok runs"))
            else:
                chosen.append(c)
    else:
        chosen, ignored = default_factors(used)
    if not chosen:
        why = "; ".join(f"{f}: {r}" for f, r in ignored)
        raise UserError(
            f"the ANOVA cannot be fitted: no factor has 2 or more levels among the {len(used)} "
            f"ok runs with {short(column)!r}" + (f" ({why})" if why else "") + ": point at a "
            "sweep that varies a factor, or name one that varies with --factors"
        )

    data = pd.DataFrame({c: as_levels(used[c]).to_numpy() for c in chosen}, index=used.index)
    data[column] = used[column].astype(float)
    data.insert(0, "run_dir", used["run_dir"])

    terms, dropped = select_terms(data, chosen, interactions)
    main_effects = [t[0] for t in terms if len(t) == 1]
    params = 1 + sum(data[c].nunique() - 1 for c in main_effects)
    if len(data) <= params:
        raise UserError(
            f"{len(data)} ok runs with {short(column)!r} but the main-effects model of "
            f"{', '.join(short(c) for c in main_effects)} has {params} parameters; "
            f"need at least {params + 1} runs (more seeds or subjects per cell), or fewer --factors"
        )

    formula = f"Q({column!r}) ~ " + " + ".join(_term(t) for t in terms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # F = inf/nan when SS_resid is 0
        model = ols(formula, data=data).fit()
        raw = anova_lm(model, typ=2)
    names = {_term(t): _pretty(t) for t in terms}
    raw.index = [names.get(i, RESIDUAL if i == RESIDUAL else i) for i in raw.index]
    ss_resid = float(raw.loc[RESIDUAL, "sum_sq"])
    table = pd.DataFrame(
        {
            "term": raw.index,
            "df": raw["df"].to_numpy(),
            "sum_sq": raw["sum_sq"].to_numpy(),
            "F": raw["F"].to_numpy(),
            "p": raw["PR(>F)"].to_numpy(),
        }
    )
    effect = table["term"] != RESIDUAL
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = table["sum_sq"] / (table["sum_sq"] + ss_resid)
    table["partial_eta_sq"] = eta.where(effect)
    effects = table[effect].sort_values(
        ["F", "partial_eta_sq"], ascending=False, na_position="last", kind="stable"
    )
    table = pd.concat([effects, table[~effect]], ignore_index=True)[TABLE_COLUMNS]
    table["df"] = table["df"].round().astype(int)

    return AnovaResult(
        metric=short(column),
        metric_column=column,
        factors=main_effects,
        terms=[_pretty(t) for t in terms],
        formula=formula,
        table=table,
        model=model,
        data=data,
        dropped=dropped,
        ignored=ignored,
        n_runs=len(df),
        n_used=len(data),
        status_counts={str(k): int(v) for k, v in status_counts.items()},
        n_ok_without_metric=len(ok) - len(used),
    )


def level_means(result: AnovaResult) -> pd.DataFrame:
    """The metric per level of each main-effect factor: factor, level, n, mean, std."""
    rows = []
    for column in result.factors:
        groups = result.data.groupby(column, sort=False)[result.metric_column]
        stats = groups.agg(["count", "mean", "std"])
        for level in level_order(result.data[column]):
            n, mean, std = stats.loc[level]
            rows.append(
                {"factor": short(column), "level": level, "n": int(n), "mean": mean, "std": std}
            )
    return pd.DataFrame(rows, columns=["factor", "level", "n", "mean", "std"])


# ------------------------------------------------------------------------------- reports


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The ANOVA table as strings for reading (the CSV keeps full precision)."""
    return pd.DataFrame(
        {
            "term": table["term"],
            "df": table["df"].map(str),
            "sum_sq": table["sum_sq"].map(lambda v: _fmt(v, ".4g")),
            "F": table["F"].map(lambda v: _fmt(v, ".3f")),
            "p": table["p"].map(lambda v: _fmt(v, ".3g")),
            "partial_eta_sq": table["partial_eta_sq"].map(lambda v: _fmt(v, ".3f")),
        }
    )


def report_markdown(result: AnovaResult, source: str | None = None) -> str:
    """The full report: what entered the model, the ANOVA table, what was left out, level means."""
    counts = result.status_counts
    runs = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "skipped"))
    others = [f"{n} {s}" for s, n in counts.items() if s not in ("ok", "failed", "skipped")]
    runs = ", ".join([runs, *others])
    lines = [f"# ANOVA of {result.metric}", ""]
    if source:
        lines.append(f"- source: `{source}`")
    used = f"- runs: {result.n_runs} ({runs}); {result.n_used} ok runs enter the model"
    if result.n_ok_without_metric:
        used += f" ({result.n_ok_without_metric} ok runs without {result.metric!r} left out)"
    lines += [
        used,
        f"- model: {result.metric} ~ {' + '.join(result.terms)} "
        "(OLS, categorical factors, type-II sums of squares)",
    ]
    for term, why in result.dropped:
        lines.append(f"- dropped term {term}: {why}")
    for factor, why in result.ignored:
        lines.append(f"- ignored factor {factor}: {why}")
    lines += [
        "",
        to_markdown(format_table(result.table)),
        "",
        "partial_eta_sq = sum_sq / (sum_sq + Residual sum_sq); terms sorted by F.",
        "",
        "## Level means",
        "",
    ]
    means = level_means(result)
    # as many digits as tell the levels apart (0.8219 vs 0.8221, not 0.822 twice)
    decimals = distinct_decimals(means["mean"].to_numpy(float))
    means["mean"] = means["mean"].map(lambda v: _fmt(v, f".{decimals}f"))
    means["std"] = means["std"].map(lambda v: _fmt(v, ".4g"))
    means["n"] = means["n"].map(str)
    lines.append(to_markdown(means))
    return "\n".join(lines) + "\n"


def write_reports(result: AnovaResult, out: Path, source: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "anova.md", out / "anova.csv", out / "levels.csv"]
    write_text_atomic(paths[0], report_markdown(result, source), newline="")
    write_text_atomic(paths[1], result.table.to_csv(index=False), newline="")
    write_text_atomic(paths[2], level_means(result).to_csv(index=False), newline="")
    return paths


# ------------------------------------------------------------------------------------ W&B


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        key = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
            value = value["value"]  # the raw config format: {"value": v, "desc": null}
        if isinstance(value, dict):
            flat.update(_flatten(value, key))
        else:
            flat[key] = value
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _wandb_row(run: Any) -> dict[str, Any]:
    config = _flatten({k: v for k, v in dict(run.config or {}).items() if not k.startswith("_")})
    summary_items = dict(run.summary.items()) if run.summary is not None else {}
    state = str(getattr(run, "state", "") or "").lower()
    status = WANDB_STATES.get(state, "skipped")
    row: dict[str, Any] = {
        "run_dir": "/".join(str(p) for p in getattr(run, "path", [])) or str(run.id),
        "experiment": getattr(run, "group", None) or getattr(run, "name", None),
        "status": status,
        "reason": None if status == "ok" else f"W&B run state {state or 'unknown'}",
        "steps": _number(summary_items.get("trainer/global_step", summary_items.get("_step"))),
        "wall_time_s": _number(summary_items.get("_runtime")),
    }
    for key, value in config.items():
        row[FACTOR_PREFIX + key] = _cell(value)
    metrics: dict[str, float] = {}
    for key, value in summary_items.items():
        number = _number(value)
        if key.startswith("_") or number is None:
            continue  # W&B bookkeeping (_step, _runtime), images, tables
        metrics.setdefault(key, number)
    for key, value in list(metrics.items()):
        if key.startswith("eval/"):
            metrics[key[len("eval/") :]] = value  # eval/dino is the metric dino
    for key, value in metrics.items():
        row[METRIC_PREFIX + key] = value
    return row


def load_wandb_runs(
    project: str, groups: Sequence[str] | None = None, *, api: Any = None
) -> pd.DataFrame:
    """The runs of W&B `ENTITY/PROJECT` (optionally only `groups`) as a `load_results` table:
    config keys -> `factor.<key>`, numeric summary values -> `metric.<key>` (`eval/dino` ->
    `metric.dino`), run state finished -> ok, failed/crashed/killed -> failed, else skipped.
    `api`: a `wandb.Api()` or anything with the same `runs(path, filters=...)`."""
    if api is None:
        import wandb

        try:
            api = wandb.Api()
        except Exception as e:  # no key, no network: one line, not a traceback
            raise UserError(f"cannot reach W&B ({type(e).__name__}: {e})") from e
    filters: dict[str, Any] = {}
    if groups:
        filters = {"group": groups[0]} if len(groups) == 1 else {"group": {"$in": list(groups)}}
    try:
        runs = list(api.runs(project, filters=filters or None))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot list the runs of W&B {project} ({type(e).__name__}: {e})") from e
    if not runs:
        where = f" in group {', '.join(groups)}" if groups else ""
        raise UserError(f"no results: W&B project {project} has no runs{where}")
    rows = [_wandb_row(run) for run in runs]
    factors = dict.fromkeys(c for r in rows for c in r if c.startswith(FACTOR_PREFIX))
    metrics = dict.fromkeys(c for r in rows for c in r if c.startswith(METRIC_PREFIX))
    columns = BASE_COLUMNS + list(factors) + sorted(metrics, key=_metric_sort_key)
    df = pd.DataFrame(rows, columns=columns)
    for column in [*metrics, "wall_time_s", "steps"]:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    return df


def log_to_wandb(
    result: AnovaResult,
    images: Sequence[Path],
    out: Path,
    *,
    project: str = "t2ilab",
    group: str | None = None,
    source: str | None = None,
) -> str:
    """A new W&B run (job_type analysis) with the table, the level means and the images;
    offline (WANDB_MODE=offline, or no API key) it is saved under `out`/wandb for `wandb sync`.
    Returns the run's local folder."""
    import wandb

    entity, _, name = project.rpartition("/")
    offline = os.environ.get("WANDB_MODE", "") in ("offline", "dryrun")
    if not offline:
        from t2ilab.loggers import wandb_has_credentials  # imports lightning: only when needed

        offline = not wandb_has_credentials()
    run = wandb.init(
        project=name,
        entity=entity or None,
        group=group,
        job_type="analysis",
        name=f"anova-{result.metric}",
        dir=str(out),
        mode="offline" if offline else None,
        config={
            "metric": result.metric,
            "factors": [short(c) for c in result.factors],
            "terms": result.terms,
            "source": source,
            "runs_used": result.n_used,
        },
    )
    try:
        run.log(
            {
                "anova/table": wandb.Table(dataframe=result.table),
                "anova/levels": wandb.Table(dataframe=level_means(result)),
                **{f"anova/{p.stem}": wandb.Image(str(p)) for p in images},
            }
        )
        run.summary.update({"anova/top_term": result.top_term, "anova/runs_used": result.n_used})
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    return run_dir


# ------------------------------------------------------------------------------------ CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m t2ilab.analysis.anova",
        description="Type-II ANOVA of a metric over the runs of a sweep (results.json files "
        "or W&B runs): which factors matter, how much (F, p, partial eta squared).",
    )
    parser.add_argument("dir", nargs="?", type=Path, help="a multirun sweep folder")
    parser.add_argument("--metric", required=True, help="metric name, e.g. dino, clip_t")
    parser.add_argument(
        "--factors",
        nargs="+",
        default=None,
        metavar="FACTOR",
        help="factors to test (dotted config keys, e.g. adapter.input_position); default: every "
        "factor with 2+ levels among the ok runs, except seeds",
    )
    parser.add_argument(
        "--no-interactions", action="store_true", help="main effects only (no two-way terms)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: DIR, or . for --wandb)"
    )
    parser.add_argument(
        "--heatmap",
        nargs=2,
        metavar=("ROW", "COL"),
        default=None,
        help="factors of the mean-metric heatmap (default: *input_position x *output_position)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    parser.add_argument(
        "--wandb", metavar="ENTITY/PROJECT", default=None, help="read the runs from W&B"
    )
    parser.add_argument(
        "--group", nargs="+", default=None, metavar="GROUP", help="with --wandb: only these groups"
    )
    parser.add_argument(
        "--wandb-log", action="store_true", help="log the table and figures to a new W&B run"
    )
    parser.add_argument(
        "--wandb-project",
        default=None,
        metavar="[ENTITY/]PROJECT",
        help="project for --wandb-log (default: the --wandb project, else t2ilab)",
    )
    args = parser.parse_args(argv)
    if (args.dir is None) == (args.wandb is None):
        parser.error("give either a sweep folder DIR or --wandb ENTITY/PROJECT")
    if args.group and not args.wandb:
        parser.error("--group needs --wandb")
    return args


def _out_folder(args: argparse.Namespace) -> Path:
    """The report folder: --out, else the sweep folder (else . for --wandb)."""
    if args.out is not None:
        out = args.out.expanduser()
    elif args.dir is not None:
        out = results_root(args.dir)
    else:
        out = Path(".")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the report (made if missing)")
    return out


def _load(args: argparse.Namespace, api: Any) -> tuple[pd.DataFrame, str]:
    if args.wandb:
        if args.wandb.count("/") != 1 or not all(args.wandb.split("/")):
            raise UserError(f"--wandb {args.wandb}: expected ENTITY/PROJECT")
        source = f"wandb:{args.wandb}" + (f" group {', '.join(args.group)}" if args.group else "")
        return load_wandb_runs(args.wandb, args.group, api=api), source
    df, _ = load_results_and_warn(args.dir)
    return df, str(args.dir)


@dataclass
class HeatmapInput:
    """What the heatmap shows: the model's runs with both factors as levels, every level of
    the sweep (skipped runs' too), and why a cell has no mean ("skipped", "failed")."""

    frame: pd.DataFrame
    row: str
    col: str
    levels: tuple[list[str], list[str]]
    notes: dict[tuple[str, str], str]


def _missing_cell_notes(df: pd.DataFrame, row: str, col: str) -> dict[tuple[str, str], str]:
    """(row level, col level) -> "skipped" or "failed" for the cells of runs that did not
    finish; a cell with both says skipped (the configuration cannot run at all)."""
    notes: dict[tuple[str, str], str] = {}
    runs = df[df["status"].isin(["skipped", "failed"])]
    for r, c, status in zip(
        as_levels(runs[row]), as_levels(runs[col]), runs["status"], strict=True
    ):
        if notes.get((r, c)) != "skipped":
            notes[(r, c)] = status
    return notes


def heatmap_input(
    df: pd.DataFrame, result: AnovaResult, names: Sequence[str] | None = None
) -> HeatmapInput | None:
    """The heatmap of factors `names` (ROW, COL), or else of an input/output position pair
    that varies among the model's runs; None without such a pair."""
    runs = df.loc[result.data.index]
    if names:
        pair = tuple(factor_column(f, df, "--heatmap") for f in names)
    else:
        varying = [
            c
            for c in df.columns
            if c.startswith(FACTOR_PREFIX) and as_levels(runs[c]).nunique() > 1
        ]
        pair = plots.find_position_pair(varying)
        if pair is None:
            return None
    row, col = pair
    frame = result.data.copy()
    for column in pair:
        if column not in frame.columns:
            frame[column] = as_levels(runs[column])
    levels = (level_order(as_levels(df[row])), level_order(as_levels(df[col])))
    return HeatmapInput(frame, row, col, levels, _missing_cell_notes(df, row, col))


# What this tool wrote before, recognised by content, so that a rerun replaces its own report
# and never a file of the user's that happens to have the same name.
REPORT_FILES = {
    "anova.md": lambda path: text_starts_with(path, "# ANOVA of "),
    "anova.csv": lambda path: text_starts_with(path, ",".join(TABLE_COLUMNS)),
    "levels.csv": lambda path: text_starts_with(path, "factor,level,n,mean,std"),
    "heatmap.csv": lambda path: " \\ " in first_line(path).split(",")[0],
}


def _check_outputs(
    args: argparse.Namespace, result: AnovaResult, heat: HeatmapInput | None, out: Path
) -> None:
    """Every file the report will write may be written (see `check_output`)."""
    planned = {name: is_ours for name, is_ours in REPORT_FILES.items()}
    if heat is None:
        del planned["heatmap.csv"]
    if not args.no_plots:
        for factor in result.factors:
            planned[f"box_{plots.file_stem(factor)}.png"] = png_is_ours
        if heat is not None:
            planned["heatmap.png"] = png_is_ours
    for name, is_ours in planned.items():
        check_output(out / name, "--out", is_ours)


def _plots(
    args: argparse.Namespace, result: AnovaResult, heat: HeatmapInput | None, out: Path
) -> tuple[list[Path], list[Path]]:
    """(data files, images) written to `out`."""
    files: list[Path] = []
    images: list[Path] = []
    if heat is not None:
        # the grid of means is data too: written even without matplotlib
        grid = plots.heatmap_grid(heat.frame, result.metric_column, heat.row, heat.col, heat.levels)
        label = f"{grid.index.name} \\ {grid.columns.name}"  # rows \ columns
        files.append(out / "heatmap.csv")
        write_text_atomic(files[-1], grid.to_csv(index_label=label), newline="")
    if args.no_plots:
        return files, images
    try:
        images += plots.box_plots(result.data, result.metric_column, result.factors, out)
        if heat is not None:
            images.append(
                plots.heatmap(
                    heat.frame,
                    result.metric_column,
                    heat.row,
                    heat.col,
                    out,
                    notes=heat.notes,
                    levels=heat.levels,
                )
            )
    except plots.PlottingUnavailable as e:
        print_warning(e)
    return files, images


@one_line_errors
def main(argv: list[str] | None = None, *, api: Any = None) -> int:
    """The CLI. `api`: a stand-in for `wandb.Api()` (tests)."""
    args = _parse_args(argv)
    out = _out_folder(args)
    df, source = _load(args, api)
    if args.heatmap:
        for name in args.heatmap:
            factor_column(name, df, "--heatmap")  # a typo fails before the fit
    result = fit_anova(df, args.metric, args.factors, interactions=not args.no_interactions)
    heat = heatmap_input(df, result, args.heatmap)
    _check_outputs(args, result, heat, out)
    try:
        paths = write_reports(result, out, source)
        print(report_markdown(result, source), end="")
        sys.stdout.flush()  # the table before any plotting warning
        files, images = _plots(args, result, heat, out)
    except OSError as e:
        raise UserError(
            f"cannot write the report to {out} ({e.strerror or e}): choose a writable --out"
        ) from e
    print(f"-> {', '.join(str(p) for p in [*paths, *files, *images])}")
    if args.wandb_log:
        project = args.wandb_project or args.wandb or "t2ilab"
        group = args.group[0] if args.group and len(args.group) == 1 else None
        run_dir = log_to_wandb(result, images, out, project=project, group=group, source=source)
        print(f"W&B analysis run: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
