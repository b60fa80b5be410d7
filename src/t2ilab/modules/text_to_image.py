"""The Stable Diffusion family on the shared diffusion step: a UNet conditioned on CLIP
text-encoder states. DreamBooth and the parameter-efficient methods subclass it."""

from __future__ import annotations

from typing import Any

import torch

from t2ilab.models.pipelines import build_sd_pipeline
from t2ilab.modules.base import DiffusionModule


class TextToImageModule(DiffusionModule):
    """A UNet conditioned on CLIP text-encoder states: the Stable Diffusion family.

    Full fine-tuning of the UNet (and optionally the text encoder); parameter-efficient methods
    subclass it and change what is trainable and how the artefact is saved.
    """

    backbone_families = ("sd",)

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config: dict[str, Any],
        train_unet: bool = True,
        train_text_encoder: bool = False,
        **base_kwargs,
    ):
        super().__init__(vae=vae, scheduler_config=scheduler_config, **base_kwargs)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.train_unet = train_unet
        self.train_text_encoder = train_text_encoder
        self.unet.requires_grad_(train_unet)
        self.text_encoder.requires_grad_(train_text_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (the VAE: DiffusionModule.train).
        if not self.train_text_encoder:
            self.text_encoder.eval()
        if not self.train_unet:
            self.unet.eval()
        return self

    def encode_condition(self, batch: dict[str, Any]) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"]
        # Gradients through the text encoder only when some of it trains (fine-tuning, LoRA on the
        # text encoder, textual inversion's embedding rows).
        text_trains = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(text_trains and torch.is_grad_enabled()):
            return self.text_encoder(batch["input_ids"])[0]

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=condition).sample

    @property
    def backbone(self):
        return self.unet

    def pipeline(self, scheduler):
        """A StableDiffusionPipeline over this module's current weights."""
        return build_sd_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer, scheduler)
