"""The default logger: W&B offline without credentials, with the sync hint, plus a CSV log;
one line each when the run starts and ends, whatever the rank."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from _support import FAST, run_train
from lightning.pytorch.utilities import rank_zero_only
from wandb_history import history_keys

from t2ilab.loggers import (
    NO_API_KEY,
    OneLineWandbLogger,
    finish_loggers,
    make_wandb_logger,
    wandb_end_line,
    wandb_has_credentials,
    wandb_offline_reason,
)


@pytest.mark.slow
def test_default_wandb_logger_runs_offline_and_logs_history(tmp_path):
    fast = [o for o in FAST if not o.startswith("logger=")]
    env = {
        "WANDB_MODE": "",
        "WANDB_API_KEY": "",
        "NETRC": str(tmp_path / "no-netrc"),
        "HOME": str(tmp_path),
    }
    run_dir = tmp_path / "run"
    proc = run_train(["experiment=dreambooth_sigmoid", *fast], run_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stderr + proc.stdout
    assert "wandb sync" in output
    assert "W&B: no API key found, logging offline to" in output  # no key, not the user's choice
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    keys = history_keys(offline_run)
    assert {"train/loss", "train/lr", "train/instance_loss", "train/prior_loss"} <= keys
    assert any(k.startswith("samples") for k in keys)  # the sample grid image
    assert {f"eval/{m}" for m in ("dino", "clip_i", "clip_t", "pres", "div")} <= keys
    assert any(k.startswith("eval/prompts") for k in keys)  # the per-prompt table
    assert any(k.startswith("eval/grids") for k in keys)
    assert list((run_dir / "csv").rglob("metrics.csv"))  # a CSV log is always written


def test_credentials_are_detected(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_has_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_has_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


def without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_offline_says_why(monkeypatch, tmp_path):
    without_credentials(monkeypatch, tmp_path)
    assert wandb_offline_reason(None, mode="offline") == "WANDB_MODE=offline"  # the user's choice
    assert wandb_offline_reason(True, mode="") == "logger.wandb.offline=true"
    assert wandb_offline_reason(None, mode="") == NO_API_KEY
    assert wandb_offline_reason(None, mode="disabled") is None  # left to wandb: no run at all
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline_reason(None, mode="") is None  # online


def test_one_line_where_the_run_is(tmp_path):
    folder = tmp_path / "wandb" / "offline-run-1"
    offline_run = SimpleNamespace(dir=str(folder / "files"), offline=True, url=None)
    online_run = SimpleNamespace(dir=str(folder / "files"), offline=False, url="https://w.ai/r/1")

    def start(reason, run):
        logger = OneLineWandbLogger(save_dir=str(tmp_path), offline_reason=reason)
        return logger.start_line(run)

    assert start("WANDB_MODE=offline", offline_run) == (
        f"W&B: logging offline (WANDB_MODE=offline) to {folder}"
    )
    assert start(NO_API_KEY, offline_run).startswith(f"W&B: {NO_API_KEY}, logging offline to")
    assert start(None, online_run) == "W&B: logging online to https://w.ai/r/1"
    assert wandb_end_line(offline_run) == (
        f"W&B: run saved offline in {folder}; upload it with: wandb sync {folder}"
    )
    assert wandb_end_line(online_run) == "W&B: run at https://w.ai/r/1"


def test_other_ranks_leave_the_run_to_rank_zero(monkeypatch, tmp_path):
    """On rank 1 of a DDP run, Lightning's WandbLogger.experiment is a DummyExperiment whose
    attributes are methods: finishing it failed with "expected str ... not method"."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = make_wandb_logger(str(tmp_path), offline=True, project="t2ilab")
    finish_loggers([logger])
    assert not list(Path(tmp_path).rglob("*run-*"))  # rank 1 started no W&B run
