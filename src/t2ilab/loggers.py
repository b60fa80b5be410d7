"""Loggers from config: W&B online when credentials exist, offline otherwise; CSV always."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
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


def make_wandb_logger(save_dir: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that runs online with an API key (env WANDB_API_KEY or `wandb login`) and
    offline without one, saying how to upload the run later."""
    mode = os.environ.get("WANDB_MODE", "")
    if offline is None:
        offline = mode in ("offline", "dryrun") or not wandb_has_credentials()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        log.info(
            "W&B: no API key found, logging offline under %s/wandb; upload later with "
            "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first to log online)",
            save_dir,
            save_dir,
        )
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


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
            run_dir = Path(lg.experiment.dir).parent
            offline = lg._offline
            lg.experiment.finish()
            if offline:
                log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)
