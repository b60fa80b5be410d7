"""The real stabilityai/stable-diffusion-xl-base-1.0 configs (as its diffusers folder ships them,
written out here since tests are offline) and a reduced-width copy with every structural key
kept, so loaders and exports are tested against the real layout in seconds.

`write_sdxl_folder(folder)` writes a diffusers pipeline folder with random weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def sdxl_base_configs() -> dict[str, dict[str, Any]]:
    """Per component: the config.json of stabilityai/stable-diffusion-xl-base-1.0."""
    clip_text = {
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,  # legacy: CLIP pools at argmax(ids), the end token
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "pad_token_id": 1,
        "vocab_size": 49408,
    }
    return {
        "unet": {
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "class_embed_type": None,
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": None,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
            "timestep_post_act": None,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": None,
            "use_linear_projection": True,
        },
        "vae": {
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "force_upcast": True,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        "text_encoder": {  # CLIP ViT-L/14's text tower
            **clip_text,
            "architectures": ["CLIPTextModel"],
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
        },
        "text_encoder_2": {  # OpenCLIP ViT-bigG/14's text tower, with its projection
            **clip_text,
            "architectures": ["CLIPTextModelWithProjection"],
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
        },
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    }


def reduced_sdxl_configs() -> dict[str, dict[str, Any]]:
    """The same configs, every key kept, at a width that builds in a second: UNet channels / 10
    (heads / 5, so 32-channel heads), text widths / 16 (the same head count), fewer layers."""
    c = copy.deepcopy(sdxl_base_configs())
    unet, vae, te1, te2 = c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"]
    for te, layers in ((te1, 2), (te2, 3)):
        for key in ("hidden_size", "intermediate_size", "projection_dim"):
            te[key] //= 16
        te["num_hidden_layers"] = layers  # >= 2: the penultimate state stays a hidden layer
    unet["block_out_channels"] = [w // 10 for w in unet["block_out_channels"]]
    unet["attention_head_dim"] = [h // 5 for h in unet["attention_head_dim"]]
    unet["transformer_layers_per_block"] = [1, 1, 2]
    unet["layers_per_block"] = 1
    unet["addition_time_embed_dim"] //= 16
    unet["cross_attention_dim"] = te1["hidden_size"] + te2["hidden_size"]
    unet["projection_class_embeddings_input_dim"] = (
        6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    )
    vae["block_out_channels"] = [w // 4 for w in vae["block_out_channels"]]
    vae["layers_per_block"] = 1
    return c


def build_sdxl_pipeline(configs: dict[str, dict[str, Any]], seed: int = 0):
    """A StableDiffusionXLPipeline with random weights from these configs, with the real
    tokenizers' vocabulary (tokenizer_2 pads with "!")."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2ilab.models.clip_tokenizer import build_clip_tokenizer

    def text_config(cfg):
        return CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})

    scheduler_cfg = dict(configs["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_cfg.pop("_class_name"))
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.add_special_tokens({"pad_token": "!"})  # special, as in the real one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**configs["vae"]),
            text_encoder=CLIPTextModel(text_config(configs["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(text_config(configs["text_encoder_2"])),
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=tokenizer_2,
            unet=UNet2DConditionModel(**configs["unet"]),
            scheduler=scheduler_class.from_config(scheduler_cfg),  # ignores PNDM-era keys
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sdxl_folder(folder: Path, configs: dict[str, dict[str, Any]] | None = None) -> Path:
    """A diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    scheduler/) of the reduced real configs, random weights."""
    build_sdxl_pipeline(configs or reduced_sdxl_configs()).save_pretrained(folder)
    return Path(folder)
