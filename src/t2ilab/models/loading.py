"""Stable-Diffusion-shaped backbones (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer) from a hub id, a local diffusers folder, or a tiny config built with a fixed seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from t2ilab.errors import UserError
from t2ilab.models import pixart_dit
from t2ilab.models.backbone import Backbone
from t2ilab.models.clip_tokenizer import build_clip_tokenizer
from t2ilab.models.families import family_of
from t2ilab.models.sources import component_folder, is_local_reference, plain, pretrained_source

log = logging.getLogger(__name__)


class StableDiffusionBackbone(Backbone):
    """A UNet conditioned on one CLIP text encoder's last hidden states (SD 1.x / 2.x)."""

    family = "sd"
    description = "a Stable Diffusion UNet with CLIP text"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config):
        super().__init__(
            scheduler_config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> torch.Tensor:
        if "prompt_embeds" in batch:  # from the feature cache
            return batch["prompt_embeds"]
        with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
            return self.text_encoder(batch["input_ids"])[0]

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=condition).sample

    def pipeline(self, scheduler):
        from t2ilab.models.pipelines import build_sd_pipeline

        return build_sd_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer, scheduler)

    def save_lora(self, folder, denoiser_layers, denoiser_config, text_layers, text_configs):
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            save_directory=folder,
            unet_lora_layers=denoiser_layers,
            text_encoder_lora_layers=text_layers[0],
            unet_lora_adapter_metadata=denoiser_config,
            text_encoder_lora_adapter_metadata=text_configs[0],
            safe_serialization=True,
        )


def check_pretrained_reference(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """Fail fast, before weights load, on a reference that is not a diffusers pipeline.

    Returns the VAE config (small JSON) so callers can check the resolution.
    """
    if is_local_reference(pretrained):
        folder = Path(pretrained).expanduser()
        if not (folder / "model_index.json").is_file():
            raise UserError(
                f"model.pretrained={pretrained} is not a diffusers folder (no model_index.json): "
                "point it at a folder written by pipeline.save_pretrained(), or use a hub id "
                "such as stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        vae_config = folder / "vae" / "config.json"
        return json.loads(vae_config.read_text()) if vae_config.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(pretrained, "model_index.json", revision=revision)
        return json.loads(
            Path(hf_hub_download(pretrained, "vae/config.json", revision=revision)).read_text()
        )
    except Exception as err:  # offline, unknown repo, gated repo: all need the same fix
        raise UserError(
            f"model.pretrained={pretrained} could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}): check the id and your network/HF_TOKEN, or download it once "
            f"(huggingface-cli download {pretrained} --local-dir DIR) and set model.pretrained=DIR"
        ) from None


def vae_scale_factor(model_cfg: DictConfig | dict) -> int:
    """Pixels per latent along each side, known before any weights load."""
    model_cfg = plain(model_cfg)
    if model_cfg.get("pretrained"):
        vae_config = check_pretrained_reference(model_cfg["pretrained"], model_cfg.get("revision"))
    elif (model_cfg.get("components") or {}).get("vae"):
        vae_config = json.loads((component_folder(model_cfg, "vae") / "config.json").read_text())
    else:
        vae_config = model_cfg["tiny"]["vae"]
    # Transformer backbones also patchify the latent (PixArt / DiT: patch_size 2).
    patch = int(model_cfg.get("patch_size", 1))
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1) * patch


def model_family(model_cfg) -> str:
    """sd (UNet + CLIP), sdxl (UNet + two CLIPs), pixart (PixArt transformer + T5), sd3
    (MM-DiT + two CLIPs + T5), flux (MM-DiT + CLIP-L + T5) or dit (class-conditional DiT)."""
    return family_of(plain(model_cfg)).name


def load_components(model_cfg: DictConfig | dict, tokenizer=None) -> Backbone:
    """The model's backbone (t2ilab.models.backbone), whatever its family."""
    family = model_family(model_cfg)
    if family == "sdxl":
        from t2ilab.models.sdxl import load_sdxl_components

        return load_sdxl_components(model_cfg, tokenizer)
    if family == "pixart":
        return pixart_dit.load_pixart_components(model_cfg, tokenizer)
    if family == "sd3":
        from t2ilab.models.sd3 import load_sd3_components

        return load_sd3_components(model_cfg, tokenizer)
    if family == "flux":
        from t2ilab.models.flux import load_flux_components

        return load_flux_components(model_cfg, tokenizer)
    if family == "dit":
        return pixart_dit.load_dit_components(model_cfg)
    return load_sd_components(model_cfg, tokenizer)


def load_tokenizer(model_cfg: DictConfig | dict):
    """The tokenizer alone: cheap, so prompts can be checked before any weights load."""
    model_cfg = plain(model_cfg)
    family = model_cfg.get("family", "sd")
    if family == "pixart":
        return pixart_dit.load_t5_tokenizer(model_cfg)
    if family == "dit":
        return None  # class-conditional: no text
    if family in ("sdxl", "sd3", "flux"):
        from t2ilab.models.sdxl import load_sdxl_tokenizer

        return load_sdxl_tokenizer(model_cfg)  # the first; the backbone loads the others
    if model_cfg.get("pretrained"):
        return CLIPTokenizer.from_pretrained(
            pretrained_source(model_cfg), subfolder="tokenizer", revision=model_cfg.get("revision")
        )
    if (model_cfg.get("components") or {}).get("tokenizer"):
        return CLIPTokenizer.from_pretrained(component_folder(model_cfg, "tokenizer"))
    if model_cfg.get("tiny"):
        max_length = model_cfg["tiny"]["text_encoder"]["max_position_embeddings"]
        return build_clip_tokenizer(model_max_length=max_length)
    raise UserError(f"model '{model_cfg.get('name')}' sets neither model.pretrained nor model.tiny")


def load_sd_components(model_cfg: DictConfig | dict, tokenizer=None) -> StableDiffusionBackbone:
    model_cfg = plain(model_cfg)
    tokenizer = tokenizer or load_tokenizer(model_cfg)
    if model_cfg.get("pretrained"):
        return _load_pretrained(model_cfg, tokenizer)
    if model_cfg.get("components"):
        for name in ("vae", "text_encoder"):
            if model_cfg["components"].get(name):
                component_folder(model_cfg, name)  # a clear error for a wrong folder
    return build_tiny_sd(model_cfg["tiny"], tokenizer, model_cfg.get("components"))


def _load_pretrained(model_cfg: dict[str, Any], tokenizer) -> StableDiffusionBackbone:
    source = pretrained_source(model_cfg)
    kwargs = {"revision": model_cfg.get("revision")}
    weights = dict(kwargs, variant=model_cfg.get("variant"))
    log.info("loading %s", source)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
    scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kwargs))
    return StableDiffusionBackbone(unet, vae, text_encoder, tokenizer, scheduler_config)


def build_tiny_sd(
    tiny_cfg: dict[str, Any], tokenizer=None, components: dict[str, str] | None = None
) -> StableDiffusionBackbone:
    """A small SD-shaped model from config, identical for the same seed on any machine.
    `components` names folders to load parts from instead (vae, text_encoder): a new UNet over
    a pretrained VAE and text encoder, as when pretraining the toy models."""
    components = components or {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny_cfg.get("seed", 0)))
        unet = UNet2DConditionModel(**tiny_cfg["unet"])
        if components.get("vae"):
            vae = AutoencoderKL.from_pretrained(Path(components["vae"]).expanduser())
        else:
            vae = AutoencoderKL(**tiny_cfg["vae"])
        if components.get("text_encoder"):
            path = Path(components["text_encoder"]).expanduser()
            text_encoder = CLIPTextModel.from_pretrained(path)
        else:
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_cfg["text_encoder"]))
    for module in (unet, vae, text_encoder):  # eval mode, as from_pretrained returns them
        module.eval()
    if tokenizer is None:
        # The real CLIP BPE vocabulary, so identifiers like "sks" tokenize exactly as in SD.
        max_length = tiny_cfg["text_encoder"]["max_position_embeddings"]
        tokenizer = build_clip_tokenizer(model_max_length=max_length)
    return StableDiffusionBackbone(unet, vae, text_encoder, tokenizer, dict(tiny_cfg["scheduler"]))
