"""Transformer backbones: PixArt-alpha (text-conditioned DiT with adaLN-single and T5 features)
and the class-conditional DiT that PixArt's stage 1 starts from. Hub id, local diffusers folder,
or a tiny model built from config with a fixed seed, as for Stable Diffusion."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from t2ilab.models.backbone import Backbone
from t2ilab.models.sources import component_folder, load_text_encoder, plain, pretrained_source

log = logging.getLogger(__name__)


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


def mean_prediction(output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """DiT and PixArt predict noise and a learned variance (2C channels); the simple MSE loss
    trains the noise half, as both papers' L_simple does."""
    return output[:, :latent_channels] if output.shape[1] == 2 * latent_channels else output


class PixArtBackbone(Backbone):
    """PixArtTransformer2DModel (adaLN-single, cross-attention in every block) on frozen T5
    states with their attention mask. PixArt-alpha and PixArt-Sigma differ in their pipeline
    (and Sigma's 300 tokens, model.max_length)."""

    family = "pixart"
    description = "a PixArt transformer with T5 text"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config, sigma=False):
        super().__init__(
            scheduler_config,
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.sigma = sigma

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> dict[str, Any]:
        if "prompt_embeds" in batch:  # from the feature cache
            embeds, mask = batch["prompt_embeds"], batch["prompt_mask"]
        else:
            ids = batch["input_ids"]
            mask = tokenizer_attention_mask(ids, self.tokenizer)
            with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
                embeds = self.text_encoder(ids, attention_mask=mask)[0]
        added = {"resolution": batch.get("resolution"), "aspect_ratio": batch.get("aspect_ratio")}
        return {"embeds": embeds, "mask": mask, "added": added}

    def cached_condition(self, condition) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": condition["embeds"], "prompt_mask": condition["mask"]}

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
        return build_pixart_pipeline(
            self.transformer, self.vae, self.text_encoder, self.tokenizer, scheduler, self.sigma
        )


class DiTBackbone(Backbone):
    """The class-conditional DiT (adaLN-Zero) of PixArt's stage 1: class labels, no text. Its
    label embedding drops labels to the null class in training (class_dropout_prob 0.1)."""

    family = "dit"
    description = "a class-conditional DiT (no text)"
    denoiser_name = "transformer"

    def __init__(self, transformer, vae, scheduler_config, id2label=None):
        super().__init__(scheduler_config, transformer=transformer, vae=vae)
        self.id2label: dict[int, str] = dict(id2label or {})
        self.tokenizer = None

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> torch.Tensor:
        return batch["class_labels"]

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        out = self.transformer(noisy_latents, timestep=timesteps, class_labels=condition).sample
        return mean_prediction(out, noisy_latents.shape[1])

    def pipeline(self, scheduler) -> DiTPipeline:
        return build_dit_pipeline(self.transformer, self.vae, scheduler, self.id2label)

    def save_pipeline(self, folder, scheduler) -> None:
        # The pipeline folder carries the labels in model_index.json (build_dit_pipeline), where
        # stock DiTPipeline.from_pretrained reads them; the side file serves readers of older
        # exports' layout (class id -> name).
        super().save_pipeline(folder, scheduler)
        (Path(folder) / LABELS_FILE).write_text(json.dumps(self.id2label, indent=2))


# The class names beside a DiT export: older exports have them only here (not in
# model_index.json, so stock diffusers lost them); exports still write it for those readers.
LABELS_FILE = "id2label.json"


def build_dit_pipeline(transformer, vae, scheduler, id2label: dict[int, str] | None = None):
    """A DiTPipeline whose save_pretrained writes the class names into model_index.json, where
    stock `DiTPipeline.from_pretrained` reads them (as facebook/DiT-XL-2-256 ships them): the
    pipeline's own __init__ keeps them only as `labels`, which are not saved."""
    pipe = DiTPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label or None
    )
    if id2label:
        pipe.register_to_config(id2label={str(k): v for k, v in sorted(id2label.items())})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def side_file_id2label(folder: str | Path) -> dict[int, str] | None:
    """The class names in a DiT export's id2label.json, if it has one."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def load_dit_pipeline(folder: str | Path, **kwargs) -> DiTPipeline:
    """DiTPipeline.from_pretrained, with the class names of older exports too."""
    labels = side_file_id2label(folder)
    return DiTPipeline.from_pretrained(folder, **({"id2label": labels} if labels else {}), **kwargs)


def build_pixart_pipeline(transformer, vae, text_encoder, tokenizer, scheduler, sigma=False):
    """PixArtAlphaPipeline, or PixArtSigmaPipeline for Sigma (same parts, 300 T5 tokens)."""
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_t5_tokenizer(model_cfg: dict[str, Any]):
    """The pipeline's tokenizer (T5's for PixArt-alpha; whatever class the folder saved, so the
    toy PixArt's CLIP tokenizer loads too), a `model.components.tokenizer` folder, or for tiny
    models ByT5's byte-level one (no vocab file, so it builds offline). `model.max_length`
    (PixArt: 120 tokens) becomes model_max_length."""
    max_length = int(model_cfg.get("max_length", 120))
    if model_cfg.get("pretrained"):
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_source(model_cfg), subfolder="tokenizer", revision=model_cfg.get("revision")
        )
    elif (model_cfg.get("components") or {}).get("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(component_folder(model_cfg, "tokenizer"))
    else:
        tokenizer = ByT5Tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _vae(model_cfg: dict[str, Any]) -> AutoencoderKL:
    """A tiny model's VAE: built from tiny.vae, or a pretrained one from model.components.vae
    (the toy transformers train over the shipped toy VAE)."""
    if (model_cfg.get("components") or {}).get("vae"):
        return AutoencoderKL.from_pretrained(component_folder(model_cfg, "vae"))
    return AutoencoderKL(**model_cfg["tiny"]["vae"])


def load_pixart_components(model_cfg, tokenizer=None) -> PixArtBackbone:
    model_cfg = plain(model_cfg)
    tokenizer = tokenizer or load_t5_tokenizer(model_cfg)
    sigma = model_cfg.get("version") == "sigma"
    if model_cfg.get("pretrained"):
        source, kw = pretrained_source(model_cfg), {"revision": model_cfg.get("revision")}
        weights = dict(kw, variant=model_cfg.get("variant"))
        log.info("loading %s", source)
        return PixArtBackbone(
            transformer=PixArtTransformer2DModel.from_pretrained(
                source, subfolder="transformer", **weights
            ),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
            text_encoder=load_text_encoder(source, subfolder="text_encoder", **weights),
            tokenizer=tokenizer,
            scheduler_config=dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kw)),
            sigma=sigma,
        )
    tiny = model_cfg["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", 0)))
        transformer = PixArtTransformer2DModel(**tiny["transformer"])
        vae = _vae(model_cfg)
        if (model_cfg.get("components") or {}).get("text_encoder"):
            text_encoder = load_text_encoder(component_folder(model_cfg, "text_encoder"))
        else:
            text_encoder = T5EncoderModel(T5Config(**tiny["text_encoder"]))
    # Built modules start in train mode (T5 has dropout); from_pretrained ones in eval mode.
    for module in (transformer, vae, text_encoder):
        module.eval()
    return PixArtBackbone(
        transformer, vae, text_encoder, tokenizer, dict(tiny["scheduler"]), sigma=sigma
    )


def load_dit_components(model_cfg, tokenizer=None) -> DiTBackbone:
    model_cfg = plain(model_cfg)
    if model_cfg.get("pretrained"):
        source = pretrained_source(model_cfg)
        log.info("loading %s", source)
        pipe = load_dit_pipeline(source, revision=model_cfg.get("revision"))
        # DiTPipeline keeps label -> id (several names per class); invert to id -> first name.
        id2label: dict[int, str] = {}
        for name, class_id in (getattr(pipe, "labels", None) or {}).items():
            id2label.setdefault(int(class_id), name)
        return DiTBackbone(pipe.transformer, pipe.vae, dict(pipe.scheduler.config), id2label)
    tiny = model_cfg["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", 0)))
        transformer = DiTTransformer2DModel(**tiny["transformer"])
        vae = _vae(model_cfg)
    transformer.eval()
    vae.eval()
    return DiTBackbone(transformer, vae, dict(tiny["scheduler"]))


def is_dit_folder(path: str | Path) -> bool:
    config = Path(path) / "transformer" / "config.json"
    return config.is_file() and '"DiTTransformer2DModel"' in config.read_text()
