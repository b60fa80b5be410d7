"""The real stabilityai/stable-diffusion-3.5-large and -medium configs (as their diffusers folders
ship them, written out here since tests are offline) and reduced-width copies with every
structural key kept (dual attention, RMS q/k norm, 16 latent channels, the VAE's shift factor,
the flow scheduler's shift), so the loaders are tested against the real layout in seconds.

`write_sd3_folder(folder, size)` writes a diffusers pipeline folder with random weights. Its
tokenizer_3 is ByT5's byte-level tokenizer: the real T5TokenizerFast needs its sentencepiece
model, which cannot be fetched offline."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

CLIP_COMMON = {
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

TRANSFORMERS = {
    "large": {
        "attention_head_dim": 64,
        "caption_projection_dim": 2432,
        "dual_attention_layers": [],
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 38,
        "num_layers": 38,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
    "medium": {
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "dual_attention_layers": list(range(13)),
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
}


def sd35_configs(size: str) -> dict[str, dict[str, Any]]:
    """Per component: the config.json of stabilityai/stable-diffusion-3.5-`size`."""
    return {
        "transformer": dict(TRANSFORMERS[size]),
        "vae": {
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "force_upcast": True,
            "in_channels": 3,
            "latent_channels": 16,
            "latents_mean": None,
            "latents_std": None,
            "layers_per_block": 2,
            "mid_block_add_attention": True,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 1024,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_post_quant_conv": False,
            "use_quant_conv": False,
        },
        "text_encoder": {  # CLIP ViT-L/14 with its projection
            **CLIP_COMMON,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
        },
        "text_encoder_2": {  # OpenCLIP bigG/14 with its projection
            **CLIP_COMMON,
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
        },
        "text_encoder_3": {  # T5 v1.1 XXL's encoder
            "d_ff": 10240,
            "d_kv": 64,
            "d_model": 4096,
            "dense_act_fn": "gelu_new",
            "dropout_rate": 0.1,
            "feed_forward_proj": "gated-gelu",
            "is_gated_act": True,
            "layer_norm_epsilon": 1e-06,
            "num_heads": 64,
            "num_layers": 24,
            "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32,
            "vocab_size": 32128,
        },
        "scheduler": {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": 3.0,
        },
    }


def reduced_sd35_configs(size: str) -> dict[str, dict[str, Any]]:
    """The same configs, every key kept, at a width that builds in seconds: the transformer's
    real head size with 2 heads and 2 layers (the medium's first block keeps dual attention),
    text widths of 32 (T5 64), 1-2 layers, VAE channels / 4."""
    c = copy.deepcopy(sd35_configs(size))
    tr, vae, t5 = c["transformer"], c["vae"], c["text_encoder_3"]
    for name in ("text_encoder", "text_encoder_2"):
        te = c[name]
        te.update(hidden_size=32, intermediate_size=64, projection_dim=32)
        te.update(num_attention_heads=2, num_hidden_layers=2)
    t5.update(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=1)
    tr.update(num_layers=2, num_attention_heads=2)
    tr["caption_projection_dim"] = tr["num_attention_heads"] * tr["attention_head_dim"]
    tr["joint_attention_dim"] = t5["d_model"]
    tr["pooled_projection_dim"] = 64  # both CLIPs' projections side by side
    tr["dual_attention_layers"] = [i for i in tr["dual_attention_layers"] if i < 1]
    vae["block_out_channels"] = [w // 4 for w in vae["block_out_channels"]]
    vae["layers_per_block"] = 1
    return c


def build_sd3_pipeline(configs: dict[str, dict[str, Any]], seed: int = 0):
    """A StableDiffusion3Pipeline with random weights from these configs, the real CLIP
    vocabulary (tokenizer_2 pads with "!") and ByT5's tokenizer for T5."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        ByT5Tokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from t2ilab.models.clip_tokenizer import build_clip_tokenizer

    scheduler_cfg = {k: v for k, v in configs["scheduler"].items() if k != "_class_name"}
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.add_special_tokens({"pad_token": "!"})  # special, as in the real one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**configs["transformer"]),
            scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_cfg),
            vae=AutoencoderKL(**configs["vae"]),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"])),
            tokenizer=build_clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
            tokenizer_2=tokenizer_2,
            text_encoder_3=T5EncoderModel(T5Config(**configs["text_encoder_3"])),
            tokenizer_3=ByT5Tokenizer(),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sd3_folder(folder: Path, size: str = "large") -> Path:
    """A diffusers SD3.5 folder (model_index.json, transformer/, vae/, text_encoder(_2, _3)/,
    tokenizer(_2, _3)/, scheduler/) of the reduced real configs, random weights."""
    build_sd3_pipeline(reduced_sd35_configs(size)).save_pretrained(folder)
    return Path(folder)


def flux1_configs(variant: str = "dev") -> dict[str, dict[str, Any]]:
    """Per component: the config.json of black-forest-labs/FLUX.1-`variant` (dev or schnell;
    schnell has no guidance embedding and no shift). Its VAE is SD3's with Flux's factors."""
    sd3 = sd35_configs("large")
    vae = dict(sd3["vae"], scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder = {k: v for k, v in sd3["text_encoder"].items() if k != "projection_dim"}
    scheduler: dict[str, Any] = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    }
    if variant == "dev":
        scheduler.update(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return {
        "transformer": {
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": variant == "dev",
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "patch_size": 1,
            "pooled_projection_dim": 768,
        },
        "vae": vae,
        "text_encoder": text_encoder,  # CLIP ViT-L/14 (CLIPTextModel: the pooled output)
        "text_encoder_2": dict(sd3["text_encoder_3"]),  # T5 v1.1 XXL's encoder
        "scheduler": scheduler,
    }


def reduced_flux1_configs(variant: str = "dev") -> dict[str, dict[str, Any]]:
    """Every key kept; the real head size and rotary axes with one head, one block of each
    kind, text widths 32 (T5 64), VAE channels / 4."""
    c = copy.deepcopy(flux1_configs(variant))
    tr, vae = c["transformer"], c["vae"]
    c["text_encoder"].update(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2
    )
    c["text_encoder_2"].update(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=1)
    tr.update(num_attention_heads=1, num_layers=1, num_single_layers=1)
    tr["joint_attention_dim"] = c["text_encoder_2"]["d_model"]
    tr["pooled_projection_dim"] = c["text_encoder"]["hidden_size"]
    vae["block_out_channels"] = [w // 4 for w in vae["block_out_channels"]]
    vae["layers_per_block"] = 1
    return c


def write_flux1_folder(folder: Path, variant: str = "dev", seed: int = 0) -> Path:
    """A diffusers FLUX.1 folder of the reduced real configs, random weights, the real CLIP
    vocabulary and ByT5's tokenizer for T5."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from t2ilab.models.clip_tokenizer import build_clip_tokenizer

    configs = reduced_flux1_configs(variant)
    scheduler_cfg = {k: v for k, v in configs["scheduler"].items() if k != "_class_name"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_cfg),
            vae=AutoencoderKL(**configs["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            tokenizer=build_clip_tokenizer(),
            text_encoder_2=T5EncoderModel(T5Config(**configs["text_encoder_2"])),
            tokenizer_2=ByT5Tokenizer(),
            transformer=FluxTransformer2DModel(**configs["transformer"]),
        )
    pipe.save_pretrained(folder)
    return Path(folder)
