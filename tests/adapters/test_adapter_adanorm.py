"""Adapters on adaLN transformer blocks: PixArt (ada_norm_single) and DiT (ada_norm_zero, no
cross-attention), checked against block forwards written out here from diffusers' code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from adapter_testlib import perturb, single_block_filter
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from t2ilab.adapters import (
    AdapterConfig,
    attach_adapters,
    block_key,
    freeze_unet_except_adapters,
    hook_points,
    load_adapters,
    missing_parts,
    save_adapters,
    valid_pairs,
)
from t2ilab.errors import UserError

SIZES = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
)
DIM = 16
BLOCK = "transformer_blocks.1"
TRANSFORMER_PAIRS = [p for p in valid_pairs() if not p[0].startswith("Res")]


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PixArtTransformer2DModel(
            **SIZES,
            cross_attention_dim=16,
            caption_channels=16,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        ).eval()


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiTTransformer2DModel(**SIZES, num_embeds_ada_norm=10).eval()


def pixart_inputs(batch: int = 2, tokens: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, tokens, 16, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def dit_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, 10, (batch,), generator=g),
    )


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def _reference_pixart_block(block, adapter, inp, out, x, ctx, t):
    """diffusers' BasicTransformerBlock.forward for ada_norm_single, written out, with the adapter
    read and added at the points positions.py documents."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        block.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)
    ).chunk(6, dim=1)
    adp = None
    h0 = x  # SA_in
    if inp == "SA_in":
        adp = adapter(h0)
    if inp == "CA_c":
        adp = adapter(ctx)
    if out == "SA_in":
        h0 = h0 + adp
    a1 = block.attn1(block.norm1(h0) * (1 + scale_msa) + shift_msa)  # SA_out
    if inp == "SA_out":
        adp = adapter(a1)
    h1 = h0 + gate_msa * a1  # CA_in
    if inp == "CA_in":
        adp = adapter(h1)
    if out == "CA_in":  # written at attn1's output: passes through the gate
        h1 = h1 + gate_msa * adp
    if out == "CA_c":
        ctx = ctx + adp
    a2 = block.attn2(h1, encoder_hidden_states=ctx)  # CA_out; no norm before it on PixArt
    if inp == "CA_out":
        adp = adapter(a2)
    h2 = h1 + a2  # FFN_in
    if inp == "FFN_in":
        adp = adapter(h2)
    if out == "FFN_in":
        h2 = h2 + adp
    f = block.ff(block.norm2(h2) * (1 + scale_mlp) + shift_mlp)  # FFN_out
    if inp == "FFN_out":
        adp = adapter(f)
    h3 = h2 + gate_mlp * f  # Trans_out
    if inp == "Trans_out":
        adp = adapter(h3)
    if out == "Trans_out":
        h3 = h3 + adp
    return h3


def _reference_dit_block(block, adapter, inp, out, x, t, labels):
    """The same for ada_norm_zero without cross-attention (h2 = h1)."""
    adp = None
    h0 = x
    if inp == "SA_in":
        adp = adapter(h0)
    if out == "SA_in":
        h0 = h0 + adp
    n1, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h0, t, labels, hidden_dtype=x.dtype)
    a1 = block.attn1(n1)
    if inp == "SA_out":
        adp = adapter(a1)
    h1 = h0 + gate_msa[:, None] * a1  # CA_in = FFN_in
    if inp in ("CA_in", "FFN_in"):
        adp = adapter(h1)
    if out == "CA_in":
        h1 = h1 + gate_msa[:, None] * adp
    f = block.ff(block.norm3(h1) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    if inp == "FFN_out":
        adp = adapter(f)
    h3 = h1 + gate_mlp[:, None] * f
    if inp == "Trans_out":
        adp = adapter(h3)
    if out == "Trans_out":
        h3 = h3 + adp
    return h3


def _attach_one(model, inp, out, **kw):
    cfg = AdapterConfig(inp, out, rank=4, block_filter=single_block_filter(BLOCK), **kw)
    adapters = attach_adapters(model, cfg)
    return adapters, adapters.adapters[block_key(BLOCK)], model.get_submodule(BLOCK)


def test_hook_tables_follow_the_norm_type():
    pix = hook_points(tiny_pixart().transformer_blocks[0])
    assert pix.read["CA_in"] == ("attn2", "pre") and pix.read["FFN_in"] == ("norm2", "pre")
    assert pix.rebuilt[("FFN_in", "FFN_in")] == (("attn2", "post"), ("attn2", "pre"))
    assert pix.gate == ("", "pre")
    dit = hook_points(tiny_dit().transformer_blocks[0])
    assert dit.read["CA_in"] == dit.read["FFN_in"] == ("norm3", "pre")
    assert {"CA_c", "CA_out"}.isdisjoint(dit.read) and {"CA_c", "FFN_in"}.isdisjoint(dit.write)
    assert dit.gate == ("norm1", "post") and ("FFN_in", "FFN_in") not in dit.rebuilt


@pytest.mark.parametrize("pair", TRANSFORMER_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_pixart_zero_adapters_change_nothing(pair):
    model, inputs = tiny_pixart(), pixart_inputs()
    bare = run(model, inputs)
    adapters = attach_adapters(model, AdapterConfig(*pair, rank=4))
    assert len(adapters.block_names) == 2
    assert torch.equal(run(model, inputs), bare)


@pytest.mark.parametrize("pair", TRANSFORMER_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
@torch.no_grad()
def test_pixart_block_matches_the_written_out_forward(pair):
    inp, out = pair
    model = tiny_pixart()
    adapters, adapter, block = _attach_one(model, inp, out, activation="silu", scale=2.0)
    perturb(adapters, std=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, DIM, generator=g)
    ctx = torch.randn(2, 5, DIM, generator=g)
    t = torch.randn(2, 6 * DIM, generator=g)
    hooked = block(x, encoder_hidden_states=ctx, timestep=t)
    # diffusers' gradient-checkpointing path passes every argument positionally.
    positional = block(x, None, ctx, None, t, None, None)
    adapters.enabled = False
    plain = block(x, encoder_hidden_states=ctx, timestep=t)
    reference = _reference_pixart_block(block, adapter, inp, out, x, ctx, t)
    torch.testing.assert_close(positional, hooked, rtol=0, atol=0)
    assert (plain - reference).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-5)


def test_pixart_rebuilt_h1_uses_the_gate():
    """CA_in -> CA_in reads h1 = h0 + gate_msa * a1 exactly: a capture at attn2 sees it."""
    model = tiny_pixart()
    seen = {}
    block = model.get_submodule(BLOCK)
    block.attn2.register_forward_pre_hook(lambda _m, a: seen.setdefault("h1", a[0].clone()))
    run(model, pixart_inputs())
    adapters, adapter, _ = _attach_one(model, "CA_in", "CA_in")
    read = {}
    adapter.register_forward_pre_hook(lambda _m, a: read.setdefault("x", a[0].clone()))
    run(model, pixart_inputs())
    assert torch.equal(read["x"], seen["h1"])


def test_pixart_adapters_train_and_the_base_stays():
    model = tiny_pixart()
    adapters = attach_adapters(model, AdapterConfig("CA_out", "FFN_in", rank=4))
    perturb(adapters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = freeze_unet_except_adapters(model, adapters)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(**pixart_inputs()).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is None for p in model.parameters())
    snapshot = [p.detach().clone() for p in adapters.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(snapshot, adapters.parameters(), strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pixart_refuses_resblock_positions():
    with pytest.raises(UserError, match="PixArtTransformer2DModel has none") as e:
        attach_adapters(tiny_pixart(), AdapterConfig("Res_in", "Res_out"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("pair", TRANSFORMER_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_dit_takes_exactly_the_pairs_missing_parts_allows(pair):
    inp, out = pair
    model, inputs = tiny_dit(), dit_inputs()
    reason = missing_parts(inp, out, False, False, denoiser="DiTTransformer2DModel")
    needs_cross = inp in ("CA_c", "CA_out") or out in ("CA_c", "FFN_in")
    assert (reason is not None) == needs_cross
    if reason is not None:
        with pytest.raises(UserError) as e:
            attach_adapters(model, AdapterConfig(inp, out, rank=4))
        assert str(e.value) == reason
        return
    bare = run(model, inputs)
    adapters, adapter, block = _attach_one(model, inp, out)
    assert torch.equal(run(model, inputs), bare)
    perturb(adapters, std=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, DIM, generator=g)
    t, labels = inputs["timestep"], inputs["class_labels"]
    with torch.no_grad():
        hooked = block(x, timestep=t, class_labels=labels)
        adapters.enabled = False
        reference = _reference_dit_block(block, adapter, inp, out, x, t, labels)
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-5)


def test_dit_sa_in_to_trans_out_changes_the_output():
    model, inputs = tiny_dit(), dit_inputs()
    bare = run(model, inputs)
    adapters = attach_adapters(model, AdapterConfig("SA_in", "Trans_out", rank=4))
    assert torch.equal(run(model, inputs), bare)
    perturb(adapters)
    assert (run(model, inputs) - bare).abs().max() > 1e-3
    adapters.remove()
    assert torch.equal(run(model, inputs), bare)


def test_dit_refuses_cross_attention_positions_in_one_line():
    with pytest.raises(UserError) as e:
        attach_adapters(tiny_dit(), AdapterConfig("CA_out", "FFN_in"))
    msg = str(e.value)
    assert "\n" not in msg
    for words in ("input CA_out", "output FFN_in", "no cross-attention", "SA_in", "Trans_out"):
        assert words in msg
    # The same reason without any model, e.g. for a config check before weights load.
    early = missing_parts("CA_out", "FFN_in", has_cross_attention=False, has_resblocks=False)
    assert "no cross-attention" in early and "input CA_out" in early and "\n" not in early
    assert "output CA_out (= FFN_in)" in missing_parts("SA_in", "CA_out", False, False)
    assert "ResBlocks" in missing_parts("Res_in", "Res_out", True, False)
    assert missing_parts("CA_out", "FFN_in", True, True) is None
    assert missing_parts("SA_in", "Trans_out", False, False) is None
    assert "before input" in missing_parts("Trans_out", "SA_in", True, True)


def test_pixart_save_load_round_trip(tmp_path):
    model, inputs = tiny_pixart(), pixart_inputs()
    adapters = attach_adapters(model, AdapterConfig("CA_out", "FFN_in", rank=4))
    perturb(adapters)
    expected = run(model, inputs)
    save_adapters(adapters, tmp_path / "export")
    fresh = tiny_pixart()
    assert not torch.equal(run(fresh, inputs), expected)
    # A pipeline-like object: its .transformer is the denoiser.
    loaded = load_adapters(SimpleNamespace(transformer=fresh), tmp_path / "export")
    assert loaded.block_names == adapters.block_names
    assert torch.equal(run(fresh, inputs), expected)
    with pytest.raises(UserError, match="no cross-attention"):
        load_adapters(tiny_dit(), tmp_path / "export")
