"""Flux.1 (dev and schnell): an MM-DiT with single-stream blocks (`FluxTransformer2DModel`)
trained with rectified flow, conditioned on CLIP-L's pooled output and T5's states, over packed
latents, from a hub id, a local diffusers folder, or a tiny model built from config.

What FluxPipeline computes, and this backbone therefore trains with:
- latents packed 2x2 into tokens (B, C, H, W) -> (B, H/2 * W/2, 4C), unpacked after;
- position ids: text tokens all zero, image tokens (0, row, column) of the packed grid;
- the timestep (t in [0, 1]) and, for guidance-distilled dev, the guidance value as inputs
  (diffusers' Flux trainers feed a fixed guidance, 3.5 by default: model.guidance_scale);
- the resolution-dependent shift of its scheduler (t2ilab.flow.dynamic_shift).
Batches carry CLIP's ids and the prompt text, which T5 tokenizes (as for SD3).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from omegaconf import DictConfig
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from t2ilab.models.backbone import Backbone
from t2ilab.models.sd3 import MMDIT_LORA_TARGETS, load_t5_tokenizer, t5_ids
from t2ilab.models.sdxl import load_sdxl_tokenizer
from t2ilab.models.sources import plain, pretrained_parts, tiny_parts


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline._pack_latents."""
    return FluxPipeline._pack_latents(latents, *latents.shape[:2], *latents.shape[2:])


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) for latents of H x W (FluxPipeline._unpack_latents
    with a VAE factor of 1)."""
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The packed grid's position ids for latents of H x W."""
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


class FluxBackbone(Backbone):
    """FluxTransformer2DModel on T5's states, CLIP-L's pooled output and the guidance value."""

    family = "flux"
    description = "a Flux MM-DiT with CLIP-L and T5 text"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    # Both streams of the double blocks; the single blocks' attention has to_q/k/v too.
    lora_target_modules = MMDIT_LORA_TARGETS
    lora_text_encoder_names = ("text_encoder",)  # FluxPipeline loads CLIP-L's LoRA, not T5's
    patch_size = 2  # latents are packed 2x2 into tokens

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        scheduler_config,
        guidance_scale: float = 3.5,
    ):
        super().__init__(
            scheduler_config,
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.guidance_scale = float(guidance_scale)

    @property
    def embedding_encoders(self):
        # FluxPipeline loads textual-inversion embeddings into CLIP-L alone.
        return [(self.text_encoder, self.tokenizer)]

    def encode_prompt_ids(
        self, ids: torch.Tensor, prompts=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states, CLIP pooled) from CLIP's padded ids and the prompts' text, as
        FluxPipeline.encode_prompt gives them."""
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        embeds = self.text_encoder_2(t5_ids(self.tokenizer_2, ids, prompts, self.tokenizer))[0]
        return embeds, pooled

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> dict[str, Any]:
        if "prompt_embeds" in batch:  # from a feature cache
            return {"embeds": batch["prompt_embeds"], "pooled": batch["pooled_prompt_embeds"]}
        with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
            embeds, pooled = self.encode_prompt_ids(batch["input_ids"], batch.get("prompt"))
        return {"embeds": embeds, "pooled": pooled}

    def cached_condition(self, condition) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": condition["embeds"], "pooled_prompt_embeds": condition["pooled"]}

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        embeds = condition["embeds"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=noisy_latents.device)
        out = self.transformer(
            hidden_states=pack(noisy_latents),
            timestep=timesteps / 1000,  # the pipeline's convention: t in [0, 1]
            guidance=guidance,
            pooled_projections=condition["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),
            img_ids=image_ids(h, w, noisy_latents.device, noisy_latents.dtype),
        ).sample
        return unpack(out, h, w)

    def pipeline(self, scheduler) -> FluxPipeline:
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora(self, folder, denoiser_layers, denoiser_config, text_layers, text_configs):
        if text_layers[1]:
            raise ValueError("FluxPipeline loads no T5 LoRA")
        FluxPipeline.save_lora_weights(
            save_directory=folder,
            transformer_lora_layers=denoiser_layers,
            text_encoder_lora_layers=text_layers[0],
            transformer_lora_adapter_metadata=denoiser_config,
            text_encoder_lora_adapter_metadata=text_configs[0],
            safe_serialization=True,
        )


def load_flux_components(model_cfg: DictConfig | dict, tokenizer=None) -> FluxBackbone:
    model_cfg = plain(model_cfg)
    tokenizers = {
        "tokenizer": tokenizer or load_sdxl_tokenizer(model_cfg),
        "tokenizer_2": load_t5_tokenizer(model_cfg, "tokenizer_2"),
    }
    if model_cfg.get("pretrained"):
        classes = {
            "transformer": FluxTransformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel,
        }
        parts, scheduler_config = pretrained_parts(
            model_cfg, classes, FlowMatchEulerDiscreteScheduler
        )
    else:
        builders = {
            "transformer": lambda c: FluxTransformer2DModel(**c),
            "vae": lambda c: AutoencoderKL(**c),
            "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
            "text_encoder_2": lambda c: T5EncoderModel(T5Config(**c)),
        }
        parts = tiny_parts(model_cfg, builders)
        scheduler_config = dict(model_cfg["tiny"]["scheduler"])
    if parts["vae"].config.get("shift_factor") is None:
        # FluxPipeline adds vae.config.shift_factor unconditionally; an SD-style VAE (the toy
        # one) has none, which means 0.
        parts["vae"].register_to_config(shift_factor=0.0)
    return FluxBackbone(
        scheduler_config=scheduler_config,
        guidance_scale=float(model_cfg.get("guidance_scale", 3.5)),
        **tokenizers,
        **parts,
    )
