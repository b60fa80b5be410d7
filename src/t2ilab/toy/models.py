"""The toy models' architectures, built from plain dicts (the recipes in conf/toy_component/).

Each is the field's own class, so the shipped folders load wherever the real ones do:
`AutoencoderKL` (diffusers), `CLIPModel` (transformers; its text tower is a `CLIPTextModel`),
and `ViTModel` standing in for DINO's ViT.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel


def build_vae(
    block_out_channels: list[int],
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 16,
    resolution: int = 64,
) -> AutoencoderKL:
    """An SD-style KL autoencoder; each block after the first halves the side, so 3 blocks
    turn 64x64x3 into 16x16x`latent_channels`."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
    )


def build_clip(
    tokenizer: Any,
    text: dict,
    vision: dict,
    projection_dim: int,
    resolution: int = 64,
    patch_size: int = 8,
) -> CLIPModel:
    """A CLIP whose text tower matches `tokenizer` (vocabulary, context length, special ids:
    the pooled text feature is read at the first `<|endoftext|>`)."""
    text_config = {
        **text,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_dim": projection_dim,
    }
    vision_config = {
        **vision,
        "image_size": resolution,
        "patch_size": patch_size,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=projection_dim
    )
    return CLIPModel(config)


def build_dino(
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    resolution: int = 64,
    patch_size: int = 8,
) -> ViTModel:
    """A small ViT; its pooler is kept (untrained, unused by the metric) so the folder is a
    complete `ViTModel` and `AutoModel` loads it without missing weights."""
    config = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        image_size=resolution,
        patch_size=patch_size,
        qkv_bias=True,
    )
    return ViTModel(config)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
