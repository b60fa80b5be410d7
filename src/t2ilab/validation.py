"""Checks of the user's config and data that run before any weights load."""

from __future__ import annotations

from omegaconf import DictConfig

from t2ilab.errors import UserError
from t2ilab.models.loading import vae_scale_factor


def check_resolution(cfg: DictConfig) -> None:
    resolution = int(cfg.data.resolution)
    factor = vae_scale_factor(cfg.model)
    if resolution <= 0 or resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise UserError(
            f"data.resolution={resolution} is not a multiple of the VAE factor {factor} of model "
            f"{cfg.model.name}: use {lower} or {lower + factor}"
        )
