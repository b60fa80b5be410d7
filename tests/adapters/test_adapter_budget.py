"""The paper's parameter budget on an SD-1.5-shaped UNet: 1.5 M adapter parameters, 0.17 %.

The fast tests build the UNet on the meta device (shapes, no memory); the slow one builds it for
real once and checks that the default adapters start as identity.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from t2ilab.adapters import AdapterConfig, attach_adapters, count_adapter_parameters

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the other defaults are SD 1.x's
SD15_PARAMS = 859_520_964


@pytest.fixture(scope="module")
def sd15_meta_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def _count(unet, cfg):
    adapters = attach_adapters(unet, cfg)
    try:
        return len(adapters.block_names), *count_adapter_parameters(unet, adapters)
    finally:
        adapters.remove()


def test_sd15_shape(sd15_meta_unet):
    assert sum(p.numel() for p in sd15_meta_unet.parameters()) == SD15_PARAMS


@pytest.mark.parametrize(
    "cfg, blocks, n_params",
    [
        # 16 transformer blocks, widths summing to 12,480: 24,976 * r + 12,480.
        (AdapterConfig("CA_out", "FFN_in"), 16, 1_511_040),  # default rank 60
        (AdapterConfig("CA_out", "FFN_in", rank=8), 16, 212_288),
        (AdapterConfig("SA_in", "Trans_out", rank=59), 16, 1_486_064),
        (AdapterConfig("CA_c", "CA_c"), 16, 1_487_808),  # 768 -> 60 -> 768
        (AdapterConfig("CA_c", "FFN_in"), 16, 1_499_520),  # 768 -> 60 -> dim, pooled
        # 22 ResBlocks, 3x3 convs; default rank 3.
        (AdapterConfig("Res_in", "Res_out"), 22, 1_427_586),
        (
            AdapterConfig("Res_in", "Res_out", rank=7),
            22,
            3_224_794,
        ),  # the official example's mid_dim
    ],
    ids=lambda v: (
        f"{v.input_position}->{v.output_position}@{v.rank}"
        if isinstance(v, AdapterConfig)
        else None
    ),
)
def test_parameter_budget(sd15_meta_unet, cfg, blocks, n_params):
    n_blocks, n, share = _count(sd15_meta_unet, cfg)
    assert (n_blocks, n) == (blocks, n_params)
    assert share == n / SD15_PARAMS


def test_default_rank_is_the_papers_budget(sd15_meta_unet):
    """Rank 60 is the rank whose count is closest to 1.5 M (paper: 1.5 M, 0.17 %)."""
    counts = {r: _count(sd15_meta_unet, AdapterConfig(rank=r))[1] for r in (59, 60, 61)}
    assert min(counts, key=lambda r: abs(counts[r] - 1_500_000)) == 60
    _, n, share = _count(sd15_meta_unet, AdapterConfig())
    assert round(n / 1e6, 1) == 1.5 and round(100 * share, 2) == 0.18


@pytest.mark.slow
def test_real_sd15_unet_default_adapters_are_identity():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    sample = torch.randn(1, 4, 16, 16)
    context = torch.randn(1, 77, 768)
    with torch.no_grad():
        base = unet(sample, 999, context).sample
        attach_adapters(unet, AdapterConfig())
        assert count_adapter_parameters(unet) == (1_511_040, 1_511_040 / SD15_PARAMS)
        assert torch.equal(unet(sample, 999, context).sample, base)
