"""Tiny randomly initialised evaluators, built from config with a fixed seed.

They let the whole evaluation path (generation, embedding, every metric, logging) run offline on
a CPU. Their numbers are computed for real but by untrained networks: they check the pipeline,
not the model. Real runs use eval.dino_model / eval.clip_model (DINO ViT-S/16, CLIP ViT-B/32).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from t2ilab.metrics.embedders import ClipEmbedder, DinoEmbedder
from t2ilab.metrics.images import Images
from t2ilab.models.clip_tokenizer import build_clip_tokenizer

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def build_tiny_evaluators(
    seed: int = 0, image_size: int = 32, device: str | torch.device = "cpu"
) -> tuple[DinoEmbedder, ClipEmbedder]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = ViTModel(
            ViTConfig(image_size=image_size, patch_size=8, **_TOWER), add_pooling_layer=False
        )
        clip = CLIPModel(
            CLIPConfig(
                text_config=dict(
                    vocab_size=49408,
                    max_position_embeddings=77,
                    bos_token_id=49406,
                    eos_token_id=49407,
                    pad_token_id=49407,
                    **_TOWER,
                ),
                vision_config=dict(image_size=image_size, patch_size=8, **_TOWER),
                projection_dim=32,
            )
        )
    return DinoEmbedder(vit, device=device), ClipEmbedder(
        clip, build_clip_tokenizer(), device=device
    )


class EmbeddingDistance:
    """distance(a, b) = 1 - cosine of image embeddings, per pair: DIV without LPIPS (which needs
    torchvision). A feature distance like LPIPS, but not LPIPS: results name it in their factors."""

    def __init__(self, embedder: DinoEmbedder | ClipEmbedder):
        self.embedder = embedder

    def __call__(self, a: Images, b: Images) -> Tensor:
        ea, eb = self.embedder.embed_images(a), self.embedder.embed_images(b)
        return 1 - torch.nn.functional.cosine_similarity(ea, eb, dim=-1)
