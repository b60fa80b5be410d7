"""Checkpoints are written whole or not at all: a disk that fills up while a checkpoint is being
written leaves the previous one in place (where ckpt_path=last finds it), no partial file, and
one line that says what to do."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys

import pytest
import torch
from _support import FAST, ROOT

from t2ilab.checkpoints import AtomicCheckpointIO
from t2ilab.errors import UserError


def test_a_checkpoint_replaces_the_old_one_in_one_step(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    real_open = open

    class HalfWritten:
        """A file whose disk fills up after half of the checkpoint."""

        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def write(self, data):
            self.f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", HalfWritten)
    with pytest.raises(UserError) as err:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {path}: No space left on device (")
    assert "free disk space" in message and "resume with ckpt_path=last" in message
    assert path.read_bytes() == before  # the last good checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


@pytest.mark.slow
def test_a_run_on_a_full_disk_ends_with_one_line_and_no_partial_checkpoint(tmp_path):
    """A file-size limit below a checkpoint's size (12 MB for tiny_sd) stands in for a full
    disk: every other file the run writes before its first checkpoint is smaller."""
    run_dir = tmp_path / "run"
    limit = 10 * 2**20

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=dreambooth_sigmoid",
        "model=tiny_sd",
        *FAST,
        "eval.enabled=false",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        f"hydra.run.dir={run_dir}",
        f"paths.class_images_dir={tmp_path / 'class_images'}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2ilab: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "could not write" in errors[0] and "File too large" in errors[0]
    assert list((run_dir / "checkpoints").iterdir()) == []  # nothing ckpt_path=last could load
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "File too large" in results["reason"]
