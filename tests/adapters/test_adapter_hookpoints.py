"""Each adapter reads and adds exactly where positions.py says, checked two ways:

1. with our own capture hooks on one block: the intermediate at the output position equals the
   base model's plus the adapter applied to the base model's value at the input position;
2. against a re-implementation of the official code's block forward (Xiang-cd/unet-finetune,
   `BasicTransformerBlock._forward` / `ResBlock._forward`), written out in the test.
"""

from __future__ import annotations

import pytest
import torch
from adapter_testlib import (
    RESBLOCK,
    TRANSFORMER_BLOCK,
    capture,
    perturb,
    single_block_filter,
    tiny_unet,
    unet_inputs,
)

from t2ilab.adapters import AdapterConfig, attach_adapters, block_key, valid_pairs

# Where the base model's value of each input position is captured.
INPUT_AT = {
    "SA_in": "block_in",
    "CA_c": "ctx",
    "SA_out": "attn1_out",
    "CA_in": "norm2_in",
    "CA_out": "attn2_out",
    "FFN_in": "norm3_in",
    "FFN_out": "ff_out",
    "Trans_out": "block_out",
    "Res_in": "res_in",
    "Res_out": "res_out",
}
# Output position -> (the intermediate the adapter output is added to, the residual stream it
# thereby reaches (or None), the last intermediate before the write, which must be untouched).
OUTPUT_AT = {
    "SA_in": ("norm1_in", None, "ctx"),
    "CA_in": ("attn1_out", "norm2_in", "norm1_in"),
    "CA_c": ("attn2_ctx", None, "norm2_in"),
    "FFN_in": ("attn2_out", "norm3_in", "norm2_in"),
    "Trans_out": ("block_out", None, "ff_out"),
    "Res_in": ("res_norm1_in", None, None),
    "Res_out": ("res_out", None, "res_in"),
}


@pytest.mark.parametrize("pair", valid_pairs(), ids=lambda p: f"{p[0]}->{p[1]}")
def test_output_is_added_at_the_documented_point(pair):
    inp, out = pair
    inputs = unet_inputs()
    unet = tiny_unet()
    base = capture(unet, inputs)
    target = RESBLOCK if inp.startswith("Res") else TRANSFORMER_BLOCK
    adapters = attach_adapters(
        unet, AdapterConfig(inp, out, rank=4, block_filter=single_block_filter(target))
    )
    assert adapters.block_names == [target]
    perturb(adapters)
    hooked = capture(unet, inputs)
    with torch.no_grad():
        delta = adapters.adapters[block_key(target)](base[INPUT_AT[inp]])
    assert delta.abs().max() > 1e-3
    written, residual, untouched = OUTPUT_AT[out]
    if inp == "CA_c" and out != "CA_c":
        assert delta.shape == (2, 1, 64)  # pooled over the text tokens, broadcast over the image
    # Bitwise: the hook returns stream + delta on an identical stream.
    assert torch.equal(hooked[written], base[written] + delta)
    if residual is not None:  # ... which the block's residual add carries on (up to rounding)
        torch.testing.assert_close(hooked[residual], base[residual] + delta, rtol=0, atol=1e-6)
    if untouched is not None:
        assert torch.equal(hooked[untouched], base[untouched])


def _reference_transformer_block(block, adapter, inp, out, x, context):
    """The official code's BasicTransformerBlock._forward with an in/out adapter, on diffusers'
    submodules (paper names in comments: attn1i = SA_in, attn2i = CA_in, ...)."""
    adp = None
    attn1i = x  # SA_in
    if inp == "SA_in":
        adp = adapter(attn1i)
    if inp == "CA_c":
        adp = adapter(context)
    if out == "SA_in":
        attn1i = adp + attn1i
    attn1o = block.attn1(block.norm1(attn1i))  # SA_out
    if inp == "SA_out":
        adp = adapter(attn1o)
    attn2i = attn1o + attn1i  # CA_in
    if inp == "CA_in":
        adp = adapter(attn2i)
    if out == "CA_in":
        attn2i = attn2i + adp
    if out == "CA_c":
        context = context + adp
    attn2o = block.attn2(block.norm2(attn2i), encoder_hidden_states=context)  # CA_out
    if inp == "CA_out":
        adp = adapter(attn2o)
    ffni = attn2o + attn2i  # FFN_in
    if inp == "FFN_in":
        adp = adapter(ffni)
    if out == "FFN_in":
        ffni = adp + ffni
    ffno = block.ff(block.norm3(ffni))  # FFN_out
    if inp == "FFN_out":
        adp = adapter(ffno)
    transo = ffno + ffni  # Trans_out
    if inp == "Trans_out":
        adp = adapter(transo)
    if out == "Trans_out":
        transo = adp + transo
    return transo


def _reference_resblock(res, adapter, inp, out, x, temb):
    """The official code's ResBlock._forward with an in/out adapter (stable-diffusion branch)."""
    adp = adapter(x) if inp == "Res_in" else None
    if out == "Res_in":
        x = x + adp
    h = res(x, temb)  # hooks disabled while the reference runs
    if inp == "Res_out":
        adp = adapter(h)
    return h + adp if out == "Res_out" else h


@pytest.mark.parametrize("pair", valid_pairs(), ids=lambda p: f"{p[0]}->{p[1]}")
@torch.no_grad()
def test_block_matches_the_official_forward(pair):
    inp, out = pair
    unet = tiny_unet()
    adapters = attach_adapters(unet, AdapterConfig(inp, out, rank=4, activation="silu", scale=2.0))
    perturb(adapters)
    g = torch.Generator().manual_seed(3)
    if inp.startswith("Res"):
        res = unet.get_submodule(RESBLOCK)
        adapter = adapters.adapters[block_key(RESBLOCK)]
        x = torch.randn(2, res.in_channels, 8, 8, generator=g)
        temb = torch.randn(2, res.time_emb_proj.in_features, generator=g)
        hooked = res(x, temb)
        adapters.enabled = False
        reference = _reference_resblock(res, adapter, inp, out, x, temb)
    else:
        block = unet.get_submodule(TRANSFORMER_BLOCK)
        adapter = adapters.adapters[block_key(TRANSFORMER_BLOCK)]
        x = torch.randn(2, 16, 64, generator=g)
        context = torch.randn(2, 5, 32, generator=g)
        hooked = block(x, encoder_hidden_states=context)
        # diffusers' gradient-checkpointing path passes every argument positionally.
        positional = block(x, None, context, None, None, None, None)
        adapters.enabled = False
        reference = _reference_transformer_block(block, adapter, inp, out, x, context)
        torch.testing.assert_close(positional, hooked, rtol=0, atol=0)
        plain = block(x, encoder_hidden_states=context)
        assert not torch.allclose(plain, reference, atol=1e-4)
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-6)
