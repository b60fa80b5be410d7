"""The sweep aggregator: results.json files of a multirun folder -> one tidy table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from t2ilab.analysis.collect import (
    BASE_COLUMNS,
    METRIC_ORDER,
    UnreadableResults,
    load_results,
    main,
    to_markdown,
)
from t2ilab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "0": {
        "experiment": "dreambooth_sigmoid",
        "status": "ok",
        "reason": None,
        "factors": {"noise.beta_schedule": "sigmoid", "seed": 0, "data.class_noun": "dog"},
        "metrics": {"clip_t": 0.31, "dino": 0.62, "pres": 0.5},
        "steps": 100,
        "wall_time_s": 12.5,
    },
    "1": {
        "experiment": "dreambooth",
        "status": "failed",
        "reason": "CUDA out of memory | retry with batch_size=1",
        "factors": {"noise.beta_schedule": "scaled_linear", "seed": 1},
        "metrics": {},
        "steps": 3,
        "wall_time_s": 1.0,
    },
    # 10 after 2 (natural order), and a list-valued factor that must become a JSON string
    "10": {
        "experiment": "dreambooth",
        "status": "ok",
        "reason": None,
        "factors": {
            "noise.beta_schedule": "scaled_linear",
            "seed": 0,
            "eval.prompts": ["a {identifier} {class_noun}", "a red {identifier} {class_noun}"],
        },
        "metrics": {"dino": 0.55, "fid": 30.25},
        "steps": 100,
        "wall_time_s": 11.0,
    },
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    for name, results in RUNS.items():
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps(results))
    # a run killed mid-write: must be reported and skipped, never block the table
    (root / "2").mkdir()
    (root / "2" / "results.json").write_text('{"experiment": "dreambooth", "sta')
    # hydra leaves other files around; only results.json counts
    (root / "0" / ".hydra").mkdir()
    (root / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_load_results_rows_columns_values(sweep: Path):
    with pytest.warns(UnreadableResults, match=r"2[/\\]results\.json"):
        df = load_results(sweep)

    assert len(df) == 3
    assert list(df["run_dir"]) == ["0", "1", "10"]
    assert list(df.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert list(df.columns[len(BASE_COLUMNS) :]) == [
        "factor.noise.beta_schedule",
        "factor.seed",
        "factor.data.class_noun",
        "factor.eval.prompts",
        # canonical metric order, not first-seen order
        "metric.dino",
        "metric.clip_t",
        "metric.pres",
        "metric.fid",
    ]

    ok = df.set_index("run_dir")
    assert list(df["status"]) == ["ok", "failed", "ok"]
    assert ok.loc["1", "reason"].startswith("CUDA out of memory")
    assert pd.isna(ok.loc["0", "reason"])
    assert list(df["steps"]) == [100, 3, 100]
    assert ok.loc["0", "wall_time_s"] == 12.5
    assert ok.loc["0", "factor.noise.beta_schedule"] == "sigmoid"
    assert ok.loc["0", "metric.dino"] == pytest.approx(0.62)
    assert ok.loc["10", "metric.fid"] == pytest.approx(30.25)
    # union of columns: missing values are NaN
    assert math.isnan(ok.loc["1", "metric.dino"])
    assert math.isnan(ok.loc["10", "metric.clip_t"])
    assert pd.isna(ok.loc["1", "factor.data.class_noun"])
    # list-valued factors are JSON strings
    prompts = ok.loc["10", "factor.eval.prompts"]
    assert isinstance(prompts, str)
    assert json.loads(prompts) == RUNS["10"]["factors"]["eval.prompts"]
    assert all(df[c].dtype == float for c in df.columns if c.startswith("metric."))


def test_csv_round_trip(sweep: Path, tmp_path: Path):
    with pytest.warns(UnreadableResults):
        df = load_results(sweep)
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    back = pd.read_csv(path, dtype={"run_dir": str})
    assert list(back.columns) == list(df.columns)
    assert list(back["run_dir"]) == ["0", "1", "10"]
    assert list(back["status"]) == ["ok", "failed", "ok"]
    assert list(back["steps"]) == [100, 3, 100]
    pd.testing.assert_series_equal(back["metric.dino"], df["metric.dino"])
    pd.testing.assert_series_equal(back["metric.fid"], df["metric.fid"])
    assert json.loads(back.loc[2, "factor.eval.prompts"]) == RUNS["10"]["factors"]["eval.prompts"]


def test_markdown_table(sweep: Path):
    with pytest.warns(UnreadableResults):
        df = load_results(sweep)
    lines = to_markdown(df).splitlines()
    assert len(lines) == 2 + len(df)  # header, rule, one line per run
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(df.columns)
    assert set(lines[1]) <= set("|-: ")
    for line, run_dir in zip(lines[2:], df["run_dir"], strict=True):
        assert line.startswith("|") and line.endswith("|")
        assert line.strip("|").split("|")[0].strip() == run_dir
    # a pipe inside a cell is escaped, so every row keeps the header's column count
    n_cells = lines[0].count("|")
    assert all(line.replace("\\|", "").count("|") == n_cells for line in lines)


def test_single_run_dir(sweep: Path):
    df = load_results(sweep / "0")
    assert len(df) == 1
    assert df.loc[0, "run_dir"] == "."
    assert df.loc[0, "metric.dino"] == pytest.approx(0.62)
    # the results.json itself is accepted too
    assert len(load_results(sweep / "0" / "results.json")) == 1


def test_metric_order_matches_metric_names():
    from t2ilab.metrics import METRIC_NAMES

    assert METRIC_ORDER == METRIC_NAMES


def test_main_writes_csv_and_markdown(sweep: Path, capsys):
    assert main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "2 results.json" not in out
    assert "warning:" in err and str(Path("2") / "results.json") in err
    assert "3 runs: 2 ok, 1 failed, 0 skipped" in out
    csv = pd.read_csv(sweep / "results.csv")
    assert len(csv) == 3
    md = (sweep / "results.md").read_text()
    assert md.splitlines()[0].startswith("| run_dir")
    assert md.strip() in out


def test_main_custom_outputs(sweep: Path, tmp_path: Path, capsys):
    out_csv, out_md = tmp_path / "tables" / "sweep.csv", tmp_path / "tables" / "sweep.md"
    assert main([str(sweep), "--out", str(out_csv), "--markdown", str(out_md)]) == 0
    assert out_csv.is_file() and out_md.is_file()
    assert not (sweep / "results.csv").exists()


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2ilab: error: no results.json") and err.count("\n") == 1
    assert "Traceback" not in err

    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    with pytest.raises(UserError, match="no results.json"):
        load_results(empty)

    # only corrupt files: nothing to aggregate
    (empty / "0").mkdir()
    (empty / "0" / "results.json").write_text("[1, 2]")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    # one line that names the broken file, no warning repeating it
    assert err.startswith("t2ilab: error: none of the 1 results.json") and err.count("\n") == 1
    assert str(empty / "0" / "results.json") in err


def test_cli_subprocess(sweep: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "t2ilab.analysis.collect", str(sweep)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 runs: 2 ok, 1 failed, 0 skipped" in proc.stdout
    assert "| run_dir" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert (sweep / "results.csv").is_file() and (sweep / "results.md").is_file()

    proc = subprocess.run(
        [sys.executable, "-m", "t2ilab.analysis.collect", str(sweep / "nothing-here")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("t2ilab: error:") and "Traceback" not in proc.stderr


def test_group_means_average_over_subjects(tmp_path):
    import json as _json

    from t2ilab.analysis.collect import group_means, load_results

    values = {("a", "dog"): 0.2, ("a", "cat"): 0.4, ("b", "dog"): 0.6, ("b", "cat"): 1.0}
    for i, ((experiment, subject), dino) in enumerate(values.items()):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "results.json").write_text(
            _json.dumps(
                {
                    "experiment": experiment,
                    "status": "ok",
                    "reason": None,
                    "factors": {"experiment": experiment, "subject": subject},
                    "metrics": {"dino": dino},
                    "steps": 1,
                    "wall_time_s": 1.0,
                }
            )
        )
    table = group_means(load_results(tmp_path), "experiment").set_index("factor.experiment")
    assert table.loc["a", "metric.dino.mean"] == pytest.approx(0.3)
    assert table.loc["b", "metric.dino.mean"] == pytest.approx(0.8)
    assert table.loc["b", "metric.dino.std"] == pytest.approx(((0.2**2) * 2) ** 0.5)  # sample std
    assert table.loc["b", "metric.dino.sem"] == pytest.approx(((0.2**2) * 2) ** 0.5 / 2**0.5)
    assert list(table["runs"]) == [2, 2]


def _uniform_sweep(root: Path) -> Path:
    """Four runs that differ only in seed and method.lr; everything else is the same."""
    data_dir = "/home/someone/datasets/dreambooth/dataset/dog"
    for i, (seed, lr) in enumerate([(0, 1e-4), (0, 1e-5), (1, 1e-4), (1, 1e-5)]):
        run = root / str(i)
        run.mkdir(parents=True)
        results = {
            "experiment": "dreambooth",
            "status": "ok",
            "reason": None,
            "factors": {
                "model.name": "toy_sd",
                "seed": seed,
                "method.lr": lr,
                "data.instance_dir": data_dir,
                "noise.beta_schedule": None,
            },
            "metrics": {"dino": 0.5 + i * i / 100, "clip_t": 0.3},
            "steps": 100,
            "wall_time_s": 10.0 + i,
        }
        (run / "results.json").write_text(json.dumps(results))
    return root


def test_markdown_lists_what_is_the_same_in_every_run_once(tmp_path, capsys):
    sweep = _uniform_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    md = (sweep / "results.md").read_text()
    same, empty, table = md.strip().split("\n\n")
    header = table.splitlines()[0]
    assert same == (
        "Same in every run: experiment=dreambooth, status=ok, steps=100, model.name=toy_sd, "
        "data.instance_dir=.../dreambooth/dataset/dog, metric.clip_t=0.3"
    )
    assert empty.startswith("Empty in every run: reason, noise.beta_schedule")
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == [
        "run_dir",
        "wall_time_s",
        "factor.seed",
        "factor.method.lr",
        "metric.dino",
    ]
    assert md.strip() in printed
    # the CSV, for machines, keeps every column
    csv = pd.read_csv(sweep / "results.csv")
    assert {"factor.model.name", "factor.data.instance_dir", "metric.clip_t", "reason"} <= set(
        csv.columns
    )
    assert set(csv["factor.data.instance_dir"]) == {"/home/someone/datasets/dreambooth/dataset/dog"}
    # one run has no "same in every run": its table keeps every column
    assert main([str(sweep / "0")]) == 0
    assert (sweep / "0" / "results.md").read_text().startswith("| run_dir | experiment")


def test_group_by_table_lists_what_is_the_same_in_every_group(tmp_path, capsys):
    sweep = _uniform_sweep(tmp_path / "sweep")
    assert main([str(sweep), "--group-by", "method.lr"]) == 0
    printed = capsys.readouterr().out
    grouped = printed.split("-> ")[1]  # after the run table's summary line
    assert (
        "Same in every group: runs=2, metric.clip_t.mean=0.3, metric.clip_t.sem=0, "
        "metric.clip_t.std=0" in grouped
    )
    header = next(line for line in grouped.splitlines() if line.startswith("| factor.method.lr"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "factor.method.lr",
        "metric.dino.mean",
        "metric.dino.sem",
        "metric.dino.std",
    ]
    csv = pd.read_csv(sweep / "results_by_method_lr.csv")
    assert {"runs", "metric.clip_t.mean", "metric.clip_t.std"} <= set(csv.columns)
