"""Where a backbone's components come from: a hub id, a local diffusers folder
(`model.pretrained`), or local folders holding single parts (`model.components.NAME`).
Shared by every model family (`loading` for Stable Diffusion, `transformers` for PixArt / DiT);
imports neither."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError


def plain(cfg: Any) -> Any:
    """A model config as plain containers (a resolved DictConfig, or `cfg` as it is)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def is_local_reference(pretrained: str) -> bool:
    """A path the user meant as a folder (rather than a hub id like `org/name`)."""
    p = Path(pretrained).expanduser()
    return (
        p.exists() or pretrained.startswith(("/", "./", "../", "~")) or pretrained.count("/") != 1
    )


def pretrained_source(model_cfg: dict[str, Any]) -> str:
    """model.pretrained as `from_pretrained` takes it: a hub id, or an expanded local path."""
    pretrained = model_cfg["pretrained"]
    return str(Path(pretrained).expanduser()) if is_local_reference(pretrained) else pretrained


def component_folder(model_cfg: dict[str, Any], name: str) -> Path:
    """model.components.NAME: a local folder holding one pretrained part (e.g. a VAE)."""
    folder = Path(model_cfg["components"][name]).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(
            f"model.components.{name}={folder} is not a saved model folder (no config.json): "
            "point it at a folder written by save_pretrained()"
        )
    return folder
