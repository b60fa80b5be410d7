"""DDP with the default logger (W&B + CSV) ends cleanly on every rank (issue 13): rank 1 used to
end with "Error executing job ... TypeError: expected str, bytes or os.PathLike object, not
method" from finish_loggers, after training."""

from __future__ import annotations

import json
import re

import pytest
from _support import run_train

# Two gloo ranks on the CPU (as tests/test_distributed.py), the default logger, no export.
DDP_DEFAULT_LOGGER = [
    "experiment=dreambooth_sigmoid",
    "model=tiny_sd",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "method.num_class_images=2",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "eval=none",
    "export.enabled=false",
]


@pytest.mark.slow
def test_ddp_with_the_default_logger_ends_cleanly_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        DDP_DEFAULT_LOGGER, run_dir, env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    )
    # Rank 1 is Lightning's child process: its errors reach this output, not the exit code.
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert not re.search(r"Traceback|Error executing job|Error:", output), output[-3000:]
    for log in ("train.log", "train_ddp_process_1.log"):  # both ranks ran to the end
        assert "ERROR" not in (run_dir / log).read_text(), log
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")  # rank 0's run, and no other
    assert output.count(f"wandb sync {offline_run}") == 1
