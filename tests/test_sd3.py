"""SD3 / SD3.5 on the axes: the condition is what StableDiffusion3Pipeline encodes, rectified-flow
training lowers the loss, and model=sd35_large / sd35_medium load folders with the real configs
(reduced width, random weights), train two steps and export a folder that stock diffusers
loads. The DreamBooth and LoRA cells of the composition matrix cover tiny_sd3 end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import (  # compose_cfg sets T2ILAB_ROOT
    CONF,
    FOLDER_RUN,
    assert_only_transformer_trained,
    compose_cfg,
)
from diffusers import StableDiffusion3Pipeline
from omegaconf import OmegaConf
from real_shapes_sd3 import write_sd3_folder

import t2ilab.train as train_module
from t2ilab.data.dreambooth import tokenize
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler
from t2ilab.modules.dreambooth import DreamBoothModule


@pytest.fixture(scope="module")
def tiny_sd3():
    return load_components(OmegaConf.load(CONF / "model" / "tiny_sd3.yaml"))


def batch_of(backbone, prompts: list[str], with_text: bool = True) -> dict:
    ids = torch.stack([tokenize(backbone.tokenizer, p) for p in prompts])
    return {"input_ids": ids, **({"prompt": prompts} if with_text else {})}


def pipeline_encoding(backbone, prompts: list[str]):
    pipe = backbone.pipeline(make_sampler(None, backbone.scheduler_config))
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts,
        prompts,
        prompts,
        do_classifier_free_guidance=False,
        max_sequence_length=backbone.tokenizer_3.model_max_length,
    )
    return embeds, pooled


def test_the_condition_is_what_the_pipeline_encodes(tiny_sd3):
    # Case and punctuation reach T5 as the data wrote them (T5's vocabulary is case-sensitive).
    prompts = ["A Photo of SKS dog, on the beach.", ""]
    with torch.no_grad():
        condition = tiny_sd3.encode_condition(batch_of(tiny_sd3, prompts))
        embeds, pooled = pipeline_encoding(tiny_sd3, prompts)
    assert torch.equal(condition["embeds"], embeds)
    assert torch.equal(condition["pooled"], pooled)
    # 77 CLIP positions, then the T5 tokens trained with (model.max_length).
    assert condition["embeds"].shape == (2, 77 + tiny_sd3.tokenizer_3.model_max_length, 32)


def test_a_batch_without_text_reads_it_back_from_the_clip_ids(tiny_sd3):
    prompts = ["a sks dog on the beach"]  # lowercase, no punctuation: CLIP keeps it all
    with torch.no_grad():
        condition = tiny_sd3.encode_condition(batch_of(tiny_sd3, prompts, with_text=False))
        embeds, _ = pipeline_encoding(tiny_sd3, prompts)
    assert torch.equal(condition["embeds"], embeds)


STEPS = 30


def test_rectified_flow_training_lowers_the_loss(tiny_sd3):
    module = DreamBoothModule(
        copy.deepcopy(tiny_sd3),
        noise={},
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    assert module.objective.name == "flow" and module.objective.config["shift"] == 3.0
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    pixels = torch.stack([torch.stack([xx, yy, xx * yy])] * 4)
    with torch.no_grad():  # the frozen encoders' outputs once, as the feature caches hand them
        posterior = module.vae.encode(pixels).latent_dist
        condition = module.encode_condition(batch_of(tiny_sd3, ["a smooth ramp"] * 4))
    # The posterior's mean alone (std 0): a random VAE's posterior is wide, and its noise
    # would swamp what the few steps can learn.
    mean = posterior.mean
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean), "condition": condition}

    def fixed_loss() -> float:  # at fixed noise and noise levels, comparable across steps
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            latents = (
                posterior.mean - module.vae.config.shift_factor
            ) * module.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.tensor([200.0, 400.0, 600.0, 800.0])
            noisy = module.objective.noised(latents, noise, timesteps)
            target = module.objective.target(latents, noise, timesteps)
            prediction = module.predict(noisy, timesteps, condition)
            return torch.nn.functional.mse_loss(prediction, target).item()

    before = fixed_loss()
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(STEPS):
        loss, _ = module.diffusion_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    assert fixed_loss() < 0.5 * before  # 1.57 -> 0.53 here


@pytest.mark.parametrize("size", ["large", "medium"])
def test_sd35_loads_a_folder_with_the_real_configs_and_trains(size, tmp_path):
    folder = write_sd3_folder(tmp_path / f"sd35_{size}", size)
    cfg = compose_cfg(
        [f"model=sd35_{size}", f"model.pretrained={folder}", *FOLDER_RUN],
        tmp_path / "run",
    )
    result = train_module.train(cfg)
    assert result["steps"] == 2
    assert result["resolved"]["noise.objective"] == "flow"
    export = StableDiffusion3Pipeline.from_pretrained(train_module.export_dir(cfg))
    base = StableDiffusion3Pipeline.from_pretrained(folder)
    assert export.scheduler.config.shift == 3.0
    assert_only_transformer_trained(
        export, base, ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    )
