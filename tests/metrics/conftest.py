"""Tiny random DINO (ViT) and CLIP models saved to disk, and hand-made image sets."""

import string

import pytest
import torch
from torch import nn


def _char_vocab() -> dict[str, int]:
    # a character-level BPE vocabulary: enough for the CLIP tokenizer to encode any lowercase prompt
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    return vocab


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = _char_vocab()
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tiny,
            "num_attention_heads": 4,
            "vocab_size": len(vocab),
            "max_position_embeddings": 40,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**tiny, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def _red_squares(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Red squares of varying size and position on a dark background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size)
    for k in range(n):
        side = int(torch.randint(size // 3, size // 2 + 1, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        images[k, 0, top : top + side, left : left + side] = 1.0
    return images


def _blue_noise(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size)
    images[:, 2] = torch.rand(n, size, size, generator=g)
    return images


class _TinyFeatures(nn.Module):
    """Deterministic conv features; stands in for Inception so FID/KID run without torchvision."""

    num_features = 14  # torchmetrics reads this instead of running a 299x299 dummy image

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.seen_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_dtypes.add(x.dtype)
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.cat([h, x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


# helpers are handed out as fixtures so tests never import conftest by module name


@pytest.fixture
def red_squares():
    return _red_squares


@pytest.fixture
def blue_noise():
    return _blue_noise


@pytest.fixture
def tiny_features():
    return _TinyFeatures()
