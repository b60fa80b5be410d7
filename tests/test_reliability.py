"""Reliability: a NaN loss stops the run with the last good weights saved, checkpoints stay
bounded, class-image generation checks free disk space first, and a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import namedtuple
from pathlib import Path

import lightning as L
import pytest
import torch
from _support import FAST, ROOT, run_train
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from t2ilab.callbacks.reliability import KeepLastCheckpoint, NonFiniteLossStop
from t2ilab.data import class_images
from t2ilab.errors import UserError

QUICK = [*FAST, "eval.enabled=false"]  # the e2e runs here test training, not the evaluators
BATCHES_PER_EPOCH = 6  # the tiny test subject: 6 instance images, batch size 1


# --- a tiny Lightning setup -------------------------------------------------------------------


class TinyModule(L.LightningModule):
    """A linear regression whose loss becomes NaN at global step `nan_at` (None: never)."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_at = nan_at
        self.weights_at_nan: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        if self.global_step == self.nan_at:
            self.weights_at_nan = {k: v.clone() for k, v in self.state_dict().items()}
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_trainer(tmp_path: Path, callbacks, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def step_checkpoints_in(folder, every=2, **kwargs):
    """Checkpoints named as the runs name them, with last.ckpt beside them."""
    kwargs.setdefault("keep_last", 2)
    return KeepLastCheckpoint(
        dirpath=str(folder),
        filename="step_{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_last=True,
        **kwargs,
    )


# --- NonFiniteLossStop ------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_loss_stops_before_the_update_and_names_where_to_resume(tmp_path, clip):
    module = TinyModule(nan_at=5)
    folder = tmp_path / "checkpoints"
    checkpoint = step_checkpoints_in(folder)
    trainer = tiny_trainer(
        tmp_path,
        [checkpoint, NonFiniteLossStop(dirpath=str(folder))],
        max_steps=10,
        gradient_clip_val=clip,
    )
    with pytest.raises(UserError) as err:
        trainer.fit(module)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("loss became nan at step 5 (largest trained weight")
    # last.ckpt (step 4) trained to a finite loss at step 4: resume from it at a tenth of the lr.
    assert f"hydra.run.dir={tmp_path} ckpt_path=last method.lr=0.01" in message
    # Clipping is advised only where it is off.
    assert ("gradient_clip_val=1.0" in message) == (clip is None)
    assert trainer.global_step == 5  # the bad update was never applied
    for name, value in module.weights_at_nan.items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0)
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not list(folder.glob("diverged_*"))  # no checkpoint held the failing weights


class DecayingTinyModule(TinyModule):
    """TinyModule whose learning rate halves every step (a decaying schedule)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_nan_advice_names_a_tenth_of_the_configured_lr_not_the_scheduled_one(tmp_path):
    """At step 5 the schedule has the lr at 0.1 / 32; method.lr is still 0.1: advise 0.01."""
    folder = tmp_path / "checkpoints"
    callbacks = [step_checkpoints_in(folder), NonFiniteLossStop(dirpath=str(folder))]
    trainer = tiny_trainer(tmp_path, callbacks, max_steps=10)
    with pytest.raises(UserError, match=r"ckpt_path=last method\.lr=0\.01 "):
        trainer.fit(DecayingTinyModule(nan_at=5))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 32)


def test_checkpoints_of_the_failing_step_are_set_aside(tmp_path):
    """NaN right after a checkpoint: that checkpoint holds the weights that fail, so
    ckpt_path=last must not find it; the older checkpoint is the one to resume from."""
    module = TinyModule(nan_at=4)
    folder = tmp_path / "checkpoints"
    checkpoint = step_checkpoints_in(folder)
    trainer = tiny_trainer(
        tmp_path, [checkpoint, NonFiniteLossStop(dirpath=str(folder))], max_steps=10
    )
    with pytest.raises(UserError) as err:
        trainer.fit(module)
    assert f"ckpt_path={folder / 'step_000002.ckpt'}" in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == [
        "diverged_step_000004.ckpt",
        "step_000002.ckpt",
    ]


def test_finite_loss_runs_to_the_end(tmp_path):
    trainer = tiny_trainer(
        tmp_path,
        [NonFiniteLossStop(dirpath=str(tmp_path / "checkpoints"))],
        max_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(TinyModule())
    assert trainer.global_step == 5
    assert not (tmp_path / "checkpoints").exists()


def test_nan_in_an_accumulated_micro_batch_stops_before_the_update(tmp_path):
    # Step 1 has two micro-batches; the NaN comes from the first (global_step is still 1).
    module = TinyModule(nan_at=1)
    trainer = tiny_trainer(
        tmp_path,
        [NonFiniteLossStop(dirpath=str(tmp_path / "checkpoints"))],
        max_steps=4,
        enable_checkpointing=False,
        accumulate_grad_batches=2,
    )
    with pytest.raises(UserError, match="at step 1 .*no checkpoint was saved before step 1"):
        trainer.fit(module)
    assert trainer.global_step == 1


# --- KeepLastCheckpoint -----------------------------------------------------------------------


def step_checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step_*.ckpt"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"keep_last": 2}, ["step_000005.ckpt", "step_000006.ckpt"]),
        ({"keep_last": 1}, ["step_000006.ckpt"]),
        ({"keep_last": 1, "save_top_k": -1}, [f"step_{i:06d}.ckpt" for i in range(1, 7)]),
    ],
)
def test_keep_last_bounds_step_checkpoints(tmp_path, kwargs, expected):
    folder = tmp_path / "checkpoints"
    checkpoint = step_checkpoints_in(folder, every=1, **kwargs)
    tiny_trainer(tmp_path, [checkpoint], max_steps=6).fit(TinyModule())
    assert step_checkpoints(folder) == expected
    assert (folder / "last.ckpt").is_file()


def test_a_moved_run_folder_resumes_into_its_own_last_checkpoint(tmp_path):
    """Lightning forgets last.ckpt when the run folder moved; the continuation must still
    replace it (not write last-v1.ckpt), or the next ckpt_path=last resumes the old step."""
    first = tmp_path / "first"
    tiny_trainer(first, [step_checkpoints_in(first / "checkpoints")], max_steps=4).fit(TinyModule())
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dirpath has changed")
        trainer = tiny_trainer(moved, [step_checkpoints_in(moved / "checkpoints")], max_steps=6)
        trainer.fit(TinyModule(), ckpt_path=str(moved / "checkpoints" / "last.ckpt"))
    folder = moved / "checkpoints"
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_resume_with_another_checkpoint_interval_resumes_into_its_last_checkpoint(tmp_path):
    """The interval is part of ModelCheckpoint's state key, so a resume that changes it (a
    setting that may change on resume) gets none of the checkpoint's callback state: last.ckpt
    must still be replaced, not left behind a new last-v1.ckpt."""
    folder = tmp_path / "checkpoints"
    tiny_trainer(tmp_path, [step_checkpoints_in(folder, every=2)], max_steps=4).fit(TinyModule())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint")
        trainer = tiny_trainer(tmp_path, [step_checkpoints_in(folder, every=3)], max_steps=6)
        trainer.fit(TinyModule(), ckpt_path=str(folder / "last.ckpt"))
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6


def test_default_config_keeps_one_step_checkpoint_and_stops_on_nan():
    cfg = OmegaConf.load(ROOT / "conf/callbacks/default.yaml")
    ckpt = cfg.model_checkpoint
    assert ckpt._target_.endswith("KeepLastCheckpoint")
    assert ckpt.keep_last == 1 and ckpt.save_top_k == 1 and ckpt.save_last is True
    ckpt.keep_last = 3
    assert ckpt.save_top_k == 3  # save_top_k follows keep_last unless overridden
    assert cfg.nonfinite_loss._target_.endswith("NonFiniteLossStop")


# --- free disk space before class images ------------------------------------------------------


class StubPipeline:
    """Stands in for a diffusers pipeline: plain images, and a record of each call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, height=None, width=None, **kwargs):
        self.calls += 1
        size = height or 8
        return namedtuple("Output", "images")([Image.new("RGB", (size, size)) for _ in prompt])


def fake_disk_usage(free: int):
    return lambda path: namedtuple("Usage", "total used free")(10 * free, 9 * free, free)


def test_class_images_fail_early_when_the_disk_is_full(tmp_path, monkeypatch):
    monkeypatch.setattr(class_images.shutil, "disk_usage", fake_disk_usage(2**20))  # 1 MiB
    pipe = StubPipeline()
    class_dir = tmp_path / "class_images" / "dog"
    with pytest.raises(UserError) as err:
        # 200 images at 512 px: ~165 MiB.
        class_images.generate_class_images(pipe, "a dog", class_dir, 200, resolution=512)
    message = str(err.value)
    assert "\n" not in message
    assert str(class_dir) in message and "1.0 MiB free" in message and "MiB" in message
    assert pipe.calls == 0 and not class_dir.exists()


def test_class_images_estimate_from_images_already_there(tmp_path, monkeypatch):
    class_dir = tmp_path / "dog"
    class_dir.mkdir()
    (class_dir / "class_00000.png").write_bytes(b"x" * 1000)  # measured: 1000 bytes per image
    monkeypatch.setattr(class_images.shutil, "disk_usage", fake_disk_usage(3500))
    with pytest.raises(UserError, match="4 images need"):
        class_images.generate_class_images(StubPipeline(), "a dog", class_dir, 5, resolution=512)
    monkeypatch.setattr(class_images.shutil, "disk_usage", fake_disk_usage(5000))
    pipe = StubPipeline()
    made = class_images.generate_class_images(pipe, "a dog", class_dir, 5, resolution=8)
    assert made == 4 and pipe.calls == 1 and len(list(class_dir.glob("class_*.png"))) == 5


# --- end to end: the real command line --------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_ends_the_run_with_one_line_and_no_trap_for_resume(tmp_path):
    run_dir = tmp_path / "run"
    # lr 1e20 without clipping: the first update blows the weights up, the next loss is NaN,
    # right after the step-1 checkpoint.
    proc = run_train(
        [
            "experiment=dreambooth",
            *QUICK,
            "trainer.max_steps=6",
            "method.lr=1e20",
            "trainer.gradient_clip_val=null",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        ],
        run_dir,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2ilab: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "loss became nan at step 1" in errors[0]
    assert "no checkpoint was saved before step 1: start again with method.lr=1e+19" in errors[0]
    assert "trainer.gradient_clip_val=1.0" in errors[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "loss became nan" in results["reason"]
    # The step-1 checkpoint holds the diverged weights: ckpt_path=last cannot pick it up.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["diverged_step_000001.ckpt"]
    state = torch.load(run_dir / "checkpoints" / names[0], map_location="cpu", weights_only=False)
    assert max(v.abs().max().item() for v in state["state_dict"].values()) > 1e6


def train_command(args: list[str], run_dir: Path) -> list[str]:
    """What run_train runs, for a process the test must be able to kill."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        f"hydra.run.dir={run_dir}",
        f"paths.class_images_dir={run_dir.parent / 'class_images'}",
    ]


def kill_once_checkpointed(cmd: list[str], last: Path, min_step: int, timeout: float = 120):
    """Start `cmd`, SIGKILL it as soon as `last` holds global_step >= min_step; returns that
    checkpoint's global step. The process is stopped (SIGSTOP) before the checkpoint is read,
    so the step it holds is the one the killed run last saved."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            mtime = last.stat().st_mtime_ns if last.exists() else None
            if mtime is not None and mtime != seen:
                seen = mtime
                os.kill(proc.pid, signal.SIGSTOP)
                step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
                if step >= min_step:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return step
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
        stderr = proc.stderr.read() if proc.poll() is not None else ""
        pytest.fail(f"never saw {last} at step >= {min_step} (rc={proc.poll()}): {stderr[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "experiment=dreambooth",
        *QUICK,
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.batch_size=1",  # BATCHES_PER_EPOCH's batch (toy_sd's scale trains 4)
        "method.module.lr_scheduler.name=constant",  # the lr checked below (the scale: cosine)
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = kill_once_checkpointed(train_command(args, run_dir), last, min_step=4)
    assert 4 <= killed_at < 8
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == killed_at
    assert saved["optimizer_states"][0]["state"] and saved["lr_schedulers"]
    assert not (run_dir / "results.json").exists()  # it really died mid-run

    proc = run_train([*args, "ckpt_path=last"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["steps"] == 8
    # Both launches are on record: the killed one up to its checkpoint, then the continuation.
    first, second = results["segments"]
    assert (first["from_step"], first["to_step"]) == (0, killed_at)
    assert (second["from_step"], second["to_step"]) == (killed_at, 8)
    assert first["command"].startswith("python train.py experiment=dreambooth")
    assert "ckpt_path" not in first["command"] and " ckpt_path=last" in second["command"]
    assert first["wall_time_s"] > 0 and second["wall_time_s"] > 0

    (log_file,) = [p for p in (run_dir / "csv").glob("version_*/metrics.csv") if is_resumed(p)]
    rows = [r for r in csv.DictReader(open(log_file)) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(killed_at, 8))  # continues at the checkpoint's step, no repeats
    lr = OmegaConf.load(run_dir / ".hydra/config.yaml").method.lr  # constant schedule
    assert float(rows[0]["train/lr"]) == pytest.approx(lr)
    # Data order: the epoch and the position in it are restored, not restarted at 0.
    assert [int(r["epoch"]) for r in rows] == [s // BATCHES_PER_EPOCH for s in steps]

    # Optimizer and LR scheduler state were restored: their counters carry on through 8 steps.
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 8
    adam_steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}
    assert final["lr_schedulers"][0]["last_epoch"] == 8


def is_resumed(metrics_csv: Path) -> bool:
    """The resumed run's log: its rows start past step 0 (the killed run's log starts at 0)."""
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("train/loss")]
    return bool(rows) and int(rows[0]["step"]) > 0
