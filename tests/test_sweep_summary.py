"""A multirun with failed runs says so at its end and exits 1; one without exits 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _support import FAST, ROOT

from t2ilab.sweep_summary import summarize, sweep_outcomes


def _job(sweep, name, results=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def test_the_summary_names_each_failed_run_and_counts_the_rest(tmp_path):
    _job(tmp_path, "0", {"status": "ok"})
    _job(tmp_path, "1", {"status": "failed", "reason": "method.lr=-1.0 must be positive"})
    _job(tmp_path, "2", {"status": "skipped", "reason": "output before input"})
    _job(tmp_path, "10")  # killed: no results.json
    lines, failed = summarize(tmp_path, sweep_outcomes(tmp_path))
    assert failed
    assert lines == [
        f"t2ilab: error: run {tmp_path / '1'} failed: method.lr=-1.0 must be positive",
        f"t2ilab: error: run {tmp_path / '10'} no results: it ended without results.json",
        f"t2ilab: error: sweep {tmp_path}: 2 of 4 runs failed (1 failed, 1 no results, 1 ok, "
        f"1 skipped); table of all runs: python -m t2ilab.analysis.collect {tmp_path}",
    ]
    ok, failed = summarize(tmp_path, {tmp_path / "0": {"status": "ok"}})
    assert not failed and ok == [
        f"t2ilab: sweep {tmp_path}: 1 runs (1 ok); table: python -m t2ilab.analysis.collect "
        f"{tmp_path}"
    ]


@pytest.mark.slow
def test_a_sweep_with_a_failed_run_exits_1_and_says_so_last(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "experiment=dreambooth_sigmoid",
        "model=tiny_sd",
        *FAST,
        "trainer.max_steps=1",
        "eval.enabled=false",
        "export.enabled=false",
        "callbacks.samples.at_end=false",
        "method.lr=1e-4,-1",
        f"hydra.sweep.dir={sweep}",
        f"paths.class_images_dir={tmp_path / 'class_images'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"t2ilab: error: sweep {sweep}: 1 of 2 runs failed"), last
    assert f"t2ilab: error: run {sweep / '1'} failed: method.lr=-1.0 must be positive" in (
        proc.stderr
    )
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "ok"
