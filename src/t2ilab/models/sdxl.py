"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders (CLIP ViT-L and OpenCLIP
bigG) and on micro-conditioning time ids, from a hub id, a local diffusers folder, or a tiny
model built from config with a fixed seed.

The condition is what diffusers' StableDiffusionXLPipeline.encode_prompt (and its SDXL training
examples) computes: both encoders' penultimate hidden states concatenated, text_encoder_2's
projected pooled output, and (original_size, crop_top_left, target_size) per sample.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from omegaconf import DictConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from t2ilab.errors import UserError
from t2ilab.models.backbone import Backbone
from t2ilab.models.clip_tokenizer import build_clip_tokenizer
from t2ilab.models.sources import component_folder, plain, pretrained_source

log = logging.getLogger(__name__)

# SDXL's tokenizer_2 (OpenCLIP's) pads with "!" (id 0), a special token; tokenizer 1 pads with
# its end token. Both are CLIP's BPE over the same vocabulary.
SECOND_PAD_TOKEN = "!"


def tokens_containing(tokenizer, text: str) -> torch.Tensor:
    """(len(tokenizer),) bool: the tokenizer's tokens whose string contains `text`."""
    return torch.tensor([text in t for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])


def prompt_text(tokenizer, ids: list[int]) -> str:
    """The prompt as text again, for another CLIP tokenizer: a space at each word end (which
    CLIP's pre-tokenizer splits on anyway), added tokens (textual inversion) as they are, no
    special tokens. Built from the tokens: transformers 5's CLIPTokenizer.decode turns "</w>"
    into spaces by a patch on its backend that copy.deepcopy drops."""
    added = tokenizer.added_tokens_decoder
    pieces: list[str] = []
    run: list[str] = []
    for i in [*ids, None]:
        if i is not None and i not in added:
            run.append(tokenizer.convert_ids_to_tokens(i))
            continue
        if run:
            pieces.append(tokenizer.convert_tokens_to_string(run).replace("</w>", " "))
            run = []
        if i is not None and not added[i].special:
            pieces.append(added[i].content)
    return " ".join(pieces)


def second_tokenizer_ids(
    ids: torch.Tensor, tokenizer, tokenizer_2, marked: torch.Tensor | None = None
) -> torch.Tensor:
    """tokenizer_2's padded ids for the prompts that tokenizer 1 gave `ids` (a batch carries
    only tokenizer 1's). Every position after the first end token becomes tokenizer_2's pad.
    And as its pad token "!" is special, the stock tokenizer_2 also turns every "!" of a prompt
    into id 0 (diffusers#4153): rows with a token holding "!" (`marked`, from
    tokens_containing) are tokenized again from their text. Exact, except for a truncated
    prompt with "!" whose cut falls inside a word (its last token)."""
    is_end = (ids == tokenizer.eos_token_id).long()
    ids_2 = ids.masked_fill((is_end.cumsum(dim=1) - is_end) > 0, tokenizer_2.pad_token_id)
    pad = tokenizer_2.pad_token
    if pad in (tokenizer.pad_token, tokenizer.eos_token):
        return ids_2
    marked = tokens_containing(tokenizer, pad) if marked is None else marked
    for row in marked.to(ids.device)[ids].any(dim=1).nonzero().flatten().tolist():
        again = tokenizer_2(
            prompt_text(tokenizer, ids[row].tolist()),
            padding="max_length",
            max_length=ids.shape[1],
            truncation=True,
        ).input_ids
        ids_2[row] = torch.tensor(again, dtype=ids.dtype, device=ids.device)
    return ids_2


class StableDiffusionXLBackbone(Backbone):
    """The SDXL UNet on both CLIP encoders' penultimate states, the pooled projection of the
    second, and the size/crop time ids (`added_cond_kwargs`)."""

    family = "sdxl"
    description = "an SDXL UNet with two CLIP text encoders"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        scheduler_config,
        resolution: int = 1024,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(
            scheduler_config,
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.resolution = int(resolution)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def _marked(self) -> torch.Tensor:
        """tokens_containing(tokenizer, tokenizer_2's pad), kept while the vocabulary stays."""
        key = (len(self.tokenizer), self.tokenizer_2.pad_token)
        if getattr(self, "_marked_key", None) != key:
            self._marked_key = key
            self._marked_ids = tokens_containing(self.tokenizer, self.tokenizer_2.pad_token)
        return self._marked_ids

    def encode_prompt_ids(
        self, ids: torch.Tensor, ids_2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) from tokenizer 1's padded ids (and tokenizer_2's, derived
        from them when not given), as encode_prompt gives them."""
        if ids_2 is None:
            ids_2 = second_tokenizer_ids(ids, self.tokenizer, self.tokenizer_2, self._marked())
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds, second[0]  # [0]: CLIPTextModelWithProjection's text_embeds

    def time_ids(self, batch: dict[str, Any], n: int) -> torch.Tensor:
        """(n, 6): original_size + crop_top_left + target_size, each (height, width) / (top,
        left); batch values are (B, 2) or (2,) tensors, absent ones the uncropped resolution."""
        r = self.resolution
        defaults = {"original_size": (r, r), "crop_top_left": (0, 0), "target_size": (r, r)}
        parts = [
            torch.as_tensor(batch.get(key, default), dtype=torch.float32)
            .reshape(-1, 2)
            .expand(n, 2)
            for key, default in defaults.items()
        ]
        return torch.cat(parts, dim=1)

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> dict[str, Any]:
        """Batch keys: input_ids (tokenizer 1's), optional input_ids_2, original_size,
        crop_top_left, target_size; or a cache's prompt_embeds and pooled_prompt_embeds."""
        if "prompt_embeds" in batch:  # from a feature cache
            embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
                embeds, pooled = self.encode_prompt_ids(
                    batch["input_ids"], batch.get("input_ids_2")
                )
        time_ids = self.time_ids(batch, embeds.shape[0]).to(embeds.device, embeds.dtype)
        return {"embeds": embeds, "pooled": pooled, "time_ids": time_ids}

    def cached_condition(self, condition) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": condition["embeds"], "pooled_prompt_embeds": condition["pooled"]}

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        added = {"text_embeds": condition["pooled"], "time_ids": condition["time_ids"]}
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=condition["embeds"],
            added_cond_kwargs=added,
        ).sample

    def pipeline(self, scheduler) -> StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,  # no invisible-watermark dependency; not part of the model
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora(self, folder, denoiser_layers, denoiser_config, text_layers, text_configs):
        StableDiffusionXLPipeline.save_lora_weights(
            save_directory=folder,
            unet_lora_layers=denoiser_layers,
            text_encoder_lora_layers=text_layers[0],
            text_encoder_2_lora_layers=text_layers[1],
            unet_lora_adapter_metadata=denoiser_config,
            text_encoder_lora_adapter_metadata=text_configs[0],
            text_encoder_2_lora_adapter_metadata=text_configs[1],
            safe_serialization=True,
        )


def _components(model_cfg: dict[str, Any]) -> dict[str, str]:
    return model_cfg.get("components") or {}


def load_sdxl_tokenizer(model_cfg: DictConfig | dict) -> CLIPTokenizer:
    """The first tokenizer alone (what datasets tokenize with); the backbone loads the second."""
    model_cfg = plain(model_cfg)
    if model_cfg.get("pretrained"):
        return CLIPTokenizer.from_pretrained(
            pretrained_source(model_cfg), subfolder="tokenizer", revision=model_cfg.get("revision")
        )
    if _components(model_cfg).get("tokenizer"):
        return CLIPTokenizer.from_pretrained(component_folder(model_cfg, "tokenizer"))
    if model_cfg.get("tiny"):
        max_length = model_cfg["tiny"]["text_encoder"]["max_position_embeddings"]
        return build_clip_tokenizer(model_max_length=max_length)
    raise UserError(f"model '{model_cfg.get('name')}' sets neither model.pretrained nor model.tiny")


def load_second_clip_tokenizer(model_cfg: dict[str, Any]) -> CLIPTokenizer:
    """tokenizer_2 (OpenCLIP bigG's, SDXL's and SD3's): the folder's, or the tiny one."""
    if model_cfg.get("pretrained"):
        return CLIPTokenizer.from_pretrained(
            pretrained_source(model_cfg),
            subfolder="tokenizer_2",
            revision=model_cfg.get("revision"),
        )
    if _components(model_cfg).get("tokenizer_2"):
        return CLIPTokenizer.from_pretrained(component_folder(model_cfg, "tokenizer_2"))
    # The same CLIP BPE vocabulary as the first, padded with "!" as SDXL's tokenizer_2 is.
    max_length = model_cfg["tiny"]["text_encoder_2"]["max_position_embeddings"]
    tokenizer = build_clip_tokenizer(model_max_length=max_length)
    # As a special token, as the real tokenizer_2 loads it (a plain attribute would not be).
    tokenizer.add_special_tokens({"pad_token": SECOND_PAD_TOKEN})
    if tokenizer.pad_token_id != 0:
        raise RuntimeError(f"tokenizer_2 pads with id {tokenizer.pad_token_id}, SDXL's with 0")
    return tokenizer


def _vae_override(model_cfg: dict[str, Any]) -> AutoencoderKL | None:
    """A replacement VAE: model.components.vae (a folder) or model.vae (a hub id or folder),
    e.g. madebyollin/sdxl-vae-fp16-fix, which SDXL needs to decode in fp16 without NaNs."""
    if _components(model_cfg).get("vae"):
        return AutoencoderKL.from_pretrained(component_folder(model_cfg, "vae"))
    if model_cfg.get("vae"):
        return AutoencoderKL.from_pretrained(pretrained_source({"pretrained": model_cfg["vae"]}))
    return None


def load_sdxl_components(model_cfg: DictConfig | dict, tokenizer=None) -> StableDiffusionXLBackbone:
    model_cfg = plain(model_cfg)
    tokenizer = tokenizer or load_sdxl_tokenizer(model_cfg)
    tokenizer_2 = load_second_clip_tokenizer(model_cfg)
    resolution = int(model_cfg.get("resolution", 1024))
    vae = _vae_override(model_cfg)
    if model_cfg.get("pretrained"):
        source, kw = pretrained_source(model_cfg), {"revision": model_cfg.get("revision")}
        weights = dict(kw, variant=model_cfg.get("variant"))
        log.info("loading %s", source)
        if vae is None:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
            "text_encoder": CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", **weights
            ),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **weights
            ),
        }
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kw))
        force_zeros = DiffusionPipeline.load_config(source, **kw).get(
            "force_zeros_for_empty_prompt", True
        )
    else:
        tiny = model_cfg["tiny"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(tiny.get("seed", 0)))
            parts = {"unet": UNet2DConditionModel(**tiny["unet"])}
            if vae is None:
                vae = AutoencoderKL(**tiny["vae"])
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**tiny["text_encoder"]))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**tiny["text_encoder_2"])
            )
        scheduler_config, force_zeros = dict(tiny["scheduler"]), True
    parts["vae"] = vae
    for module in parts.values():  # eval mode, as from_pretrained returns them
        module.eval()
    return StableDiffusionXLBackbone(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler_config,
        resolution=resolution,
        force_zeros_for_empty_prompt=force_zeros,
        **parts,
    )
