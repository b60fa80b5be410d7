"""Paired differences across seeds (python -m t2ilab.analysis.paired), checked against the
t interval computed by hand from the pairs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from t2ilab.analysis.collect import load_results
from t2ilab.analysis.paired import main, paired_differences
from t2ilab.errors import UserError

# dino of the baseline and of two other identifiers, seeds 0-3
DINO = {
    "sks": [0.20, 0.10, 0.30, 0.25],
    "plain": [0.10, 0.05, 0.15, 0.20],  # lower in every seed
    "unique": [0.25, 0.05, 0.40, 0.20],  # differences +0.05 -0.05 +0.10 -0.05: noise
}
T_975_DF3 = 3.182446305284263  # Student's t, 97.5% quantile, 3 degrees of freedom


def _sweep(root, runs=DINO, extra=None):
    n = 0
    for identifier, values in runs.items():
        for seed, dino in enumerate(values):
            folder = root / str(n)
            folder.mkdir(parents=True)
            factors = {"data.identifier": identifier, "seed": seed, **(extra or {})}
            results = {
                "experiment": "dreambooth",
                "status": "ok",
                "reason": None,
                "factors": factors,
                "metrics": {"dino": dino, "pres": 0.1 + 0.01 * seed},
                "steps": 10,
                "wall_time_s": 1.0,
            }
            (folder / "results.json").write_text(json.dumps(results))
            n += 1
    return root


def _by_hand(a, b):
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diff) / len(diff)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
    se = sd / math.sqrt(len(diff))
    return mean, se, mean - T_975_DF3 * se, mean + T_975_DF3 * se


def test_differences_and_intervals_match_the_hand_computation(tmp_path):
    table = paired_differences(load_results(_sweep(tmp_path)), "data.identifier", "sks")
    table = table.set_index(["level", "metric"])
    for level, verdict in (("plain", True), ("unique", False)):
        row = table.loc[(level, "dino")]
        mean, se, low, high = _by_hand(DINO[level], DINO["sks"])
        assert row["pairs"] == 4
        assert row["difference"] == pytest.approx(mean)
        assert row["se"] == pytest.approx(se)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
        assert bool(row["beyond_seed_spread"]) is verdict
        assert row["baseline_mean"] == pytest.approx(sum(DINO["sks"]) / 4)
    # pres is the same function of the seed for every identifier: no difference at all
    same = table.loc[("plain", "pres")]
    assert same["difference"] == pytest.approx(0) and same["ci_low"] == pytest.approx(0)
    assert not same["beyond_seed_spread"]


def test_runs_pair_by_seed_not_by_order(tmp_path):
    """A missing run leaves its seed unpaired; the rest still pair by seed."""
    runs = {"sks": DINO["sks"], "plain": DINO["plain"]}
    root = _sweep(tmp_path, runs)
    (root / "4" / "results.json").unlink()  # plain, seed 0
    row = paired_differences(load_results(root), "data.identifier", "sks", ["dino"]).iloc[0]
    mean, se, _, _ = _by_hand(DINO["plain"][1:], DINO["sks"][1:])
    assert row["pairs"] == 3
    assert row["difference"] == pytest.approx(mean) and row["se"] == pytest.approx(se)


def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    root = _sweep(tmp_path)
    assert main([str(root), "--factor", "data.identifier", "--baseline", "sks"]) == 0
    out = capsys.readouterr().out
    assert "| plain | dino | 4 |" in out and "| yes |" in out
    table = pd.read_csv(root / "paired_data_identifier.csv")
    assert set(table["level"]) == {"plain", "unique"} and set(table["metric"]) == {"dino", "pres"}
    assert main([str(root), "--factor", "data.identifier", "--baseline", "sks"]) == 0  # rerun


@pytest.mark.parametrize(
    "args, message",
    [
        (["--factor", "data.nothing", "--baseline", "sks"], "--factor data.nothing"),
        (["--factor", "data.identifier", "--baseline", "xyz"], "--baseline xyz"),
        (["--factor", "data.identifier", "--baseline", "sks", "--metrics", "fid"], "fid"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    root = _sweep(tmp_path)
    assert main([str(root), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2ilab: error:") and "\n" not in err and message in err


def test_a_users_file_of_the_same_name_is_left_alone(tmp_path, capsys):
    root = _sweep(tmp_path)
    (root / "paired_data_identifier.csv").write_text("my notes\n")
    assert main([str(root), "--factor", "data.identifier", "--baseline", "sks"]) == 2
    assert (root / "paired_data_identifier.csv").read_text() == "my notes\n"


def test_one_level_only_is_refused(tmp_path):
    df = load_results(_sweep(tmp_path, {"sks": DINO["sks"]}))
    with pytest.raises(UserError, match="only one level"):
        paired_differences(df, "data.identifier", "sks")


def test_factors_that_come_with_a_level_are_part_of_it(tmp_path, capsys):
    """Each Improved-DreamBooth arm sets its own beta schedule: the runs still pair by seed."""
    _sweep(tmp_path / "baseline", {"sks": DINO["sks"]}, {"noise.beta_schedule": "scaled_linear"})
    _sweep(tmp_path / "other", {"plain": DINO["plain"]}, {"noise.beta_schedule": "sigmoid"})
    table = paired_differences(load_results(tmp_path), "data.identifier", "sks", ["dino"])
    row = table.iloc[0]
    mean, se, _, _ = _by_hand(DINO["plain"], DINO["sks"])
    assert row["pairs"] == 4
    assert row["difference"] == pytest.approx(mean) and row["se"] == pytest.approx(se)
    assert table.attrs["with_level"] == ["noise.beta_schedule"]
    assert main([str(tmp_path), "--factor", "data.identifier", "--baseline", "sks"]) == 0
    assert "noise.beta_schedule changes with data.identifier" in capsys.readouterr().out


def test_a_factor_that_varies_within_a_level_still_separates_runs(tmp_path):
    """Two learning rates per identifier: each run pairs with the baseline at its own lr."""
    _sweep(tmp_path / "a", DINO, {"method.lr": 1e-4})
    _sweep(
        tmp_path / "b", {k: [v + 0.5 for v in vs] for k, vs in DINO.items()}, {"method.lr": 1e-3}
    )
    table = paired_differences(load_results(tmp_path), "data.identifier", "sks", ["dino"])
    row = table.set_index("level").loc["plain"]
    mean, _, _, _ = _by_hand(DINO["plain"] * 2, DINO["sks"] * 2)
    assert row["pairs"] == 8 and row["difference"] == pytest.approx(mean)
    assert table.attrs["with_level"] == []
