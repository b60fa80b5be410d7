"""PixArt's stage hand-over (PixArt-alpha sec. 2.3): `model.init_from` names the previous
stage's run or export; its transformer starts this stage, reparameterised from a class-conditional
DiT (stage 1 -> 2) or loaded as it is (stage 2 -> 3, alpha -> Sigma), with its position
embeddings rescaled when the resolution changes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from t2ilab.errors import UserError

log = logging.getLogger(__name__)


def init_from_source(cfg: DictConfig) -> Path | None:
    """model.init_from: a previous stage's run dir or export (its transformer/ folder)."""
    init = cfg.model.get("init_from")
    if not init:
        return None
    path = Path(init).expanduser()
    if (path / "export" / "transformer").is_dir():
        path = path / "export"
    if not (path / "transformer" / "config.json").is_file():
        raise UserError(
            f"model.init_from={init} holds no transformer/: pass the previous stage's run dir "
            "or its export/ (a DiTPipeline or PixArt-alpha/Sigma pipeline folder)"
        )
    return path


def init_from_previous_stage(cfg: DictConfig, components) -> None:
    """Stage hand-over: a PixArt transformer from the previous PixArt stage, or reparameterised
    from a class-conditional DiT (PixArt-alpha sec. 2.3)."""
    source = init_from_source(cfg)
    if source is None:
        return
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from t2ilab.models.dit_to_pixart import convert_dit_to_pixart
    from t2ilab.models.pixart_dit import is_dit_folder

    config = components.transformer.config
    if is_dit_folder(source):
        dit = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer")
        components.transformer = convert_dit_to_pixart(
            dit,
            cross_attention_dim=config.cross_attention_dim,
            caption_channels=config.caption_channels,
        )
        log.info("init: PixArt transformer reparameterised from the DiT in %s", source)
    else:
        # Sigma's pipeline passes no size conditions: an alpha stage's transformer that used
        # them (PixArt-XL-2-1024-MS) continues without, as Sigma's own transformers do.
        sigma = {"use_additional_conditions": False} if getattr(components, "sigma", False) else {}
        components.transformer = PixArtTransformer2DModel.from_pretrained(
            source,
            subfolder="transformer",
            **resolution_change(cfg, source, components.vae),
            **sigma,
        )
        log.info("init: PixArt transformer from %s", source)


def resolution_change(cfg: DictConfig, source: Path, vae) -> dict[str, Any]:
    """Config overrides for a stage that trains at a new resolution (PixArt's stage 3): the new
    latent size as sample_size, so the export renders at it by default, and interpolation_scale
    scaled with it, so the position embeddings stay the ones the previous stage's model computes
    at that size (PixArt-alpha 512 -> 1024: sample_size 64 -> 128, interpolation 1 -> 2)."""
    config = json.loads((source / "transformer" / "config.json").read_text())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    new_size, old_size = int(cfg.model.resolution) // factor, int(config["sample_size"])
    if new_size == old_size:
        return {}
    scale = config.get("interpolation_scale") or max(old_size // 64, 1)
    log.info(
        "init: sample_size %d -> %d latents (resolution %s)",
        old_size,
        new_size,
        cfg.model.resolution,
    )
    return {"sample_size": new_size, "interpolation_scale": scale * new_size / old_size}
