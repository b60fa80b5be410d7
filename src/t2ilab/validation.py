"""Checks of the user's config and data that run before any weights load."""

from __future__ import annotations

from omegaconf import DictConfig

from t2ilab.data.images import check_image_folder
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


def check_dreambooth_inputs(cfg: DictConfig) -> None:
    """Everything a DreamBooth run needs from the user, checked cheaply and in one place."""
    check_image_folder(cfg.data.instance_dir, "data.instance_dir")
    if cfg.method.get("prior_preservation") and not (cfg.data.class_noun or cfg.data.class_prompt):
        raise UserError(
            "prior preservation needs a class: set data.class_noun=NOUN (e.g. dog) or "
            "data.class_prompt='a photo of a dog', or turn it off with method.prior_preservation=false"
        )
    if cfg.data.get("instance_prompt") and cfg.data.get("identifier"):
        from t2ilab.data.identifier import validate_identifier_in_prompt

        try:
            validate_identifier_in_prompt(cfg.data.instance_prompt, cfg.data.identifier)
        except ValueError as err:
            raise UserError(f"data.instance_prompt: {err}") from None
    check_resolution(cfg)
