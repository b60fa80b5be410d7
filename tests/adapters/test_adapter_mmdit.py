"""Adapters on joint-attention (MM-DiT) blocks: SD3's JointTransformerBlock and Flux's
FluxTransformerBlock, checked against the blocks' forwards written out here from diffusers'
code, with the adapter read and added where positions.py tables it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from adapter_testlib import perturb, single_block_filter
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from t2ilab.adapters import (
    AdapterConfig,
    attach_adapters,
    block_key,
    freeze_unet_except_adapters,
    hook_points,
    load_adapters,
    save_adapters,
    valid_pairs,
)
from t2ilab.errors import UserError

DIM = 16  # heads x head dim: the width of both streams inside the blocks
TRANSFORMER_PAIRS = [p for p in valid_pairs() if not p[0].startswith("Res")]
PAIR_IDS = [f"{i}->{o}" for i, o in TRANSFORMER_PAIRS]


def tiny_sd3(seed: int = 0, dual_attention_layers: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=DIM,
            pooled_projection_dim=8,
            pos_embed_max_size=16,
            dual_attention_layers=dual_attention_layers,
        ).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        ).eval()


def sd3_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
        timestep=torch.tensor([10.0, 700.0]),
    )


def flux_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 16, generator=g),  # 16 packed image tokens
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
        timestep=torch.tensor([0.01, 0.7]),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


MODELS = {"sd3": (tiny_sd3, sd3_inputs), "flux": (tiny_flux, flux_inputs)}


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def _reference_block(block, adapter, inp, out, x, ctx, temb, **attention_kwargs):
    """diffusers' JointTransformerBlock / FluxTransformerBlock forward (without dual attention),
    written out, with the adapter read and added at the points positions.py documents."""
    adp = None
    if inp == "SA_in":
        adp = adapter(x)
    if inp == "CA_c":
        adp = adapter(ctx)
    if out == "SA_in":
        x = x + adp
    if out == "CA_c":  # the text stream entering the block
        ctx = ctx + adp
    n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    last = getattr(block, "context_pre_only", False)  # SD3's last block ends the text stream
    if last:
        nc = block.norm1_context(ctx, temb)
    else:
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(ctx, emb=temb)
    a, ca = block.attn(hidden_states=n, encoder_hidden_states=nc, **attention_kwargs)
    if inp in ("SA_out", "CA_out"):  # the joint attention's image half
        adp = adapter(a)
    h1 = x + gate_msa[:, None] * a
    if inp in ("CA_in", "FFN_in"):
        adp = adapter(h1)
    if out in ("CA_in", "FFN_in"):  # written at the attention's output: through the gate
        h1 = h1 + gate_msa[:, None] * adp
    f = block.ff(block.norm2(h1) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    if inp == "FFN_out":
        adp = adapter(f)
    h2 = h1 + gate_mlp[:, None] * f
    if inp == "Trans_out":
        adp = adapter(h2)
    if out == "Trans_out":
        h2 = h2 + adp
    if last:
        return None, h2
    c1 = ctx + c_gate_msa[:, None] * ca
    norm_c1 = block.norm2_context(c1) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    c2 = c1 + c_gate_mlp[:, None] * block.ff_context(norm_c1)
    return c2, h2


def _block_inputs(kind: str, model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, DIM, generator=g)
    ctx = torch.randn(2, 5, DIM, generator=g)
    temb = torch.randn(2, DIM, generator=g)
    extra = {}
    if kind == "flux":
        ids = torch.cat([torch.zeros(5, 3), flux_inputs()["img_ids"]])
        extra["image_rotary_emb"] = model.pos_embed(ids)
    return x, ctx, temb, extra


def test_hook_tables_of_a_joint_attention_block():
    for kind, (build, _) in MODELS.items():
        points = hook_points(build().transformer_blocks[0])
        # One joint attention is the image tokens' self- and cross-attention.
        assert points.read["SA_out"] == points.read["CA_out"] == ("attn", "post"), kind
        assert points.read["CA_in"] == points.read["FFN_in"] == ("norm2", "pre"), kind
        assert points.write["CA_c"] == points.read["CA_c"] == ("", "pre"), kind
        assert points.write["FFN_in"] == ("attn", "post"), kind
        assert points.streams == {("attn", "post"): 0, ("", "post"): 1}, kind
        assert points.context_arg == (1, "encoder_hidden_states"), kind


# SD3's last block (context_pre_only) keeps no text stream; Flux's double blocks all do.
BLOCKS = [
    ("sd3", "transformer_blocks.0"),
    ("sd3", "transformer_blocks.1"),
    ("flux", "transformer_blocks.1"),
]


@pytest.mark.parametrize(("kind", "name"), BLOCKS, ids=[f"{k}-{n[-1]}" for k, n in BLOCKS])
@pytest.mark.parametrize("pair", TRANSFORMER_PAIRS, ids=PAIR_IDS)
@torch.no_grad()
def test_block_matches_the_written_out_forward(kind, name, pair):
    inp, out = pair
    model = MODELS[kind][0]()
    config = AdapterConfig(inp, out, rank=4, block_filter=single_block_filter(name), scale=2.0)
    adapters = attach_adapters(model, config)
    adapter, block = adapters.adapters[block_key(name)], model.get_submodule(name)
    perturb(adapters, std=0.5)
    x, ctx, temb, extra = _block_inputs(kind, model)
    hooked = block(x, encoder_hidden_states=ctx, temb=temb, **extra)
    # Gradient checkpointing passes the block's arguments positionally.
    positional = block(x, ctx, temb, *extra.values())
    adapters.enabled = False
    plain = block(x, encoder_hidden_states=ctx, temb=temb, **extra)
    reference = _reference_block(block, adapter, inp, out, x, ctx, temb, **extra)
    for got, want, again in zip(hooked, reference, positional, strict=True):
        assert (got is None) == (want is None) == (again is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert (plain[1] - reference[1]).abs().max() > 1e-3  # the adapter changes the image stream


@pytest.mark.parametrize("kind", MODELS)
def test_zero_adapters_change_nothing_and_go_on_the_double_stream_blocks(kind):
    build, inputs = MODELS[kind]
    model = build()
    bare = run(model, inputs())
    adapters = attach_adapters(model, AdapterConfig("CA_out", "FFN_in", rank=4))
    # Flux's single-stream blocks run attention and MLP side by side: no adapters there.
    assert adapters.block_names == ["transformer_blocks.0", "transformer_blocks.1"]
    assert torch.equal(run(model, inputs()), bare)
    perturb(adapters)
    assert (run(model, inputs()) - bare).abs().max() > 1e-3
    adapters.remove()
    assert torch.equal(run(model, inputs()), bare)


def test_rebuilt_residual_is_what_the_ffn_norm_sees():
    """CA_in -> FFN_in reads h1 = h0 + gate_msa * a exactly: norm2's input, captured."""
    model = tiny_sd3()
    block = model.transformer_blocks[0]
    seen = {}
    handle = block.norm2.register_forward_pre_hook(lambda _m, a: seen.setdefault("h1", a[0]))
    run(model, sd3_inputs())
    handle.remove()
    config = AdapterConfig("CA_in", "FFN_in", rank=4, block_filter=r"^transformer_blocks\.0$")
    adapters = attach_adapters(model, config)
    read = {}
    adapters.adapters[block_key("transformer_blocks.0")].register_forward_pre_hook(
        lambda _m, a: read.setdefault("x", a[0])
    )
    run(model, sd3_inputs())
    torch.testing.assert_close(read["x"], seen["h1"], rtol=0, atol=0)


def test_dual_attention_blocks_refuse_the_rebuilt_pairs_in_one_line():
    model = tiny_sd3(dual_attention_layers=(0,))  # SD3.5-Medium's MMDiT-X blocks
    with pytest.raises(UserError) as e:
        attach_adapters(model, AdapterConfig("FFN_in", "FFN_in", rank=4))
    assert "\n" not in str(e.value) and "transformer_blocks.0" in str(e.value)
    assert "block_filter" in str(e.value)
    # The workaround it names, and the pairs that need no rebuild, attach and start at zero.
    bare = run(model, sd3_inputs())
    skip = attach_adapters(
        model, AdapterConfig("FFN_in", "FFN_in", rank=4, block_filter=r"blocks\.[1-9]")
    )
    assert skip.block_names == ["transformer_blocks.1"]
    skip.remove()
    adapters = attach_adapters(model, AdapterConfig("CA_out", "FFN_in", rank=4))
    assert torch.equal(run(model, sd3_inputs()), bare)
    perturb(adapters)
    assert (run(model, sd3_inputs()) - bare).abs().max() > 1e-3


@pytest.mark.parametrize("kind", MODELS)
def test_adapters_train_and_the_base_stays(kind):
    build, inputs = MODELS[kind]
    model = build()
    adapters = attach_adapters(model, AdapterConfig("CA_out", "FFN_in", rank=4))
    perturb(adapters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = freeze_unet_except_adapters(model, adapters)
    model(**inputs()).sample.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is None for p in model.parameters())
    torch.optim.AdamW(params, lr=1e-2).step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", MODELS)
def test_save_load_round_trip(kind, tmp_path):
    build, inputs = MODELS[kind]
    model = build()
    adapters = attach_adapters(model, AdapterConfig("CA_c", "Trans_out", rank=4))
    perturb(adapters)
    expected = run(model, inputs())
    save_adapters(adapters, tmp_path / "export")
    fresh = build()
    assert not torch.equal(run(fresh, inputs()), expected)
    load_adapters(SimpleNamespace(transformer=fresh), tmp_path / "export")
    assert torch.equal(run(fresh, inputs()), expected)
