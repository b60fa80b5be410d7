"""The toy models' architectures, built from plain dicts (the recipes in conf/toy_component/).

Each is the field's own class, so the shipped folders load wherever the real ones do:
`AutoencoderKL` (diffusers), `CLIPModel` (transformers; its text tower is a `CLIPTextModel`),
and a `ResNetModel` standing in for DINO's ViT (a small ViT trained from scratch on a CPU barely
learns shapes in an hour; a small CNN learns them in minutes, and the metric only needs one
embedding per image).
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL
from transformers import CLIPConfig, CLIPModel, ResNetConfig, ResNetModel


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
    hidden_sizes: list[int],
    depths: list[int],
    embedding_size: int = 32,
    layer_type: str = "basic",
) -> ResNetModel:
    """A small ResNet (stem: 7x7 stride-2 conv and a max-pool, then one stage per entry of
    `hidden_sizes`, each after the first halving the side); the embedding is its pooled
    output, `hidden_sizes[-1]` wide."""
    config = ResNetConfig(
        num_channels=3,
        embedding_size=embedding_size,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        layer_type=layer_type,
        hidden_act="relu",
        downsample_in_first_stage=False,
    )
    return ResNetModel(config)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
