"""The command line's mistakes: one line, exit 2, no traceback, and nothing written anywhere.

Typos in group values and keys, unparsable overrides, and run folders that are the user's data
or another run are caught before Hydra writes `.hydra/` (t2ilab.preflight); checkpoints that
cannot be resumed are refused before any weights load (t2ilab.checkpoints, t2ilab.resume)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _support import FAST, ROOT
from hydra.utils import get_class
from PIL import Image

import t2ilab.train as train_module
from t2ilab.checkpoints import (
    RECORD_KEY,
    RENAMED_TARGETS,
    check_loaded_weights,
    inspect_checkpoint,
)
from t2ilab.errors import UserError
from t2ilab.resume import settings_changes


def cli(args: list[str], script: str = "train.py", timeout: int = 120):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc) -> str:
    """The run failed as a user mistake should: exit 2, one `t2ilab: error:` line, no
    traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2ilab: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- typos and unparsable overrides -----------------------------------------------------------

TYPOS = {
    "group value": (["model=sd51"], r"model=sd51 is not one of conf/model/: .*tiny_sd"),
    "close group value": (["experiment=dreambooht"], r"did you mean experiment=dreambooth\?"),
    "key": (
        ["trainer.max_stepz=3"],
        r"trainer.max_stepz is not a config key: did you mean "
        r"trainer.max_steps\? .*\+trainer.max_stepz=3",
    ),
    "top-level key": (["sed=1"], r"sed is not a config key: did you mean seed\?"),
    "no equals sign": (["max_steps"], r"cannot read the override 'max_steps': write it as key=v"),
    "a sweep without -m": (["seed=1,2"], r"seed=1,2 lists several values: add -m"),
    "a bad value in a sweep": (["-m", "model=tiny_sd,sd51"], r"model=sd51 is not one of"),
    "a key typo in a sweep config": (
        ["--config-dir", "sweeps", "--config-name", "improved_dreambooth_arms", "method.lrr=1"],
        r"method.lrr is not a config key: did you mean method.lr\?",
    ),
    "unknown config name": (["--config-name", "trian"], r"--config-name trian is not in"),
    "adding a key that exists": (
        ["+seed=1"],
        r"seed already exists: set it without the leading \+",
    ),
}


@pytest.mark.parametrize("case", list(TYPOS))
def test_typos_are_one_line_before_anything_is_written(case, tmp_path):
    args, pattern = TYPOS[case]
    run_dir = tmp_path / "run"
    line = one_error_line(cli([*args, f"hydra.run.dir={run_dir}"]))
    assert __import__("re").search(pattern, line), line
    assert not run_dir.exists()


def test_evaluate_typos_are_one_line_too(tmp_path):
    line = one_error_line(cli(["evall=toy", f"hydra.run.dir={tmp_path / 'e'}"], "evaluate.py"))
    assert "evall is not a config key: did you mean eval?" in line


# --- run folders ------------------------------------------------------------------------------


@pytest.fixture
def subject(tmp_path) -> Path:
    folder = tmp_path / "my_dog"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def test_a_run_folder_that_is_the_subject_folder_gets_no_files(subject):
    before = snapshot(subject)
    line = one_error_line(cli([f"data.instance_dir={subject}", f"hydra.run.dir={subject}"]))
    assert f"hydra.run.dir={subject} is your data (data.instance_dir={subject})" in line
    assert snapshot(subject) == before and not (subject / ".hydra").exists()


def test_a_run_folder_inside_or_around_the_data_is_refused(subject):
    inside = subject / "runs" / "one"
    line = one_error_line(cli([f"data.instance_dir={subject}", f"hydra.run.dir={inside}"]))
    assert "is inside your data" in line and not (subject / "runs").exists()
    line = one_error_line(cli([f"data.instance_dir={subject}", f"hydra.run.dir={subject.parent}"]))
    assert "holds your data" in line


def test_a_folder_of_someone_elses_files_is_not_a_run_folder(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "draft.tex").write_text("\\section{Results}")
    line = one_error_line(cli([f"hydra.run.dir={folder}"]))
    assert "already holds files that no run wrote (e.g. draft.tex)" in line
    assert snapshot(folder) == {"draft.tex": snapshot(folder)["draft.tex"]}


def fake_run(folder: Path, *, finished: bool, step: int = 4, record: dict | None = None) -> Path:
    """A run folder as train.py leaves it (a Hydra record, a checkpoint, and when finished an
    export and results.json), without training."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / "checkpoints").mkdir()
    checkpoint = {"global_step": step, "state_dict": {}}
    if record is not None:
        checkpoint[RECORD_KEY] = record
    torch.save(checkpoint, folder / "checkpoints" / "last.ckpt")
    if finished:
        (folder / "export").mkdir()
        (folder / "export" / "model_index.json").write_text("{}")
        results = {"experiment": "dreambooth", "status": "ok", "steps": step, "metrics": {}}
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_a_finished_run_is_not_replaced(tmp_path):
    run = fake_run(tmp_path / "finished", finished=True)
    before = snapshot(run)
    line = one_error_line(cli([f"hydra.run.dir={run}"]))
    assert (
        "holds a finished run: choose a new folder, or continue this one with ckpt_path=last"
        in line
    )
    assert "trainer.max_steps=N (N > 4)" in line
    # Continuing it without a step to train would rewrite results.json with nothing in it.
    line = one_error_line(cli([f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=4"]))
    assert "nothing to train: ckpt_path=last is at step 4 and trainer.max_steps=4" in line
    assert f"python evaluate.py run_dir={run}" in line
    assert snapshot(run) == before


def test_an_interrupted_run_is_resumed_not_overwritten(tmp_path):
    run = fake_run(tmp_path / "interrupted", finished=False, step=200)
    before = snapshot(run)
    line = one_error_line(cli([f"hydra.run.dir={run}"]))
    assert "holds an interrupted run (checkpoints/last.ckpt at step 200): resume it with " in line
    assert snapshot(run) == before


def test_evaluate_does_not_write_into_a_training_run(tmp_path):
    run = fake_run(tmp_path / "finished", finished=True)
    before = snapshot(run)
    line = one_error_line(cli([f"hydra.run.dir={run}"], "evaluate.py"))
    assert f"holds a training run: evaluate it with run_dir={run}" in line
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", marks=pytest.mark.slow, id="empty"),
        pytest.param(b"PK\x03\x04 truncated zip", id="truncated"),
        pytest.param(b"not a checkpoint at all\n", marks=pytest.mark.slow, id="text"),
    ],
)
def test_an_unreadable_checkpoint_is_named_before_anything_loads(tmp_path, content):
    run = fake_run(tmp_path / "run", finished=False)
    (run / "checkpoints" / "last.ckpt").write_bytes(content)
    before = snapshot(run)
    line = one_error_line(cli([f"hydra.run.dir={run}", "ckpt_path=last"]))
    assert "last.ckpt cannot be read as a checkpoint" in line
    assert "it is truncated or not a Lightning checkpoint" in line
    assert snapshot(run) == before


# --- checkpoints of another model, method or objective ----------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint was checked")

    monkeypatch.setattr(train_module, "load_components", forbidden)


@pytest.mark.parametrize(
    ("trained", "pattern"),
    [
        (
            {"method.name": "lora"},
            r"was trained with method.name=lora, this run has "
            r"method.name=dreambooth: resume with method.name=lora",
        ),
        ({"model.name": "sd15"}, r"was trained with model.name=sd15"),
        (
            {"noise.prediction_type": "v_prediction"},
            r"was trained with noise.prediction_type="
            r"'v_prediction' \(now None\): a resume keeps the model, method, noise and data",
        ),
        ({"data.batch_size": 8}, r"data.batch_size=8 \(now 4\)"),  # toy_sd's scale: 4
    ],
)
def test_a_checkpoint_of_other_settings_is_refused_before_weights_load(
    make_cfg, tmp_path, no_weights, trained, pattern
):
    cfg = make_cfg("experiment=dreambooth", *FAST, "ckpt_path=last")
    settings = train_module.settings_of(cfg)
    record = {"settings": {**settings, **trained}}
    fake_run(Path(cfg.paths.output_dir), finished=False, step=1, record=record)
    with pytest.raises(UserError, match=pattern) as err:
        train_module.train(cfg)
    assert "\n" not in str(err.value)


def test_a_checkpoint_with_the_same_settings_goes_on_to_load(make_cfg, no_weights):
    """The check passes what may resume: changed lr and max_steps are allowed."""
    cfg = make_cfg("experiment=dreambooth", *FAST, "ckpt_path=last", "method.lr=1e-5")
    settings = train_module.settings_of(cfg)
    old = {**settings, "method.lr": 1e-4, "trainer.max_steps": 2}
    fake_run(Path(cfg.paths.output_dir), finished=False, step=1, record={"settings": old})
    with pytest.raises(AssertionError, match="weights were loaded"):
        train_module.train(cfg)


def test_settings_changes_lists_what_may_change_and_refuses_the_rest():
    trained = {"method.lr": 1e-4, "trainer.max_steps": 10, "noise.snr_gamma": None, "seed": 0}
    now = {"method.lr": 1e-5, "trainer.max_steps": 20, "noise.snr_gamma": None, "seed": 0}
    assert settings_changes(trained, now, "x.ckpt") == {
        "method.lr": [1e-4, 1e-5],
        "trainer.max_steps": [10, 20],
    }
    with pytest.raises(UserError, match=r"noise.snr_gamma=None \(now 5.0\)"):
        settings_changes(trained, {**now, "noise.snr_gamma": 5.0}, "x.ckpt")


def test_a_key_added_since_the_checkpoint_is_no_change_at_its_old_behaviour():
    """A checkpoint from before data.curriculum_steps existed trained without a curriculum:
    resuming it with the default (0) changes nothing; asking for a curriculum is refused."""
    trained = {"data.seed": 0}
    assert settings_changes(trained, {"data.seed": 0, "data.curriculum_steps": 0}, "x") == {}
    assert settings_changes(trained, {"data.seed": 0}, "x") == {}  # other data: no such key
    with pytest.raises(UserError, match=r"data.curriculum_steps=0 \(now 100\)"):
        settings_changes(trained, {"data.seed": 0, "data.curriculum_steps": 100}, "x")
    assert settings_changes(trained, {"data.seed": 0, "data.shape_weights": None}, "x") == {}
    # A key without an entry here: a checkpoint without it trained as its null default.
    with pytest.raises(UserError, match=r"data.shape_weights=None"):
        settings_changes(trained, {"data.seed": 0, "data.shape_weights": {"hexagon": 3}}, "x")


def test_a_run_of_a_moved_project_resumes_and_other_paths_are_still_refused(tmp_path):
    """Bundled models are configured as ${paths.root_dir}/models/...: a checkpoint written in
    another clone of the project records that clone's folder. Moving the project keeps the
    file; a path to another file is still another model."""
    key = "model.components.text_encoder"
    trained = {key: "/old/clone/models/toy/toy_clip", "seed": 0}
    root = str(tmp_path / "project")
    now = {key: f"{root}/models/toy/toy_clip", "seed": 0}
    assert settings_changes(trained, now, "x", root) == {key: [trained[key], now[key]]}
    for other in (f"{root}/models/toy/toy_vae", "/elsewhere/models/toy/toy_clip"):
        with pytest.raises(UserError, match="a resume keeps the model"):
            settings_changes(trained, {**now, key: other}, "x", root)
    with pytest.raises(UserError, match="a resume keeps the model"):
        settings_changes(trained, now, "x")  # without the project folder: not compared as moved


def test_a_checkpoint_of_a_moved_project_is_the_same_model(tmp_path):
    root = str(tmp_path / "project")
    trained = {"model.pretrained": "/old/clone/models/toy/toy_sd"}
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, RECORD_KEY: {"settings": trained}}, path)
    assert inspect_checkpoint(path, {"model.pretrained": f"{root}/models/toy/toy_sd"}, root)
    with pytest.raises(UserError, match="model.pretrained=/old/clone/models/toy/toy_sd"):
        inspect_checkpoint(path, {"model.pretrained": f"{root}/models/toy/toy_pixart"}, root)


def test_a_checkpoint_naming_a_moved_module_class_still_resumes(tmp_path):
    """Checkpoints stamped before the module renames (issue 14.7) record the old class path."""
    key = "method.module._target_"
    trained = {"method.name": "pixart", key: "t2ilab.modules.transformers.PixArtModule"}
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, RECORD_KEY: {"settings": trained}}, path)
    now = {**trained, key: "t2ilab.modules.full.FullModule"}
    record = inspect_checkpoint(path, now)
    assert record["settings"] == now
    assert settings_changes(record["settings"], now, str(path)) == {}
    for new in RENAMED_TARGETS.values():
        assert get_class(new).__name__ == new.rsplit(".", 1)[1]


def test_loaded_weights_must_cover_what_trains():
    checkpoint = {"state_dict": {"unet.a": 0, "unet.b": 0}}
    check_loaded_weights(checkpoint, {"unet.a", "unet.b"}, "x.ckpt")
    with pytest.raises(UserError, match=r"lacks 1 of this run's 2 trained weights \(e.g. lora"):
        check_loaded_weights(checkpoint, {"unet.a", "lora.down"}, "x.ckpt")
