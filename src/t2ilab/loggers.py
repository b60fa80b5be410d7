"""Logger construction: W&B online when credentials exist, offline otherwise."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

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
