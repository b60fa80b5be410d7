"""The record of a run's launches (t2ilab.callbacks.segments): a checkpoint carries the list,
a continuation adds itself, and the toy models' shipping sums it."""

from __future__ import annotations

import json

import pytest
import yaml

from t2ilab.callbacks.segments import SegmentRecorder, earlier_segments, total_wall_time_s
from t2ilab.checkpoints import RECORD_KEY, stamp


class _Trainer:
    def __init__(self, step):
        self.global_step = step


def test_a_continuation_adds_itself_to_the_checkpoints_list():
    first = SegmentRecorder("python train.py a=1")
    checkpoint = {"global_step": 5}
    first.on_save_checkpoint(_Trainer(5), None, checkpoint)
    stamp(checkpoint, {"settings": {"a": 1}})  # the module's record sits beside the segments
    record = checkpoint[RECORD_KEY]
    assert record["settings"] == {"a": 1}
    (segment,) = record["segments"]
    assert segment["from_step"] == 0 and segment["to_step"] == 5
    assert segment["command"] == "python train.py a=1" and segment["wall_time_s"] >= 0

    second = SegmentRecorder("python train.py a=1 ckpt_path=last", earlier_segments(record, 5), 5)
    launches = second.segments(9)
    assert [(s["from_step"], s["to_step"]) for s in launches] == [(0, 5), (5, 9)]
    assert launches[0] == segment  # copied, not re-measured


def test_a_checkpoint_without_segments_still_counts_its_steps():
    assert earlier_segments({}, 0) == []
    assert earlier_segments({"settings": {}}, 7) == [
        {"from_step": 0, "to_step": 7, "wall_time_s": None, "command": None}
    ]


def test_total_wall_time_is_unknown_when_a_part_is():
    assert total_wall_time_s([{"wall_time_s": 1.25}, {"wall_time_s": 2.5}]) == 3.8
    assert total_wall_time_s([{"wall_time_s": 1.0}, {"wall_time_s": None}]) is None
    assert total_wall_time_s([{"t": 2.0}, {"t": 3.0}], "t") == 5.0


def _run_folder(path, results, model=None):
    (path / ".hydra").mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=x", "seed=3"]))
    config = {"seed": 3, "model": model or {}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_run_from_another_runs_export_is_its_second_stage(tmp_path):
    """toy_sd's second stage loads the first one's export with model.pretrained: shipping
    records both; a model.pretrained that is no run's export (a shipped folder) is no stage."""
    from t2ilab.toy.ship import stage_records

    _run_folder(tmp_path / "shapes", {"steps": 40, "wall_time_s": 10.0})
    (tmp_path / "shapes" / "export").mkdir()
    _run_folder(
        tmp_path / "world",
        {"steps": 30, "wall_time_s": 5.0},
        {"pretrained": str(tmp_path / "shapes" / "export")},
    )
    first, second = stage_records(tmp_path / "world")
    assert (first["steps"], second["steps"]) == (40, 30)
    assert first["run"] == str(tmp_path / "shapes")
    _run_folder(
        tmp_path / "dreambooth", {"steps": 8, "wall_time_s": 1.0}, {"pretrained": "x/export"}
    )
    assert len(stage_records(tmp_path / "dreambooth")) == 1


def test_shipping_records_every_launch(tmp_path):
    from t2ilab.toy.ship import stage_records

    launches = [
        {"from_step": 0, "to_step": 40, "wall_time_s": 100.0, "command": "python train.py x"},
        {"from_step": 40, "to_step": 60, "wall_time_s": 50.5, "command": "python train.py y"},
    ]
    _run_folder(tmp_path / "run", {"steps": 60, "wall_time_s": 51.0, "segments": launches})
    (stage,) = stage_records(tmp_path / "run")
    assert stage["train_wall_time_s"] == pytest.approx(150.5)
    assert stage["command"] == "python train.py y" and stage["segments"] == launches

    _run_folder(tmp_path / "old", {"steps": 60, "wall_time_s": 51.0})  # before segments
    (stage,) = stage_records(tmp_path / "old")
    assert stage["train_wall_time_s"] == 51.0 and stage["segments"] is None
    assert stage["command"] == "python train.py experiment=x seed=3"
