"""sweeps/toy_pixart_studies.sh picks its runs as documented: which arms run (ARMS), when a
per-seed stage 1 is trained, and which finished runs are skipped. `python` is replaced by a shim
on PATH that records each call, so the script's choices are checked without training."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from _support import ROOT

SCRIPT = ROOT / "sweeps" / "toy_pixart_studies.sh"
# the script's own settings: a value left in the caller's shell must not steer these tests
SETTINGS = ("ARMS", "STAGE1_FROM", "STAGE1_STEPS", "STAGE1_DECAY", "TEXT_STEPS", "SCRATCH_STEPS")


def _sweep(tmp_path, *seeds, **env):
    calls = tmp_path / "calls.tsv"
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir(exist_ok=True)
    # one line a call, the arguments tab-separated (no override here holds a tab)
    shim.write_text(f"#!/usr/bin/env bash\n{{ printf '%s\\t' \"$@\"; echo; }} >> '{calls}'\n")
    shim.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), *map(str, seeds)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if k not in SETTINGS},
            **env,
            "PATH": f"{shim.parent}:{os.environ['PATH']}",
        },
    )
    runs = []
    if calls.exists():
        for line in calls.read_text().splitlines():
            args = line.rstrip("\t").split("\t")
            assert args[0] == "train.py"
            run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
            runs.append(os.path.relpath(run_dir, tmp_path / "out"))
    return proc, runs


@pytest.fixture
def stage1(tmp_path):
    folder = tmp_path / "stage1"
    (folder / "export" / "transformer").mkdir(parents=True)
    return str(folder)


def test_every_arm_by_default_from_a_shared_stage1(tmp_path, stage1):
    proc, runs = _sweep(tmp_path, 0, 1, STAGE1_FROM=stage1)
    assert proc.returncode == 0, proc.stderr
    assert runs == [
        f"seed{s}/{arm}" for s in (0, 1) for arm in ("stage2", "stage2_class", "scratch")
    ]


def test_arms_picks_the_runs(tmp_path, stage1):
    proc, runs = _sweep(tmp_path, 0, 1, STAGE1_FROM=stage1, ARMS="stage2 stage2_class")
    assert proc.returncode == 0, proc.stderr
    assert runs == ["seed0/stage2", "seed0/stage2_class", "seed1/stage2", "seed1/stage2_class"]


def test_a_per_seed_stage1_only_for_the_arms_that_start_from_it(tmp_path):
    proc, runs = _sweep(tmp_path, 3, ARMS="stage2_class")
    assert proc.returncode == 0, proc.stderr
    assert runs == ["seed3/stage1", "seed3/stage2_class"]
    (tmp_path / "b").mkdir()
    proc, runs = _sweep(tmp_path / "b", 3, ARMS="scratch")
    assert proc.returncode == 0, proc.stderr
    assert runs == ["seed3/scratch"]


def test_a_finished_run_is_skipped(tmp_path, stage1):
    done = tmp_path / "out" / "seed0" / "stage2"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"status": "ok"}, indent=2))
    proc, runs = _sweep(tmp_path, 0, STAGE1_FROM=stage1, ARMS="stage2 scratch")
    assert proc.returncode == 0, proc.stderr
    assert runs == ["seed0/scratch"]
    assert f"done already: {done}" in proc.stdout


def test_an_unknown_arm_is_refused_in_one_line(tmp_path, stage1):
    proc, runs = _sweep(tmp_path, 0, STAGE1_FROM=stage1, ARMS="stage2 staged")
    assert proc.returncode == 2 and runs == []
    assert proc.stderr.strip().splitlines() == [
        "ARMS: unknown arm 'staged'; choose from stage2 stage2_class scratch"
    ]
