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


def check_eval_matches_model(cfg: DictConfig) -> None:
    """The toy evaluators have only seen the toy world: their numbers on a real model's images
    would look like metrics and mean nothing."""
    evaluation = cfg.get("eval") or {}
    if not evaluation.get("enabled", False) or not evaluation.get("toy_world", False):
        return
    if evaluation.get("evaluators") == "tiny_random":  # scale/tiny_sd: pipeline checks only
        return
    if not str(cfg.model.name).startswith("toy"):
        raise UserError(
            f"eval=toy scores with the toy world's CLIP and DINO, which cannot judge model "
            f"{cfg.model.name}: add eval=dreambooth (the paper's DINO and CLIP)"
        )


def check_alignment_matches_model(cfg: DictConfig) -> None:
    """eval=toy_alignment reads toy-world colours and shapes from the pixels; a real model's
    images are not drawn in them."""
    alignment = (cfg.get("eval") or {}).get("toy_alignment") or {}
    if alignment.get("enabled", False) and not str(cfg.model.name).startswith("toy"):
        raise UserError(
            f"eval=toy_alignment reads the toy world's colours and shapes, which model "
            f"{cfg.model.name} does not draw: use eval=none, or a toy model (model=toy_pixart_init)"
        )
