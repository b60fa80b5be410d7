"""Stable Diffusion 3 / 3.5: an MM-DiT (`SD3Transformer2DModel`) trained with rectified flow,
conditioned on CLIP-L, CLIP-G and T5, from a hub id, a local diffusers folder, or a tiny model
built from config with a fixed seed.

The condition is what diffusers' StableDiffusion3Pipeline.encode_prompt computes: both CLIPs'
penultimate hidden states side by side, zero-padded to T5's width and followed by T5's states
(one joint sequence), and the two CLIPs' projected pooled outputs side by side. Batches carry
tokenizer 1's ids (as for every family) and the prompt text; tokenizer_2's ids are derived
from tokenizer 1's as for SDXL, and T5 tokenizes the text (T5's vocabulary is another, and it
is case-sensitive).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from omegaconf import DictConfig
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from t2ilab.models.backbone import Backbone
from t2ilab.models.sdxl import (
    load_sdxl_tokenizer,
    load_second_clip_tokenizer,
    prompt_text,
    second_tokenizer_ids,
    tokens_containing,
)
from t2ilab.models.sources import (
    component_folder,
    plain,
    pretrained_parts,
    pretrained_source,
    tiny_parts,
)

# Attention projections of both streams of a joint-attention block, as diffusers' SD3 LoRA
# examples target them: the image stream (to_q/k/v, to_out.0) and the text stream (add_*).
MMDIT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


def single_vector_text(prompt: str, clip_tokenizer) -> str:
    """The prompt as the pipelines hand it to T5: textual inversion's multi-vector expansion on
    the CLIP side ("<tok> <tok>_1 <tok>_2", diffusers' maybe_convert_prompt) folded back into
    the one placeholder the prompt was written with (T5's tokenizer has no such tokens)."""
    for token in sorted(clip_tokenizer.get_added_vocab(), key=len, reverse=True):
        if f"{token}_1" in prompt:
            pattern = re.escape(token) + r"(?: " + re.escape(token) + r"_\d+)+"
            prompt = re.sub(pattern, token.replace("\\", "\\\\"), prompt)
    return prompt


def t5_ids(t5_tokenizer, ids: torch.Tensor, prompts=None, clip_tokenizer=None) -> torch.Tensor:
    """T5's padded ids for a batch's prompts: their text as the data gave it, or, for a batch
    without it, the text again from the CLIP ids (lowercased and re-spaced by CLIP's
    tokenizer, so only close to the original)."""
    if prompts is None:
        prompts = [prompt_text(clip_tokenizer, row.tolist()).strip() for row in ids]
    prompts = [single_vector_text(p, clip_tokenizer) for p in prompts]
    encoded = t5_tokenizer(
        list(prompts),
        padding="max_length",
        max_length=t5_tokenizer.model_max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return encoded.input_ids.to(ids.device)


class StableDiffusion3Backbone(Backbone):
    """SD3Transformer2DModel on the joint CLIP + T5 sequence and the pooled CLIP projections."""

    family = "sd3"
    description = "an SD3 MM-DiT with CLIP-L, CLIP-G and T5 text"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    # StableDiffusion3Pipeline.load_lora_weights takes CLIP-L's and CLIP-G's, not T5's.
    lora_text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_target_modules = MMDIT_LORA_TARGETS

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        scheduler_config,
    ):
        super().__init__(
            scheduler_config,
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self._marked_ids = tokens_containing(tokenizer, tokenizer_2.pad_token)

    @property
    def patch_size(self) -> int:  # latent pixels per token side
        return int(self.transformer.config.patch_size)

    def encode_prompt_ids(
        self, ids: torch.Tensor, prompts=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) from tokenizer 1's padded ids and the prompts' text, as
        encode_prompt gives them."""
        ids_2 = second_tokenizer_ids(ids, self.tokenizer, self.tokenizer_2, self._marked_ids)
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        t5 = self.text_encoder_3(t5_ids(self.tokenizer_3, ids, prompts, self.tokenizer))[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        pooled = torch.cat([first[0], second[0]], dim=-1)  # [0]: the projected text_embeds
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
        return self.transformer(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=condition["embeds"],
            pooled_projections=condition["pooled"],
        ).sample

    def pipeline(self, scheduler) -> StableDiffusion3Pipeline:
        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora(self, folder, denoiser_layers, denoiser_config, text_layers, text_configs):
        if text_layers[2]:
            raise ValueError("StableDiffusion3Pipeline loads no T5 LoRA")
        StableDiffusion3Pipeline.save_lora_weights(
            save_directory=folder,
            transformer_lora_layers=denoiser_layers,
            text_encoder_lora_layers=text_layers[0],
            text_encoder_2_lora_layers=text_layers[1],
            transformer_lora_adapter_metadata=denoiser_config,
            text_encoder_lora_adapter_metadata=text_configs[0],
            text_encoder_2_lora_adapter_metadata=text_configs[1],
            safe_serialization=True,
        )


def load_t5_tokenizer(model_cfg: dict[str, Any], subfolder: str):
    """The pipeline's T5 tokenizer (`subfolder`: tokenizer_3 for SD3, tokenizer_2 for Flux), a
    model.components folder of that name, or for tiny models ByT5's byte-level one (no vocab
    file, so it builds offline). model.max_length is the T5 token count trained with."""
    if model_cfg.get("pretrained"):
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_source(model_cfg), subfolder=subfolder, revision=model_cfg.get("revision")
        )
    elif (model_cfg.get("components") or {}).get(subfolder):
        tokenizer = AutoTokenizer.from_pretrained(component_folder(model_cfg, subfolder))
    else:
        tokenizer = ByT5Tokenizer()
    tokenizer.model_max_length = int(model_cfg.get("max_length", 256))
    return tokenizer


def load_sd3_components(model_cfg: DictConfig | dict, tokenizer=None) -> StableDiffusion3Backbone:
    model_cfg = plain(model_cfg)
    tokenizers = {
        "tokenizer": tokenizer or load_sdxl_tokenizer(model_cfg),
        "tokenizer_2": load_second_clip_tokenizer(model_cfg),
        "tokenizer_3": load_t5_tokenizer(model_cfg, "tokenizer_3"),
    }
    if model_cfg.get("pretrained"):
        classes = {
            "transformer": SD3Transformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection,
            "text_encoder_3": T5EncoderModel,
        }
        parts, scheduler_config = pretrained_parts(
            model_cfg, classes, FlowMatchEulerDiscreteScheduler
        )
    else:
        builders = {
            "transformer": lambda c: SD3Transformer2DModel(**c),
            "vae": lambda c: AutoencoderKL(**c),
            "text_encoder": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
            "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
            "text_encoder_3": lambda c: T5EncoderModel(T5Config(**c)),
        }
        parts = tiny_parts(model_cfg, builders)
        scheduler_config = dict(model_cfg["tiny"]["scheduler"])
    return StableDiffusion3Backbone(scheduler_config=scheduler_config, **tokenizers, **parts)
