"""Saving adapters apart from the base weights and loading them into a fresh UNet / pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_testlib import perturb, run, tiny_unet, unet_inputs
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from t2ilab.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    attach_adapters,
    count_adapter_parameters,
    load_adapters,
    save_adapters,
)
from t2ilab.errors import UserError


@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig("CA_out", "FFN_in", rank=4, activation="sigmoid", scale=0.5),
        AdapterConfig("CA_c", "CA_c", rank=3, block_filter="^up_blocks"),
        AdapterConfig("CA_c", "Trans_out", rank=3),
        AdapterConfig("Res_in", "Res_out", rank=2, activation="identity", scale=4.0),
    ],
    ids=lambda c: f"{c.input_position}->{c.output_position}",
)
def test_save_then_load_into_a_fresh_unet_is_identical(tmp_path, cfg):
    inputs = unet_inputs()
    unet = tiny_unet()
    base = run(unet, inputs)
    adapters = attach_adapters(unet, cfg)
    perturb(adapters)
    tuned = run(unet, inputs)
    weights = save_adapters(adapters, tmp_path / "export")
    assert weights == tmp_path / "export" / ADAPTER_WEIGHTS_NAME

    fresh = tiny_unet()
    loaded = load_adapters(fresh, tmp_path / "export")
    assert torch.equal(run(fresh, inputs), tuned)
    assert loaded.config == cfg and loaded.block_names == adapters.block_names
    assert count_adapter_parameters(fresh) == count_adapter_parameters(unet)
    loaded.remove()
    assert torch.equal(run(fresh, inputs), base)


def test_file_layout(tmp_path):
    unet = tiny_unet()
    adapters = attach_adapters(unet, AdapterConfig(rank=4))
    perturb(adapters)
    save_adapters(adapters, tmp_path)
    state = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    assert set(state) == set(adapters.adapters.state_dict())
    assert "down_blocks_1_attentions_0_transformer_blocks_0.up.weight" in state
    assert all(v.dtype == torch.float32 for v in state.values())
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert meta["format"] == "t2ilab.adapters" and meta["version"] == 1
    assert meta["config"] == {
        "input_position": "CA_out",
        "output_position": "FFN_in",
        "rank": 4,
        "activation": "relu",
        "scale": 1.0,
        "block_filter": None,
        "targets": "transformer",
    }
    assert meta["blocks"] == adapters.block_names
    assert meta["num_parameters"] == adapters.num_parameters()
    # Only adapter tensors: the base weights are saved elsewhere (or not at all).
    assert sum(v.numel() for v in state.values()) == adapters.num_parameters()
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_file_path_and_overwrite(tmp_path):
    adapters = attach_adapters(tiny_unet(), AdapterConfig(rank=4))
    path = tmp_path / "sub" / "dog.safetensors"
    assert save_adapters(adapters, path) == path
    assert (tmp_path / "sub" / "dog.json").is_file()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapters(adapters, path)
    perturb(adapters)
    save_adapters(adapters, path, overwrite=True)
    for ref in (path, path.with_suffix(".json")):
        loaded = load_adapters(tiny_unet(), ref)
        for key, value in adapters.adapters.state_dict().items():
            assert torch.equal(loaded.adapters.state_dict()[key], value)


def test_loading_into_another_architecture_fails_clearly_and_attaches_nothing(tmp_path):
    adapters = attach_adapters(tiny_unet(), AdapterConfig(rank=4))
    save_adapters(adapters, tmp_path)
    inputs = unet_inputs()
    wider = tiny_unet(block_out_channels=(32, 96), attention_head_dim=8)
    before = run(wider, inputs)
    with pytest.raises(UserError, match="do not fit this UNet"):
        load_adapters(wider, tmp_path)
    assert count_adapter_parameters(wider) == (0, 0.0)
    assert torch.equal(run(wider, inputs), before)
    deeper = tiny_unet(layers_per_block=2)
    with pytest.raises(UserError, match="other UNet blocks"):
        load_adapters(deeper, tmp_path)
    assert count_adapter_parameters(deeper) == (0, 0.0)


def test_missing_or_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="No saved adapters"):
        load_adapters(tiny_unet(), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / ADAPTER_CONFIG_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a t2ilab adapter sidecar"):
        load_adapters(tiny_unet(), tmp_path)


def _tiny_pipeline(unet) -> StableDiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sample(pipe, context) -> torch.Tensor:
    """Two DDIM steps with classifier-free guidance (the UNet sees a 2B batch), latents out."""
    return pipe(
        prompt_embeds=context,
        negative_prompt_embeds=torch.zeros_like(context),
        guidance_scale=5.0,
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_load_into_a_pipeline_with_guidance(tmp_path):
    context = unet_inputs(batch=1)[2]
    trained = _tiny_pipeline(tiny_unet())
    plain = _sample(trained, context)
    adapters = attach_adapters(trained, AdapterConfig("CA_out", "FFN_in", rank=4))
    perturb(adapters)
    tuned = _sample(trained, context)
    assert not torch.allclose(tuned, plain, atol=1e-4)
    save_adapters(adapters, tmp_path)

    pipe = _tiny_pipeline(tiny_unet())
    assert torch.equal(_sample(pipe, context), plain)
    load_adapters(pipe, tmp_path)  # no handle kept: the hooks keep the adapters alive
    assert torch.equal(_sample(pipe, context), tuned)
