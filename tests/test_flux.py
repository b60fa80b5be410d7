"""Flux.1 on the axes: the condition is what FluxPipeline encodes, the denoiser call packs and
unpacks latents as the pipeline does, training uses Flux's resolution-dependent shift, and
model=flux1_dev / flux1_schnell load folders with the real configs (reduced width, random
weights), train two steps and export a folder that stock FluxPipeline loads. The matrix covers
tiny_flux's DreamBooth, LoRA and textual inversion end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import (  # compose_cfg sets T2ILAB_ROOT
    CONF,
    FOLDER_RUN,
    ROOT,
    assert_only_transformer_trained,
    compose_cfg,
)
from diffusers import FluxPipeline
from omegaconf import OmegaConf
from real_shapes_sd3 import write_flux1_folder

import t2ilab.train as train_module
from t2ilab.data.dreambooth import tokenize
from t2ilab.models.flux import pack, unpack
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler
from t2ilab.models.sd3 import single_vector_text
from t2ilab.modules.dreambooth import DreamBoothModule


@pytest.fixture(scope="module")
def tiny_flux():
    return load_components(OmegaConf.load(CONF / "model" / "tiny_flux.yaml"))


def test_the_condition_is_what_the_pipeline_encodes(tiny_flux):
    prompts = ["A Photo of SKS dog, on the beach.", ""]
    ids = torch.stack([tokenize(tiny_flux.tokenizer, p) for p in prompts])
    pipe = tiny_flux.pipeline(make_sampler(None, tiny_flux.scheduler_config))
    with torch.no_grad():
        condition = tiny_flux.encode_condition({"input_ids": ids, "prompt": prompts})
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, prompts, max_sequence_length=tiny_flux.tokenizer_2.model_max_length
        )
    assert torch.equal(condition["embeds"], embeds)
    assert torch.equal(condition["pooled"], pooled)


def test_packing_is_the_pipelines_and_round_trips():
    latents = torch.randn(2, 4, 8, 6)
    packed = pack(latents)
    assert packed.shape == (2, 4 * 3, 16)
    # Token (r, c) holds the 2x2 patch at rows 2r..2r+1, columns 2c..2c+1, channel-major.
    patch = latents[1, :, 2:4, 4:6].reshape(4, 4)  # (channel, 2x2 position)
    assert torch.equal(packed[1, 1 * 3 + 2], patch.reshape(-1))
    assert torch.equal(unpack(packed, 8, 6), latents)


def test_the_prediction_is_the_transformer_on_packed_tokens(tiny_flux):
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 750.0])
    condition = {"embeds": torch.randn(2, 5, 32), "pooled": torch.randn(2, 16)}
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(4).repeat_interleave(4)  # row of the packed grid
    ids[:, 2] = torch.arange(4).repeat(4)  # column
    with torch.no_grad():
        got = tiny_flux.predict(latents, timesteps, condition)
        by_hand = tiny_flux.transformer(
            hidden_states=pack(latents),
            timestep=timesteps / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=condition["pooled"],
            encoder_hidden_states=condition["embeds"],
            txt_ids=torch.zeros(5, 3),
            img_ids=ids,
        ).sample
    assert torch.equal(got, unpack(by_hand, 8, 8))


def test_training_shifts_t_by_the_image_size(tiny_flux):
    module = DreamBoothModule(tiny_flux, noise={})
    objective = module.objective
    assert objective.config["use_dynamic_shifting"] and objective.patch_size == 2
    # 64 px over a 2x VAE: 32x32 latents, 16x16 packed tokens = 256: Flux's base shift 0.5.
    assert objective.image_seq_len(torch.zeros(1, 4, 32, 32)) == 256


def test_multi_vector_placeholders_reach_t5_as_written(tiny_flux):
    clip = copy.deepcopy(tiny_flux.tokenizer)
    clip.add_tokens(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])
    expanded = "A <cat-toy> <cat-toy>_1 <cat-toy>_2 on a beach"
    assert single_vector_text(expanded, clip) == "A <cat-toy> on a beach"
    assert single_vector_text("a <cat-toy> here", clip) == "a <cat-toy> here"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux1_loads_a_folder_with_the_real_configs_and_trains(variant, tmp_path):
    folder = write_flux1_folder(tmp_path / f"flux1_{variant}", variant)
    cfg = compose_cfg(
        [f"model=flux1_{variant}", f"model.pretrained={folder}", *FOLDER_RUN],
        tmp_path / "run",
    )
    result = train_module.train(cfg)
    assert result["steps"] == 2
    shift = "dynamic" if variant == "dev" else 1.0
    assert result["resolved"]["noise.shift"] == shift
    export = FluxPipeline.from_pretrained(train_module.export_dir(cfg))
    base = FluxPipeline.from_pretrained(folder)
    assert export.scheduler.config.use_dynamic_shifting == (variant == "dev")
    assert_only_transformer_trained(export, base, ("vae", "text_encoder", "text_encoder_2"))


def test_toy_flux_trains_over_the_shipped_toy_parts_and_exports_a_stock_pipeline(tmp_path):
    """model=toy_flux_init: a new Flux transformer over the toy VAE, with the toy CLIP text tower
    in both text slots; the export (with shift_factor 0 added to the SD-style VAE) samples in
    stock FluxPipeline, and the shipped parts come back unchanged."""
    cfg = compose_cfg(["model=toy_flux_init", *FOLDER_RUN], tmp_path / "run")
    backbone = load_components(cfg.model)
    assert type(backbone.text_encoder_2).__name__ == "CLIPTextModel"
    assert backbone.vae.config.shift_factor == 0.0
    assert not backbone.transformer.config.guidance_embeds
    result = train_module.train(cfg)
    assert result["steps"] == 2
    export = FluxPipeline.from_pretrained(train_module.export_dir(cfg))
    shipped = backbone.text_encoder.state_dict()  # both slots load the same toy tower
    for name in ("text_encoder", "text_encoder_2"):
        for key, value in getattr(export, name).state_dict().items():
            assert torch.equal(value, shipped[key]), (name, key)
    image = export(
        "a red star",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and 0.0 <= image.min() and image.max() <= 1.0


def test_a_folder_loads_each_text_encoder_as_the_class_its_config_names(tmp_path):
    """model=toy_flux keeps toy_clip's tower in T5's slot: it loads as that CLIPTextModel with
    its trained weights, not as a T5 with fresh ones."""
    from transformers import CLIPTextModel

    cfg = compose_cfg(["model=toy_flux"], tmp_path / "run")
    backbone = load_components(cfg.model)
    tower = CLIPTextModel.from_pretrained(ROOT / "models" / "toy" / "toy_sd" / "text_encoder")
    for encoder in (backbone.text_encoder, backbone.text_encoder_2):
        assert type(encoder) is CLIPTextModel
        own, shipped = encoder.state_dict(), tower.state_dict()
        assert own.keys() == shipped.keys()
        assert all(torch.equal(own[k], shipped[k]) for k in own)
