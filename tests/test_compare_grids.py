"""compare_grids: each run's last sample grid side by side, labelled by the varying factors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from t2ilab.analysis.compare_grids import LABEL_HEIGHT, compare_grids, main
from t2ilab.errors import UserError


def _run(folder, factors, colours, size=(40, 30)):
    (folder / "samples").mkdir(parents=True)
    result = {"experiment": "x", "status": "ok", "reason": None, "factors": factors,
              "metrics": {"dino": 0.5}, "steps": 2, "wall_time_s": 1.0}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(result))
    for step, colour in colours.items():  # only the last grid of a run is shown
        Image.new("RGB", size, colour).save(folder / "samples" / f"step_{step:06d}.png")


def test_last_grids_side_by_side_in_run_order(tmp_path):
    _run(tmp_path / "0", {"seed": 0, "method.prior": True}, {100: "red", 200: "blue"})
    _run(tmp_path / "1", {"seed": 0, "method.prior": False}, {200: "green"})
    _run(tmp_path / "2", {"seed": 1, "method.prior": True}, {200: "yellow"})
    picture = np.asarray(compare_grids(tmp_path))
    assert picture.shape == (30 + LABEL_HEIGHT, 3 * 40, 3)
    body = picture[LABEL_HEIGHT:]
    assert (body[:, :40] == (0, 0, 255)).all()  # run 0's step 200, not step 100
    assert (body[:, 40:80] == (0, 128, 0)).all()
    assert (body[:, 80:] == (255, 255, 0)).all()
    only = np.asarray(compare_grids(tmp_path, {"seed": "1"}))
    assert only.shape[1] == 40 and (only[LABEL_HEIGHT:] == (255, 255, 0)).all()
    out = tmp_path / "grid.png"
    assert main([str(tmp_path), "--out", str(out), "--where", "seed=0"]) == 0
    assert Image.open(out).size == (80, 30 + LABEL_HEIGHT)


def test_clear_errors(tmp_path):
    _run(tmp_path / "0", {"seed": 0}, {10: "red"})
    _run(tmp_path / "1", {"seed": 1}, {10: "red"}, size=(20, 20))
    with pytest.raises(UserError, match="differ in size"):
        compare_grids(tmp_path)
    with pytest.raises(UserError, match="no factor lr"):
        compare_grids(tmp_path, {"lr": "1"})


def test_a_factor_one_run_did_not_set_still_labels_both(tmp_path):
    _run(tmp_path / "0", {"seed": 0, "method.prior": False}, {10: "red"})
    _run(tmp_path / "1", {"seed": 0}, {10: "blue"})
    from t2ilab.analysis.collect import load_results
    from t2ilab.analysis.compare_grids import varying_factors

    assert varying_factors(load_results(tmp_path)) == ["factor.method.prior"]


def test_labels_name_the_factors_or_leave_the_names_to_the_title(tmp_path):
    """Wide panels read `input_position=SA_in, ...`; panels too narrow for that show the
    values alone and the title names the factors once (no label cut mid-name)."""
    from PIL import ImageDraw

    from t2ilab.analysis.compare_grids import _panel_labels

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = ["input_position", "output_position"]
    values = [["SA_in", "FFN_in"], ["CA_in", "Trans_out"]]
    labels, note = _panel_labels(draw, names, values, 400)
    assert labels == [
        "input_position=SA_in, output_position=FFN_in",
        "input_position=CA_in, output_position=Trans_out",
    ]
    assert note == ""
    labels, note = _panel_labels(draw, names, values, 60)
    assert labels == ["SA_in, FFN_in", "CA_in, Trans_out"]
    assert note == "; labels: input_position, output_position"


def test_path_factors_show_the_trailing_parts_that_tell_runs_apart():
    from t2ilab.analysis.compare_grids import short_paths

    runs = ["/work/a/.keep/pixart_ln/stage1", "/work/a/.keep/studies/0/stage1", "-"]
    assert short_paths(runs) == ["pixart_ln/stage1", "0/stage1", "-"]
    assert short_paths(["/x/one/", "/x/two"]) == ["one", "two"]
    assert short_paths(["SA_in", 0.001, True]) == ["SA_in", 0.001, True]
    assert short_paths(["/same/path", "/same/path"]) == ["path", "path"]


def test_panel_labels_do_not_print_absolute_paths(tmp_path, monkeypatch):
    from t2ilab.analysis import compare_grids as module

    seen = []
    real = module._panel_labels
    monkeypatch.setattr(
        module, "_panel_labels", lambda d, n, v, w: seen.append(v) or real(d, n, v, w)
    )
    _run(tmp_path / "0", {"model.init_from": "/very/long/root/run_a/stage1", "seed": 0}, {1: "red"})
    _run(tmp_path / "1", {"model.init_from": "/very/long/root/run_b/stage1", "seed": 0}, {1: "red"})
    module.compare_grids(tmp_path)
    assert seen == [[["run_a/stage1"], ["run_b/stage1"]]]
