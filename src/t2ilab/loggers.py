"""Loggers from config: W&B online when credentials exist, offline otherwise; CSV always."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """An API key in the environment or in the netrc file (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


# Read once, before any WandbLogger runs: Lightning sets WANDB_MODE=dryrun in this process for
# an offline run, which would read as the user's choice in the next run of a multirun.
USER_WANDB_MODE = os.environ.get("WANDB_MODE", "")
NO_API_KEY = "no API key found"


def wandb_offline_reason(offline: bool | None, mode: str = USER_WANDB_MODE) -> str | None:
    """Why W&B logs offline (the config, WANDB_MODE, or no API key), or None when it does not:
    online, or disabled by WANDB_MODE=disabled."""
    if offline:
        return "logger.wandb.offline=true"
    if offline is None and mode in ("offline", "dryrun"):
        return f"WANDB_MODE={mode}"
    if offline is None and mode != "disabled" and not wandb_has_credentials():
        return NO_API_KEY
    return None


def user_sets_wandb_output() -> bool:
    """WANDB_SILENT / WANDB_QUIET in the environment: wandb's own output is the user's call."""
    return any(os.environ.get(name) for name in ("WANDB_SILENT", "WANDB_QUIET"))


class OneLineWandbLogger(WandbLogger):
    """Lightning's WandbLogger with wandb's own terminal output (a banner, and ~30 lines of run
    history and summary at the end) replaced by one line when the run starts and one when it
    ends: where the run is, and how to upload it when offline. wandb's warnings still show.
    `offline_reason` (None: online) says why it logs offline."""

    def __init__(self, *args: Any, offline_reason: str | None = None, **kwargs: Any):
        import wandb

        if not user_sets_wandb_output():
            kwargs.setdefault("settings", wandb.Settings(silent=True))
        super().__init__(*args, offline=offline_reason is not None, **kwargs)
        self.offline_reason = offline_reason
        # Lightning always passes anonymous=None, which recent wandb warns has no effect.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        starting = self._experiment is None
        run = super().experiment  # ranks > 0 get Lightning's DummyExperiment and no run
        if starting and self._experiment is not None:
            line = self.start_line(run)
            if line:
                log.info(line)
        return run

    def start_line(self, run) -> str | None:
        if getattr(run, "disabled", False):
            return None
        if not self.offline_reason:
            return f"W&B: logging online to {run.url}"
        folder = wandb_run_folder(run)
        if self.offline_reason == NO_API_KEY:
            return f"W&B: {NO_API_KEY}, logging offline to {folder} (`wandb login` to log online)"
        return f"W&B: logging offline ({self.offline_reason}) to {folder}"


def make_wandb_logger(save_dir: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that runs online with an API key (env WANDB_API_KEY or `wandb login`) and
    offline without one, or when the user chose offline (WANDB_MODE or offline=true)."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if USER_WANDB_MODE == "disabled" and rank_zero_only.rank == 0:
        log.info("W&B: disabled (WANDB_MODE=disabled)")
    reason = wandb_offline_reason(offline)
    return OneLineWandbLogger(save_dir=save_dir, offline_reason=reason, **kwargs)


def wandb_run_folder(run) -> Path:
    """The run's own folder (offline-run-* or run-*), which `wandb sync` takes."""
    return Path(run.dir).parent


def wandb_end_line(run) -> str | None:
    """Where a finished run is: its URL, or how to upload it when it ran offline."""
    if getattr(run, "disabled", False):
        return None
    if getattr(run, "offline", False):
        folder = wandb_run_folder(run)
        return f"W&B: run saved offline in {folder}; upload it with: wandb sync {folder}"
    return f"W&B: run at {run.url}" if run.url else None


def instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Lightning-hydra-template style: a dict of name -> {_target_: ...} configs."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = instantiate_dict(cfg.get("logger"))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        # A CSV log is always written, whatever else is on. version=None: csv/version_N/, so
        # resuming into a run never deletes its earlier log.
        loggers.append(CSVLogger(save_dir=cfg.paths.output_dir, name="csv"))
    return loggers


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """Dotted keys, so W&B dashboards can group by any config value."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def finish_loggers(loggers: list[Logger]) -> None:
    for lg in loggers:
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            finish_wandb_run(lg)


@rank_zero_only
def finish_wandb_run(lg: WandbLogger) -> None:
    """End the run and say where it is. Rank zero only: on the other ranks of a DDP run,
    `lg.experiment` is Lightning's DummyExperiment, not a run."""
    run = lg.experiment
    line = wandb_end_line(run)
    run.finish()
    if line:
        log.info(line)
