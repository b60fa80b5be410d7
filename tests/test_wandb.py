"""The default logger: W&B offline without credentials, with the sync hint, plus a CSV log."""

from __future__ import annotations

from _support import FAST, run_train
from wandb_history import history_keys

from t2ilab.loggers import wandb_has_credentials


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
    assert "wandb sync" in proc.stderr + proc.stdout
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
