"""Loading backbones: a pretrained hub id or local diffusers folder, or a tiny model from config."""

from t2ilab.models.loading import StableDiffusionBackbone, load_sd_components, vae_scale_factor

__all__ = ["StableDiffusionBackbone", "load_sd_components", "vae_scale_factor"]
