"""PixArt-alpha on the shared diffusion step: the DiT of stage 1 (t2ilab.modules.dit) with
cross-attention to frozen T5 features."""

from __future__ import annotations

from typing import Any

import torch

from t2ilab.modules.base import DiffusionModule
from t2ilab.modules.dit import mean_prediction


def tokenizer_attention_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The attention mask the tokenizer gives with these ids (what the pipeline and the feature
    cache use), rebuilt from padded ids. CLIP pads with its end token, so the first end token is
    text and the rest are padding; T5 pads with a token of its own."""
    is_pad = ids == tokenizer.pad_token_id
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        is_pad &= is_pad.long().cumsum(dim=1) > 1
    mask = (~is_pad).long()
    mask[:, 0] = 1  # an empty caption (dropped for CFG) still has one token to attend
    return mask


class PixArtModule(DiffusionModule):
    """PixArt-alpha: PixArtTransformer2DModel (adaLN-single, cross-attention in every block)
    conditioned on frozen T5 features with their attention mask."""

    backbone_families = ("pixart",)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config, **base_kwargs):
        for key in ("train_unet", "train_text_encoder"):
            base_kwargs.pop(key, None)
        super().__init__(vae=vae, scheduler_config=scheduler_config, **base_kwargs)
        self.transformer = transformer
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer

    @property
    def backbone(self):
        return self.transformer

    def train(self, mode: bool = True):
        super().train(mode)  # the VAE stays in eval mode (DiffusionModule.train)
        self.text_encoder.eval()
        return self

    def encode_condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "prompt_embeds" in batch:  # from the feature cache
            embeds, mask = batch["prompt_embeds"], batch["prompt_mask"]
        else:
            ids = batch["input_ids"]
            mask = tokenizer_attention_mask(ids, self.tokenizer)
            with torch.no_grad():
                embeds = self.text_encoder(ids, attention_mask=mask)[0]
        added = {"resolution": batch.get("resolution"), "aspect_ratio": batch.get("aspect_ratio")}
        return {"embeds": embeds, "mask": mask, "added": added}

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        out = self.transformer(
            noisy_latents,
            encoder_hidden_states=condition["embeds"],
            encoder_attention_mask=condition["mask"],
            timestep=timesteps,
            added_cond_kwargs=condition["added"],
        ).sample
        return mean_prediction(out, noisy_latents.shape[1])

    def pipeline(self, scheduler):
        from t2ilab.models.pixart_dit import build_pixart_pipeline

        return build_pixart_pipeline(
            self.transformer, self.vae, self.text_encoder, self.tokenizer, scheduler
        )
