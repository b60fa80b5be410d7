"""The sweep ANOVA: planted effects are found, F/p/partial eta squared match independent
computations, non-estimable terms are dropped, figures and reports are written, the CLI
fails with one line, and W&B runs (through a stand-in Api) feed the same analysis."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm

from t2ilab.analysis import plots
from t2ilab.analysis.anova import (
    TABLE_COLUMNS,
    fit_anova,
    heatmap_input,
    level_means,
    load_wandb_runs,
    main,
    report_markdown,
    select_terms,
)
from t2ilab.analysis.collect import load_results
from t2ilab.cli import png_is_ours
from t2ilab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
IN, OUT, ACT = "adapter.input_position", "adapter.output_position", "adapter.act"
# planted: input position matters a lot, output position a little, the activation not at all
IN_EFFECT = {"down": 0.0, "mid": 0.10, "up": 0.30}
OUT_EFFECT = {"down": 0.0, "mid": 0.03, "up": 0.02}
NOISE = 0.02


def write_run(root: Path, i: int, factors: dict, metrics: dict, status: str = "ok", reason=None):
    """A run folder as Hydra multirun makes them (root/<i>/results.json), DESIGN.md contract."""
    run = root / str(i)
    run.mkdir(parents=True)
    results = {
        "experiment": "adapter_sweep",
        "status": status,
        "reason": reason,
        "factors": factors,
        "metrics": metrics,
        "steps": 100 if status == "ok" else 0,
        "wall_time_s": 3.5,
    }
    (run / "results.json").write_text(json.dumps(results))


def planted_runs() -> list[dict]:
    """3 x 3 x 2 positions/activations, 3 seeds, the (up, up) cell never run."""
    rng = np.random.default_rng(1234)
    runs = []
    for inp, out, act, seed in itertools.product(
        IN_EFFECT, OUT_EFFECT, ("relu", "gelu"), (0, 1, 2)
    ):
        if inp == "up" and out == "up":
            continue  # a missing cell: input x output is not fully estimable
        dino = 0.5 + IN_EFFECT[inp] + OUT_EFFECT[out] + rng.normal(0.0, NOISE)
        runs.append({IN: inp, OUT: out, ACT: act, "seed": seed, "dino": float(dino)})
    return runs


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """The sweep folder, and the same ok runs as a hand-built frame (inp, out, act, y)."""
    root = tmp_path / "multirun"
    runs = planted_runs()
    for i, run in enumerate(runs):
        factors = {k: run[k] for k in (IN, OUT, ACT, "seed")}
        write_run(root, i, factors, {"dino": run["dino"], "clip_t": 0.3})
    failed = {IN: "up", OUT: "up", ACT: "relu", "seed": 0}
    write_run(root, len(runs), failed, {}, status="failed", reason="CUDA out of memory")
    write_run(root, len(runs) + 1, failed, {}, status="skipped", reason="invalid combination")
    hand = pd.DataFrame(
        {
            "inp": [r[IN] for r in runs],
            "out": [r[OUT] for r in runs],
            "act": [r[ACT] for r in runs],
            "y": [r["dino"] for r in runs],
        }
    )
    return root, hand


def row(result, term: str) -> pd.Series:
    table = result.table.set_index("term")
    return table.loc[term]


# ---------------------------------------------------------------------------- the model


def test_planted_factor_ranks_first_and_matches_statsmodels(planted):
    root, hand = planted
    result = fit_anova(load_results(root), "dino")

    assert list(result.table.columns) == TABLE_COLUMNS
    assert result.top_term == IN
    assert result.table["term"].iloc[-1] == "Residual"
    effects = result.table[result.table["term"] != "Residual"]
    assert effects["F"].is_monotonic_decreasing
    # only ok runs with the metric, the others counted
    assert result.n_used == len(hand) == 48
    assert result.status_counts == {"ok": 48, "failed": 1, "skipped": 1}
    assert ("seed", "seed (replicates, not a treatment)") in result.ignored
    # the (up, up) cell is missing: input x output is dropped, the others are kept
    assert [t for t, _ in result.dropped] == [f"{IN}:{OUT}"]
    assert set(result.terms) == {IN, OUT, ACT, f"{ACT}:{IN}", f"{ACT}:{OUT}"}

    # independent fit: plain column names, the same terms written by hand
    model = ols("y ~ C(inp) + C(out) + C(act) + C(inp):C(act) + C(out):C(act)", hand).fit()
    ref = anova_lm(model, typ=2)
    pairs = {
        IN: "C(inp)",
        OUT: "C(out)",
        ACT: "C(act)",
        f"{ACT}:{IN}": "C(inp):C(act)",
        f"{ACT}:{OUT}": "C(out):C(act)",
        "Residual": "Residual",
    }
    for ours, theirs in pairs.items():
        got = row(result, ours)
        assert got["df"] == ref.loc[theirs, "df"]
        assert got["sum_sq"] == pytest.approx(ref.loc[theirs, "sum_sq"], rel=1e-9)
        if ours != "Residual":
            assert got["F"] == pytest.approx(ref.loc[theirs, "F"], rel=1e-9)
            assert got["p"] == pytest.approx(ref.loc[theirs, "PR(>F)"], rel=1e-6, abs=1e-300)
    # planted sizes: huge, small but real, none
    assert row(result, IN)["p"] < 1e-20
    assert row(result, OUT)["p"] < 0.01
    assert row(result, ACT)["p"] > 0.05
    assert row(result, IN)["F"] > row(result, OUT)["F"] > row(result, ACT)["F"]


def _rss(columns: list[np.ndarray], y: np.ndarray) -> float:
    x = np.column_stack([np.ones_like(y), *columns])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(((y - x @ beta) ** 2).sum())


def test_type2_sum_of_squares_by_hand(planted):
    """Type II SS of input position = RSS(every term not containing it) - RSS(same + it),
    with treatment dummies built by pandas and least squares by numpy (no patsy, no statsmodels)."""
    root, hand = planted
    result = fit_anova(load_results(root), "dino")
    y = hand["y"].to_numpy()

    def dummies(name: str) -> list[np.ndarray]:
        d = pd.get_dummies(hand[name], drop_first=True, dtype=float)
        return [d[c].to_numpy() for c in d.columns]

    inp, out, act = dummies("inp"), dummies("out"), dummies("act")
    out_act = [o * a for o in out for a in act]
    inp_act = [i * a for i in inp for a in act]
    rest = out + act + out_act
    ss_inp = _rss(rest, y) - _rss(rest + inp, y)
    ss_resid = _rss(inp + out + act + inp_act + out_act, y)
    df_resid = len(y) - (1 + 2 + 2 + 1 + 2 + 2)
    f_inp = (ss_inp / 2) / (ss_resid / df_resid)

    assert row(result, IN)["sum_sq"] == pytest.approx(ss_inp, rel=1e-9)
    assert row(result, "Residual")["sum_sq"] == pytest.approx(ss_resid, rel=1e-9)
    assert row(result, "Residual")["df"] == df_resid
    assert row(result, IN)["F"] == pytest.approx(f_inp, rel=1e-9)
    assert row(result, IN)["p"] == pytest.approx(scipy.stats.f.sf(f_inp, 2, df_resid), rel=1e-6)


def test_partial_eta_squared_by_hand(planted):
    root, _ = planted
    table = fit_anova(load_results(root), "dino").table
    ss_resid = float(table.loc[table["term"] == "Residual", "sum_sq"].iloc[0])
    for _, r in table.iterrows():
        if r["term"] == "Residual":
            assert np.isnan(r["partial_eta_sq"])
        else:
            assert r["partial_eta_sq"] == pytest.approx(r["sum_sq"] / (r["sum_sq"] + ss_resid))
    assert table["partial_eta_sq"].iloc[0] > 0.9  # the planted factor explains nearly all


def test_one_way_balanced_matches_numpy_and_scipy(tmp_path):
    rng = np.random.default_rng(7)
    means = {"a": 0.40, "b": 0.45, "c": 0.43, "d": 0.52}
    groups = {level: m + rng.normal(0, 0.03, 5) for level, m in means.items()}
    i = 0
    for level, values in groups.items():
        for seed, value in enumerate(values):
            write_run(tmp_path, i, {"method.name": level, "seed": seed}, {"clip_i": float(value)})
            i += 1
    result = fit_anova(load_results(tmp_path), "clip_i")
    assert result.terms == ["method.name"]

    # hand-written one-way ANOVA: between / within sums of squares
    all_values = np.concatenate(list(groups.values()))
    grand = all_values.mean()
    ss_between = sum(len(v) * (v.mean() - grand) ** 2 for v in groups.values())
    ss_within = sum(((v - v.mean()) ** 2).sum() for v in groups.values())
    k, n = len(groups), len(all_values)
    f_hand = (ss_between / (k - 1)) / (ss_within / (n - k))
    f_scipy, p_scipy = scipy.stats.f_oneway(*groups.values())

    got = row(result, "method.name")
    assert got["df"] == k - 1
    assert got["sum_sq"] == pytest.approx(ss_between, rel=1e-9)
    assert row(result, "Residual")["sum_sq"] == pytest.approx(ss_within, rel=1e-9)
    assert got["F"] == pytest.approx(f_hand, rel=1e-9)
    assert got["F"] == pytest.approx(f_scipy, rel=1e-9)
    assert got["p"] == pytest.approx(p_scipy, rel=1e-6)
    assert got["partial_eta_sq"] == pytest.approx(ss_between / (ss_between + ss_within))


# ------------------------------------------------------------------ estimability of terms


def test_confounded_interactions_are_dropped(tmp_path):
    """A 2^(3-1) half fraction (c = a xor b): every pair has all four cells, yet each two-way
    interaction is the third main effect under another name, so none is estimable."""
    rng = np.random.default_rng(3)
    i = 0
    for a, b in itertools.product((0, 1), repeat=2):
        c = a ^ b
        for seed in range(3):
            factors = {"f.a": f"a{a}", "f.b": f"b{b}", "f.c": f"c{c}", "seed": seed}
            write_run(tmp_path, i, factors, {"dino": 0.5 + 0.1 * a + rng.normal(0, 0.01)})
            i += 1
    result = fit_anova(load_results(tmp_path), "dino")
    assert result.terms == ["f.a", "f.b", "f.c"]
    assert {t for t, _ in result.dropped} == {"f.a:f.b", "f.a:f.c", "f.b:f.c"}
    assert all("not estimable" in why for _, why in result.dropped)
    assert result.model.df_resid == 12 - 4
    assert np.linalg.matrix_rank(result.model.model.exog) == result.model.model.exog.shape[1]
    assert result.top_term == "f.a"


def test_interaction_dropped_when_it_would_leave_no_residual_df(tmp_path):
    # a full 2 x 2 with one run per cell: main effects leave 1 df, the interaction would take it
    for i, (a, b) in enumerate(itertools.product(("x", "y"), ("p", "q"))):
        write_run(tmp_path, i, {"a": a, "b": b}, {"dino": 0.1 * i + 0.01 * (i == 3)})
    result = fit_anova(load_results(tmp_path), "dino")
    assert result.terms == ["a", "b"]
    assert result.dropped == [("a:b", "would leave no residual degrees of freedom")]
    assert row(result, "Residual")["df"] == 1


def test_interaction_kept_with_replicates(tmp_path):
    rng = np.random.default_rng(0)
    i = 0
    for a, b, seed in itertools.product(("x", "y"), ("p", "q"), (0, 1)):
        # a crossover: the effect of a flips with b
        y = 0.5 + (0.2 if (a == "x") == (b == "p") else 0.0) + rng.normal(0, 0.01)
        write_run(tmp_path, i, {"a": a, "b": b, "seed": seed}, {"dino": y})
        i += 1
    result = fit_anova(load_results(tmp_path), "dino")
    assert result.terms == ["a", "b", "a:b"]
    assert result.top_term == "a:b"


def test_improved_dreambooth_arms_alias_the_experiment_name(tmp_path):
    """The four arms: `experiment` is a relabelling of (beta_schedule, zero_terminal_snr); the
    two real factors and their interaction are tested, the arm name is dropped as aliased."""
    arms = {
        "dreambooth": ("scaled_linear", False),
        "dreambooth_zsnr": ("scaled_linear", True),
        "dreambooth_sigmoid": ("sigmoid", False),
        "dreambooth_sigmoid_zsnr": ("sigmoid", True),
    }
    rng = np.random.default_rng(5)
    i = 0
    for name, (beta, zsnr) in arms.items():
        for subject in ("dog", "cat", "clock"):
            factors = {
                "experiment": name,
                "noise.beta_schedule": beta,
                "noise.zero_terminal_snr": zsnr,
                "subject": subject,
                "seed": 0,
            }
            y = 0.6 + 0.05 * (beta == "sigmoid") + rng.normal(0, 0.01)
            write_run(tmp_path, i, factors, {"dino": y})
            i += 1
    result = fit_anova(load_results(tmp_path), "dino")
    assert result.top_term == "noise.beta_schedule"
    assert "experiment" not in result.terms
    assert any(t == "experiment" and "aliased" in why for t, why in result.dropped)
    assert "noise.beta_schedule:noise.zero_terminal_snr" in result.terms
    assert "subject" in result.terms  # a blocking factor with 3 levels
    assert "seed" not in {short for short, _ in result.ignored}  # constant: not reported


def test_select_terms_keeps_the_model_full_rank(planted):
    root, _ = planted
    data = fit_anova(load_results(root), "dino").data
    terms, dropped = select_terms(data, [f"factor.{IN}", f"factor.{OUT}"])
    assert terms == [(f"factor.{IN}",), (f"factor.{OUT}",)]
    assert dropped[0][0] == f"{IN}:{OUT}" and "3 of 4 df" in dropped[0][1]


def test_named_factors(planted):
    root, _ = planted
    result = fit_anova(load_results(root), "dino", [OUT, f"factor.{ACT}"], interactions=False)
    assert result.terms == [OUT, ACT]
    assert result.top_term == OUT


# -------------------------------------------------------------------------------- errors


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "t2ilab.analysis.anova", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_one_line_error(rc: int, err: str, match: str):
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("t2ilab: error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_cli_empty_dir_exits_2(tmp_path):
    proc = run_cli(str(tmp_path), "--metric", "dino")
    assert_one_line_error(proc.returncode, proc.stderr, "no results.json")
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "runs, argv, match",
    [
        # the metric in no run
        ([({"a": "x"}, {"clip_t": 0.3}), ({"a": "y"}, {"clip_t": 0.4})], [], "missing in all"),
        # one level of every factor
        ([({"a": "x", "seed": s}, {"dino": 0.1 * s}) for s in range(3)], [], "2 or more levels"),
        # named factor with one level
        ([({"a": "x", "b": s}, {"dino": 0.1 * s}) for s in range(3)], ["--factors", "a"], "one"),
        # 3 runs, 3 parameters (intercept, a, b)
        (
            [({"a": "x", "b": "p"}, {"dino": 0.1}), ({"a": "x", "b": "q"}, {"dino": 0.2})]
            + [({"a": "y", "b": "p"}, {"dino": 0.3})],
            [],
            "3 parameters",
        ),
        # a named factor that no run has
        ([({"a": "x"}, {"dino": 0.1})], ["--factors", "nope"], "no such factor"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, runs, argv, match):
    for i, (factors, metrics) in enumerate(runs):
        write_run(tmp_path, i, factors, metrics)
    rc = main([str(tmp_path), "--metric", "dino", *argv])
    assert_one_line_error(rc, capsys.readouterr().err, match)


def test_no_ok_run_is_an_error(tmp_path, capsys):
    write_run(tmp_path, 0, {"a": "x"}, {"dino": 0.5}, status="failed", reason="boom")
    rc = main([str(tmp_path), "--metric", "dino"])
    assert_one_line_error(rc, capsys.readouterr().err, "no ok run")


# ------------------------------------------------------------------------------- the CLI


def test_cli_prints_table_and_writes_reports(planted):
    root, _ = planted
    proc = run_cli(str(root), "--metric", "dino")
    assert proc.returncode == 0, proc.stderr
    assert "| term" in proc.stdout and f"| {IN}" in proc.stdout and "Residual" in proc.stdout
    assert "48 ok runs enter the model" in proc.stdout
    assert "1 failed, 1 skipped" in proc.stdout
    md = (root / "anova.md").read_text()
    assert md.startswith("# ANOVA of dino") and f"dropped term {IN}:{OUT}" in md
    table = pd.read_csv(root / "anova.csv")
    assert list(table.columns) == TABLE_COLUMNS
    assert table["term"].iloc[0] == IN
    levels = pd.read_csv(root / "levels.csv")
    assert set(levels["factor"]) == {IN, OUT, ACT}
    grid = pd.read_csv(root / "heatmap.csv", index_col=0)
    assert np.isnan(grid.loc["up", "up"]) and grid.notna().sum().sum() == 8
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in proc.stderr
    else:
        assert (root / "heatmap.png").is_file() and (root / f"box_{IN}.png").is_file()


def test_cli_out_folder(planted, tmp_path):
    root, _ = planted
    out = tmp_path / "report"
    assert main([str(root), "--metric", "dino", "--out", str(out), "--no-plots"]) == 0
    assert {p.name for p in out.iterdir()} == {"anova.md", "anova.csv", "levels.csv", "heatmap.csv"}
    assert not (root / "anova.md").exists()


# ------------------------------------------------------------------------------ figures


def test_heatmap_grid_means_and_missing_cells(planted):
    root, hand = planted
    result = fit_anova(load_results(root), "dino")
    grid = plots.heatmap_grid(result.data, result.metric_column, f"factor.{IN}", f"factor.{OUT}")
    assert list(grid.index) == list(IN_EFFECT) and list(grid.columns) == list(OUT_EFFECT)
    expected = hand.groupby(["inp", "out"])["y"].mean()
    for (inp, out), value in expected.items():
        assert grid.loc[inp, out] == pytest.approx(value)
    assert np.isnan(grid.loc["up", "up"])
    assert plots.find_position_pair([f"factor.{ACT}", f"factor.{OUT}", f"factor.{IN}"]) == (
        f"factor.{IN}",
        f"factor.{OUT}",
    )
    assert plots.find_position_pair([f"factor.{ACT}"]) is None


def _cell_sweep(root: Path, cell_means: dict[tuple[str, str], float], seeds=(0, 1)):
    """A 2-factor sweep (input x output position), each cell's runs at `cell_means` +- 1e-7."""
    i = 0
    for (inp, out), mean in cell_means.items():
        for seed in seeds:
            factors = {IN: inp, OUT: out, "seed": seed}
            write_run(root, i, factors, {"dino": mean + (1e-7 if seed else -1e-7)})
            i += 1
    return root


def _heatmap_of(root: Path):
    df = load_results(root)
    result = fit_anova(df, "dino")
    heat = heatmap_input(df, result)
    figure = plots.heatmap_figure(
        heat.frame, result.metric_column, heat.row, heat.col, heat.notes, heat.levels
    )
    figure.canvas.draw()  # tick labels are made at draw time
    return result, figure


# cell means of a 2 x 2 sweep that differ in the 4th decimal, and (the issue's) in the 5th
FOURTH_DECIMAL = {("a", "p"): 0.8219, ("a", "q"): 0.8221, ("b", "p"): 0.8224, ("b", "q"): 0.8226}
FIFTH_DECIMAL = {
    ("a", "p"): 0.821901,
    ("a", "q"): 0.821912,
    ("b", "p"): 0.821925,
    ("b", "q"): 0.821934,
}


def test_heatmap_labels_tell_close_means_apart(tmp_path):
    """The issue: every cell read "0.822". Means that differ in the 4th decimal read apart."""
    _, figure = _heatmap_of(_cell_sweep(tmp_path, FOURTH_DECIMAL))
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert len(labels) == 4 and len(set(labels)) == 4, labels
    for label, mean in zip(labels, FOURTH_DECIMAL.values(), strict=True):
        assert float(label) == pytest.approx(mean, abs=5e-5)


def test_level_means_table_tells_close_levels_apart(tmp_path):
    result = fit_anova(load_results(_cell_sweep(tmp_path, FIFTH_DECIMAL)), "dino")
    md = report_markdown(result)
    table = md.split("## Level means")[1]
    rows = [line.split("|") for line in table.splitlines() if line.startswith(f"| {IN} ")]
    means = {row[2].strip(): row[4].strip() for row in rows}
    assert set(means) == {"a", "b"} and means["a"] != means["b"], means  # 0.8219065, 0.8219295


def test_heatmap_colourbar_ticks_are_plain_values(tmp_path):
    """Means 1e-5 apart: matplotlib's default colourbar shows `1e-5+8.219e-1` and ticks 0..3.5;
    the ticks must be the values themselves."""
    _, figure = _heatmap_of(_cell_sweep(tmp_path, FIFTH_DECIMAL))
    colourbar = figure.axes[1]
    assert colourbar.yaxis.get_offset_text().get_text() == ""
    ticks = [float(t.get_text()) for t in colourbar.get_yticklabels() if t.get_text()]
    assert ticks and all(0.8218 < t < 0.8220 for t in ticks), ticks
    assert len(set(ticks)) == len(ticks)
    assert figure.axes[0].get_title().startswith("mean dino")
    assert colourbar.get_ylabel() == "mean dino"
    # the box plots' metric axis too
    result = fit_anova(load_results(tmp_path), "dino")
    box = plots.box_figure(result.data, result.metric_column, f"factor.{IN}")
    box.canvas.draw()
    assert box.axes[0].yaxis.get_offset_text().get_text() == ""


def test_missing_cells_are_hatched_and_explained(tmp_path):
    """Skipped, failed and never-run cells are hatched, say which they are, and the legend
    says what the hatching means; a level only skipped runs have still gets its row."""
    i = 0
    for inp, out in [("a", "p"), ("a", "q"), ("a", "r"), ("b", "p"), ("b", "q")]:
        for seed in (0, 1):
            y = 0.5 + 0.1 * (inp == "b") + 0.01 * seed
            write_run(tmp_path, i, {IN: inp, OUT: out, "seed": seed}, {"dino": y})
            i += 1
    write_run(tmp_path, i, {IN: "c", OUT: "p", "seed": 0}, {}, status="skipped", reason="x")
    write_run(tmp_path, i + 1, {IN: "c", OUT: "q", "seed": 0}, {}, status="failed", reason="y")
    # (b, r) and (c, r) were never run

    _, figure = _heatmap_of(tmp_path)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    hatched = [patch for patch in ax.patches if patch.get_hatch()]
    assert len(hatched) == 4
    notes = sorted(t.get_text() for t in ax.texts if not t.get_text()[0].isdigit())
    assert notes == ["failed", "n/a", "n/a", "skipped"]
    (legend,) = figure.legends
    text = legend.get_texts()[0].get_text()
    assert "hatched" in text and all(word in text for word in ("skipped", "failed", "n/a"))

    assert main([str(tmp_path), "--metric", "dino", "--no-plots"]) == 0
    grid = pd.read_csv(tmp_path / "heatmap.csv", index_col=0)
    assert list(grid.index) == ["a", "b", "c"] and grid.loc["c"].isna().all()


def test_null_factor_reads_model_default(tmp_path):
    """results.json's null (the model's own schedule) is "model default" in the tables, the
    box plots and the heatmap, never None or nan."""
    i = 0
    for beta, prediction in itertools.product((None, "sigmoid"), (None, "v_prediction")):
        for seed in (0, 1):
            factors = {
                "noise.beta_schedule": beta,
                "noise.prediction_type": prediction,
                "seed": seed,
            }
            y = 0.5 + 0.1 * (beta is None) + 0.02 * (prediction is None) + 0.001 * seed
            write_run(tmp_path, i, factors, {"dino": y})
            i += 1
    df = load_results(tmp_path)
    result = fit_anova(df, "dino")

    levels = level_means(result)
    assert set(levels["level"]) == {"model default", "sigmoid", "v_prediction"}
    md = report_markdown(result)
    assert "model default" in md
    box = plots.box_figure(result.data, result.metric_column, "factor.noise.beta_schedule")
    box.canvas.draw()
    assert [t.get_text() for t in box.axes[0].get_xticklabels()] == ["model default", "sigmoid"]
    heat = heatmap_input(df, result, ["noise.beta_schedule", "noise.prediction_type"])
    figure = plots.heatmap_figure(heat.frame, result.metric_column, heat.row, heat.col)
    figure.canvas.draw()
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    ticks += [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == ["model default", "sigmoid", "model default", "v_prediction"]
    for text in (md, levels.to_csv(), *ticks):
        assert "None" not in text and "nan" not in text.lower()


def test_plots_without_matplotlib_fail_clearly(planted, monkeypatch, tmp_path):
    root, _ = planted
    result = fit_anova(load_results(root), "dino")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plots.PlottingUnavailable, match="pip install matplotlib"):
        plots.box_plots(result.data, result.metric_column, result.factors, tmp_path)


def _assert_png(path: Path):
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def test_plot_files_written_and_what_they_show(planted, tmp_path):
    """plots.py's own logic: file names, every model run in the boxes, the missing cell left
    out of the colours, PNGs renamed into place and marked as the tool's."""
    root, _ = planted
    result = fit_anova(load_results(root), "dino")

    boxes = plots.box_plots(result.data, result.metric_column, result.factors, tmp_path)
    assert sorted(p.name for p in boxes) == sorted(f"box_{f}.png" for f in (IN, OUT, ACT))
    box_axes = plots.box_figure(result.data, result.metric_column, f"factor.{IN}").axes[0]
    points = sum(len(c.get_offsets()) for c in box_axes.collections)
    assert points == result.n_used  # one dot per run
    figure = plots.heatmap_figure(
        result.data, result.metric_column, f"factor.{IN}", f"factor.{OUT}"
    )
    (shown,) = figure.axes[0].images
    assert shown.get_array().mask.sum() == 1 and shown.get_array().mask[2, 2]  # (up, up)
    heat = plots.heatmap(
        result.data, result.metric_column, f"factor.{IN}", f"factor.{OUT}", tmp_path
    )
    assert heat.name == "heatmap.png"
    for path in [*boxes, heat]:
        _assert_png(path)
        assert png_is_ours(path)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed into place


def test_plot_files_are_valid_pngs(planted, tmp_path):
    pytest.importorskip("matplotlib")
    root, _ = planted
    assert main([str(root), "--metric", "dino", "--out", str(tmp_path)]) == 0
    for name in [f"box_{IN}.png", f"box_{OUT}.png", f"box_{ACT}.png", "heatmap.png"]:
        _assert_png(tmp_path / name)


# ----------------------------------------------------------------------------------- W&B


class FakeRun:
    def __init__(self, i: int, config: dict, summary: dict, state: str = "finished"):
        self.id, self.name, self.group = f"run{i}", f"run-{i}", "adapter_sweep"
        self.path = ["me", "t2ilab", self.id]
        self.config, self.summary, self.state = config, summary, state


class FakeApi:
    def __init__(self, runs: list[FakeRun]):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None, **kwargs):
        self.calls.append((path, filters))
        return iter(self._runs)


def fake_wandb_runs() -> list[FakeRun]:
    runs = []
    for i, r in enumerate(planted_runs()):
        config = {
            # what train.py logs: the flat config with dotted keys ...
            IN: r[IN],
            OUT: r[OUT],
            "seed": r["seed"],
            "paths.output_dir": f"/logs/multirun/{i}",  # differs in every run: not a factor
            "trainer.max_steps": 100,
            # ... a nested section, and W&B's own bookkeeping
            "adapter": {"act": r[ACT]},
            "_wandb": {"cli_version": "0.31.0"},
        }
        summary = {
            "eval/dino": r["dino"],
            "train/loss": 0.1,
            "trainer/global_step": 100,
            "_step": 100,
            "_runtime": 12.0,
            "eval/prompts": {"_type": "table-file", "path": "x.json"},
        }
        runs.append(FakeRun(i, config, summary))
    runs.append(FakeRun(900, {IN: "up", OUT: "up", "seed": 0}, {"_step": 3}, state="crashed"))
    runs.append(FakeRun(901, {IN: "up", OUT: "up", "seed": 1}, {}, state="running"))
    return runs


def test_wandb_runs_as_a_results_table():
    api = FakeApi(fake_wandb_runs())
    df = load_wandb_runs("me/t2ilab", ["adapter_sweep"], api=api)
    assert api.calls == [("me/t2ilab", {"group": "adapter_sweep"})]
    assert {f"factor.{IN}", f"factor.{OUT}", f"factor.{ACT}", "factor.seed"} <= set(df.columns)
    assert not any(c.startswith("factor._wandb") for c in df.columns)
    assert {"metric.dino", "metric.train/loss"} <= set(df.columns)
    assert not any(c.startswith("metric._") or "prompts" in c for c in df.columns)
    assert df["status"].value_counts().to_dict() == {"ok": 48, "failed": 1, "skipped": 1}
    assert df.loc[0, "run_dir"] == "me/t2ilab/run0" and df.loc[0, "steps"] == 100

    several = FakeApi(fake_wandb_runs()[:1])
    load_wandb_runs("me/t2ilab", ["a", "b"], api=several)
    assert several.calls == [("me/t2ilab", {"group": {"$in": ["a", "b"]}})]
    with pytest.raises(UserError, match="no runs in group g"):
        load_wandb_runs("me/t2ilab", ["g"], api=FakeApi([]))


def test_wandb_cli_matches_the_folder_analysis(planted, tmp_path, capsys):
    root, _ = planted
    api = FakeApi(fake_wandb_runs())
    out = tmp_path / "wandb_report"
    argv = ["--wandb", "me/t2ilab", "--group", "adapter_sweep", "--metric", "dino"]
    assert main([*argv, "--out", str(out), "--no-plots"], api=api) == 0
    printed = capsys.readouterr().out
    assert "wandb:me/t2ilab group adapter_sweep" in printed
    assert "paths.output_dir: a different value in every run" in printed

    from_wandb = pd.read_csv(out / "anova.csv")
    from_folder = fit_anova(load_results(root), "dino").table
    pd.testing.assert_frame_equal(from_wandb, from_folder, check_dtype=False, rtol=1e-9)


def test_wandb_argument_errors(capsys):
    rc = main(["--wandb", "just-a-project", "--metric", "dino"], api=FakeApi([]))
    assert_one_line_error(rc, capsys.readouterr().err, "ENTITY/PROJECT")
    rc = main(["--wandb", "me/empty", "--metric", "dino"], api=FakeApi([]))
    assert_one_line_error(rc, capsys.readouterr().err, "no results")


def test_wandb_log_offline(planted, tmp_path):
    from wandb_history import history_keys

    root, _ = planted
    out = tmp_path / "report"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "",
        "HOME": str(tmp_path),
        "NETRC": str(tmp_path / "no-netrc"),
    }
    proc = run_cli(str(root), "--metric", "dino", "--out", str(out), "--wandb-log", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B analysis run:" in proc.stdout
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    keys = history_keys(run_dir)
    assert any(k.startswith("anova/table") for k in keys)
    assert any(k.startswith("anova/levels") for k in keys)
