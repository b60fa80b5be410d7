"""Helpers for the adapter tests: a tiny SD-shaped UNet, inputs, and capture hooks."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

UNET_KWARGS = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
# One block of each kind that the tests single out.
TRANSFORMER_BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
RESBLOCK = "down_blocks.0.resnets.0"


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """The same random weights for the same seed, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**UNET_KWARGS, **overrides}).eval()


def unet_inputs(batch: int = 2, tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, 32, generator=g)
    return sample, timesteps, context


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(*inputs).sample


@torch.no_grad()
def perturb(adapter_set, seed: int = 0, std: float = 0.2) -> None:
    """Give every adapter a non-zero up projection (and a fresh down projection)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_set.adapters.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


def single_block_filter(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


class Capture:
    """Record intermediates of one block with hooks registered AFTER the adapters' (so they see
    what the adapters made of them)."""

    def __init__(self, unet, transformer_block: str = TRANSFORMER_BLOCK, resblock: str = RESBLOCK):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        block = unet.get_submodule(transformer_block)
        res = unet.get_submodule(resblock)

        def pre(key, index, name):
            def hook(_m, args, kwargs):
                self.values[key] = kwargs[name] if name in kwargs else args[index]

            return hook

        def post(key):
            def hook(_m, _args, output):
                self.values[key] = output

            return hook

        for module, key, index, name in (
            (block, "block_in", 0, "hidden_states"),
            (block, "ctx", 2, "encoder_hidden_states"),
            (block.norm1, "norm1_in", 0, "input"),
            (block.norm2, "norm2_in", 0, "input"),
            (block.attn2, "attn2_ctx", 1, "encoder_hidden_states"),
            (block.norm3, "norm3_in", 0, "input"),
            (res, "res_in", 0, "input_tensor"),
            (res.norm1, "res_norm1_in", 0, "input"),
        ):
            self.handles.append(
                module.register_forward_pre_hook(pre(key, index, name), with_kwargs=True)
            )
        for module, key in (
            (block.attn1, "attn1_out"),
            (block.attn2, "attn2_out"),
            (block.ff, "ff_out"),
            (block, "block_out"),
            (res, "res_out"),
        ):
            self.handles.append(module.register_forward_hook(post(key)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def capture(unet, inputs) -> dict[str, torch.Tensor]:
    cap = Capture(unet)
    try:
        run(unet, inputs)
    finally:
        cap.remove()
    return {k: v.detach().clone() for k, v in cap.values.items()}
