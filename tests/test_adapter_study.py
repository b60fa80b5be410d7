"""The adapter study end to end: a design-space multirun on the tiny model, then the ANOVA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _support import ROOT, run_sweep
from PIL import Image


@pytest.mark.slow
def test_position_sweep_then_anova(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 3 x 2 of the 10 x 7 grid: five valid pairs and one impossible (FFN_out -> FFN_in).
    proc = run_sweep(
        "adapter_positions",
        [
            "trainer.max_steps=2",
            "method.input_position=SA_in,CA_in,FFN_out",
            "method.output_position=FFN_in,Trans_out",
        ],
        sweep_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    assert len(results) == 6
    statuses = {
        (r["factors"]["method.input_position"], r["factors"]["method.output_position"]): r["status"]
        for r in results
    }
    assert statuses.pop(("FFN_out", "FFN_in")) == "skipped"
    assert set(statuses.values()) == {"ok"}
    skipped = next(r for r in results if r["status"] == "skipped")
    assert "before" in skipped["reason"] and skipped["wall_time_s"] < 30

    out = tmp_path / "anova"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2ilab.analysis.anova",
            str(sweep_dir),
            "--metric",
            "dino",
            "--factors",
            "method.input_position",
            "method.output_position",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "anova.md").read_text()
    assert "method.input_position" in table and "partial" in table.lower()
    assert (out / "anova.csv").is_file()
    with Image.open(out / "heatmap.png") as heatmap:
        assert heatmap.size[0] > 100
    assert list(out.glob("box_*.png"))
