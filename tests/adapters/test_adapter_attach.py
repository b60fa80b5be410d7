"""Attaching adapters by hooks: identity at init, training touches only adapters, remove()."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from adapter_testlib import (
    RESBLOCK,
    TRANSFORMER_BLOCK,
    perturb,
    run,
    tiny_unet,
    unet_inputs,
)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from t2ilab.adapters import (
    AdapterConfig,
    AdapterSet,
    attach_adapters,
    block_key,
    count_adapter_parameters,
    freeze_unet_except_adapters,
    valid_pairs,
)
from t2ilab.errors import UserError

PAIRS = valid_pairs()


def _ids(pair):
    return f"{pair[0]}->{pair[1]}"


@pytest.fixture(scope="module")
def shared_unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs()


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_every_valid_pair_trains_only_adapters(pair):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    # Identity activation: with ReLU a rank-4 adapter can be dead on every token (its up
    # projection then gets no gradient), which depends on the random init, not on the hooks.
    torch.manual_seed(0)
    adapters = attach_adapters(unet, AdapterConfig(*pair, rank=4, activation="identity"))
    params = freeze_unet_except_adapters(unet, adapters)
    assert {id(p) for p in params} == {id(p) for p in adapters.parameters()}
    assert all(p.requires_grad for p in adapters.parameters())
    assert not any(p.requires_grad for p in unet.parameters())
    adapter_before = {k: v.clone() for k, v in adapters.state_dict().items()}

    sample, timesteps, context = unet_inputs()
    base = run(unet, (sample, timesteps, context))
    unet.train()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    loss = torch.nn.functional.mse_loss(
        unet(sample, timesteps, context).sample, torch.zeros_like(base)
    )
    loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in unet.parameters())
    for key, value in unet.state_dict().items():
        assert torch.equal(value, before[key]), key  # the UNet is bitwise untouched
    # Every block's up projection got a gradient and moved (the down projection only gets one once
    # the up projection is non-zero).
    for name, adapter in adapters.adapters.items():
        assert adapter.up.weight.grad.abs().sum() > 0, name
        assert not torch.equal(adapter.up.weight, adapter_before[f"adapters.{name}.up.weight"]), (
            name
        )
    unet.eval()
    assert not torch.allclose(run(unet, (sample, timesteps, context)), base)


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_zero_init_is_identity_and_a_perturbation_is_not(shared_unet, inputs, pair):
    base = run(shared_unet, inputs)
    adapters = attach_adapters(shared_unet, AdapterConfig(*pair, rank=4))
    try:
        assert torch.equal(run(shared_unet, inputs), base)
        for adapter in adapters.adapters.values():
            assert (
                torch.count_nonzero(adapter.up.weight) == 0
                and torch.count_nonzero(adapter.up.bias) == 0
            )
        perturb(adapters)
        assert not torch.allclose(run(shared_unet, inputs), base, atol=1e-4)
        adapters.enabled = False
        assert torch.equal(run(shared_unet, inputs), base)
        adapters.enabled = True
    finally:
        adapters.remove()
    assert not adapters.attached
    assert torch.equal(run(shared_unet, inputs), base)  # remove() restores the original outputs
    assert not shared_unet._forward_hooks and not shared_unet._forward_pre_hooks
    for module in shared_unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_one_adapter_per_block_keyed_by_sanitised_name(shared_unet):
    adapters = attach_adapters(shared_unet, AdapterConfig(rank=4))
    res = attach_adapters(shared_unet, AdapterConfig("Res_in", "Res_out", rank=2))
    try:
        blocks = [n for n, m in shared_unet.named_modules() if isinstance(m, BasicTransformerBlock)]
        resnets = [n for n, m in shared_unet.named_modules() if isinstance(m, ResnetBlock2D)]
        assert adapters.block_names == blocks and len(blocks) == 4
        assert res.block_names == resnets and len(resnets) == 8
        assert list(adapters.adapters) == [block_key(n) for n in blocks]
        assert block_key(TRANSFORMER_BLOCK) == "down_blocks_1_attentions_0_transformer_blocks_0"
        assert isinstance(adapters, torch.nn.Module) and isinstance(adapters, AdapterSet)
        # Not registered inside the UNet: its state_dict stays the base model's.
        assert not any("adapter" in k for k in shared_unet.state_dict())
    finally:
        adapters.remove()
        res.remove()


def test_block_filter_selects_blocks(shared_unet, inputs):
    up = attach_adapters(shared_unet, AdapterConfig(rank=4, block_filter=r"^up_blocks"))
    try:
        assert up.block_names == [
            "up_blocks.0.attentions.0.transformer_blocks.0",
            "up_blocks.0.attentions.1.transformer_blocks.0",
        ]
    finally:
        up.remove()
    with pytest.raises(UserError, match="matches none"):
        attach_adapters(shared_unet, AdapterConfig(rank=4, block_filter="^nothing"))
    assert torch.equal(run(shared_unet, inputs), run(tiny_unet(), inputs))


def test_count_adapter_parameters(shared_unet):
    unet_params = sum(p.numel() for p in shared_unet.parameters())
    assert count_adapter_parameters(shared_unet) == (0, 0.0)
    a = attach_adapters(shared_unet, AdapterConfig("CA_out", "FFN_in", rank=4))
    b = attach_adapters(shared_unet, AdapterConfig("CA_c", "FFN_in", rank=3))
    c = attach_adapters(shared_unet, AdapterConfig("Res_in", "Res_out", rank=2))
    try:
        # The UNet's own count is unchanged by attaching.
        assert sum(p.numel() for p in shared_unet.parameters()) == unet_params
        n_a = sum(p.numel() for p in a.parameters())
        # 4 blocks of width 64: Linear(64, 4) + Linear(4, 64).
        assert n_a == a.num_parameters() == 4 * (64 * 4 + 4 + 4 * 64 + 64)
        # Context width 32 -> 3 -> 64.
        assert b.num_parameters() == 4 * (32 * 3 + 3 + 3 * 64 + 64)
        n_all = sum(s.num_parameters() for s in (a, b, c))
        assert count_adapter_parameters(shared_unet, a) == (n_a, n_a / unet_params)
        assert count_adapter_parameters(shared_unet) == (n_all, n_all / unet_params)
        assert count_adapter_parameters(shared_unet, [a, b])[0] == n_a + b.num_parameters()
    finally:
        for s in (a, b, c):
            s.remove()
    assert count_adapter_parameters(shared_unet) == (0, 0.0)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "silu", "identity"])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0])
def test_activation_and_scale(activation, scale):
    cfg = AdapterConfig("CA_out", "FFN_in", rank=4, activation=activation, scale=scale)
    unet = tiny_unet()
    adapters = attach_adapters(unet, cfg)
    perturb(adapters)
    adapter = adapters.adapters[block_key(TRANSFORMER_BLOCK)]
    expected_act = {
        "relu": torch.nn.ReLU,
        "sigmoid": torch.nn.Sigmoid,
        "silu": torch.nn.SiLU,
        "identity": torch.nn.Identity,
    }[activation]
    assert isinstance(adapter.act, expected_act) and adapter.scale == scale
    x = torch.randn(2, 7, 64)
    act = {"relu": torch.relu, "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu}.get(
        activation, lambda t: t
    )
    by_hand = scale * (
        act(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    )
    torch.testing.assert_close(adapter(x), by_hand)


def test_scale_scales_the_effect():
    """Same adapter weights, scale 2 vs 1: the block's change doubles."""
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, 64, generator=g), torch.randn(2, 5, 32, generator=g)
    effects = []
    for scale in (1.0, 2.0):
        unet = tiny_unet()
        adapters = attach_adapters(
            unet, AdapterConfig("Trans_out", "Trans_out", rank=4, scale=scale)
        )
        perturb(adapters)
        block = unet.get_submodule(TRANSFORMER_BLOCK)
        with torch.no_grad():
            on = block(x, encoder_hidden_states=context)
            adapters.enabled = False
            off = block(x, encoder_hidden_states=context)
        effects.append(on - off)
    assert effects[0].abs().max() > 1e-3
    torch.testing.assert_close(effects[1], 2 * effects[0])


def test_classifier_free_guidance_batch(shared_unet):
    """A 2B batch (unconditional + conditional contexts) runs, and each half is what it is alone."""
    adapters = attach_adapters(shared_unet, AdapterConfig("CA_c", "FFN_in", rank=4))
    try:
        perturb(adapters)
        sample, timesteps, context = unet_inputs(batch=2, tokens=6)
        uncond = torch.zeros_like(context)
        both = run(
            shared_unet,
            (torch.cat([sample] * 2), torch.cat([timesteps] * 2), torch.cat([uncond, context])),
        )
        torch.testing.assert_close(both[2:], run(shared_unet, (sample, timesteps, context)))
        torch.testing.assert_close(both[:2], run(shared_unet, (sample, timesteps, uncond)))
    finally:
        adapters.remove()


def test_float32_adapters_in_a_lower_precision_unet(inputs):
    unet = tiny_unet().to(torch.bfloat16)
    adapters = attach_adapters(unet, AdapterConfig("CA_out", "FFN_in", rank=4))
    perturb(adapters)
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    sample, timesteps, context = inputs
    out = run(unet, (sample.bfloat16(), timesteps, context.bfloat16()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_pipeline_like_object_and_gradient_checkpointing(inputs):
    """attach takes `.unet` of a pipeline; with gradient checkpointing on, grads match."""
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        holder = type("Pipe", (), {"unet": unet})()
        adapters = attach_adapters(holder, AdapterConfig("CA_in", "CA_in", rank=4))
        perturb(adapters)
        freeze_unet_except_adapters(holder, adapters)
        unet.train()
        unet(*inputs).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapters.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_adapter_set_has_no_forward_and_survives_dropping_the_handle(shared_unet, inputs):
    base = run(shared_unet, inputs)
    adapters = attach_adapters(shared_unet, AdapterConfig(rank=4))
    with pytest.raises(TypeError, match="no forward"):
        adapters()
    perturb(adapters)
    changed = run(shared_unet, inputs)
    handle = adapters
    del adapters  # the hooks keep the adapters alive
    torch.testing.assert_close(run(shared_unet, inputs), changed)
    handle.remove()
    assert torch.equal(run(shared_unet, inputs), base)


def test_resblock_adapter_groups_follow_the_resblock():
    unet = tiny_unet()
    adapters = attach_adapters(unet, AdapterConfig("Res_in", "Res_out", rank=2))
    try:
        adapter = adapters.adapters[block_key(RESBLOCK)]
        res = unet.get_submodule(RESBLOCK)
        assert adapter.norm.num_groups == res.norm1.num_groups
        assert (
            adapter.down.in_channels == res.in_channels
            and adapter.up.out_channels == res.out_channels
        )
        assert adapter.down.kernel_size == (3, 3) and adapter.down.out_channels == 2
        # up_blocks.0.resnets.0 takes the skip concatenation: 128 -> 64 channels.
        up = adapters.adapters["up_blocks_0_resnets_0"]
        assert (up.down.in_channels, up.up.out_channels) == (128, 64)
    finally:
        adapters.remove()


def test_pickle_and_deepcopy_keep_adapters_attached(inputs):
    unet = tiny_unet()
    base = run(unet, inputs)
    adapters = attach_adapters(unet, AdapterConfig("FFN_out", "Trans_out", rank=4))
    perturb(adapters)
    tuned = run(unet, inputs)
    for copied in (pickle.loads(pickle.dumps(unet)), copy.deepcopy(unet)):
        assert torch.equal(run(copied, inputs), tuned)
        assert count_adapter_parameters(copied) == count_adapter_parameters(unet)
        hooks = next(iter(copied.get_submodule(TRANSFORMER_BLOCK).ff._forward_hooks.values()))
        copied_set = hooks.owner.owner
        assert copied_set is not adapters and copied_set.unet is copied
        copied_set.remove()
        assert torch.equal(run(copied, inputs), base)
        assert torch.equal(run(unet, inputs), tuned)  # the original stays attached


def test_unsupported_calls_fail_clearly(inputs):
    unet = tiny_unet()
    attach_adapters(unet, AdapterConfig("FFN_out", "Trans_out", rank=4))
    unet.get_submodule(TRANSFORMER_BLOCK).set_chunk_feed_forward(4, 1)
    with pytest.raises(RuntimeError, match="feed-forward chunking"):
        run(unet, inputs)
    other = tiny_unet()
    attach_adapters(other, AdapterConfig("CA_c", "FFN_in", rank=4))
    with pytest.raises(RuntimeError, match="CA_c was not passed"):
        other.get_submodule(TRANSFORMER_BLOCK)(torch.randn(1, 4, 64))


def test_adapters_live_on_the_unets_device_and_a_mismatch_is_a_clear_error(inputs):
    meta = attach_adapters(tiny_unet().to("meta"), AdapterConfig(rank=4))
    assert all(p.device.type == "meta" for p in meta.parameters())
    unet = tiny_unet()
    adapters = attach_adapters(unet, AdapterConfig(rank=4))
    adapters.to("meta")  # e.g. the UNet moved but the adapters did not
    with pytest.raises(RuntimeError, match="Adapter weights are on meta but the UNet runs on cpu"):
        run(unet, inputs)
