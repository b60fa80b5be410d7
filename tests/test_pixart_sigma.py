"""PixArt-Sigma: the tiny model samples and exports as a PixArtSigmaPipeline, a folder with the
real 1024-MS structure (reduced widths) loads and runs, and a PixArt-alpha stage-2 export
initialises a Sigma stage."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from _support import ROOT
from diffusers import DiffusionPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from omegaconf import OmegaConf
from real_shapes_pixart import (
    REDUCTIONS,
    SIGMA_512_TRANSFORMER,
    SIGMA_1024,
    reduced,
    write_sigma_folder,
)

from t2ilab.models.pipelines import make_sampler, pipeline_call_kwargs
from t2ilab.models.pixart_dit import load_pixart_components

MODELS = ROOT / "conf" / "model"


def model_cfg(name: str):
    return OmegaConf.load(MODELS / f"{name}.yaml")


def test_sigma_model_configs():
    for name, resolution in (("pixart_sigma_512", 512), ("pixart_sigma_1024", 1024)):
        cfg = model_cfg(name)
        assert (cfg.name, cfg.family, cfg.version) == (name, "pixart", "sigma")
        assert (cfg.resolution, cfg.patch_size, cfg.max_length) == (resolution, 2, 300)
        assert cfg.pretrained == f"PixArt-alpha/PixArt-Sigma-XL-2-{resolution}-MS"
    tiny, alpha = model_cfg("tiny_pixart_sigma"), model_cfg("tiny_pixart")
    widths = ("num_attention_heads", "attention_head_dim", "num_layers", "cross_attention_dim")
    assert all(tiny.tiny.transformer[k] == alpha.tiny.transformer[k] for k in widths)
    assert tiny.tiny.transformer.interpolation_scale == tiny.tiny.transformer.sample_size / 64
    assert (ROOT / "conf" / "scale" / "tiny_pixart_sigma.yaml").is_file()


def test_tiny_sigma_samples_saves_and_reloads(tmp_path):
    backbone = load_pixart_components(model_cfg("tiny_pixart_sigma"))
    assert backbone.sigma and backbone.vae.config.scaling_factor == 0.13025
    ids = backbone.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 300)
    pipe = backbone.pipeline(make_sampler("DDIMScheduler", backbone.scheduler_config))
    assert type(pipe) is PixArtSigmaPipeline
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **pipeline_call_kwargs(pipe),
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    pipe.save_pretrained(tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    again = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(again) is PixArtSigmaPipeline
    assert again.tokenizer.model_max_length == 300


@pytest.fixture(scope="module")
def sigma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sigma") / "PixArt-Sigma-XL-2-1024-MS"
    return folder, write_sigma_folder(folder)


def test_reduced_configs_keep_every_real_key():
    small = reduced()
    for part, config in SIGMA_1024.items():
        assert set(small[part]) == set(config)
    changed = {
        k
        for k in SIGMA_1024["transformer"]
        if small["transformer"][k] != SIGMA_1024["transformer"][k]
    }
    assert changed == {
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "cross_attention_dim",
        "caption_channels",
    }


def test_real_shaped_sigma_folder_loads_and_runs(sigma_folder):
    folder, configs = sigma_folder
    backbone = load_pixart_components(
        {
            "name": "pixart_sigma_1024",
            "family": "pixart",
            "version": "sigma",
            "pretrained": str(folder),
            "resolution": 1024,
            "patch_size": 2,
            "max_length": 300,
        }
    )
    loaded = backbone.transformer.config
    assert {k: loaded[k] for k in configs["transformer"]} == configs["transformer"]
    assert type(backbone.transformer) is PixArtTransformer2DModel
    assert backbone.vae.config.scaling_factor == 0.13025
    assert list(backbone.vae.config.block_out_channels) == [8, 16, 16, 16]  # 8x latents
    assert backbone.text_encoder.config.feed_forward_proj == "gated-gelu"
    assert backbone.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    assert backbone.tokenizer.model_max_length == 300
    pipe = backbone.pipeline(make_sampler("DDIMScheduler", backbone.scheduler_config))
    assert type(pipe) is PixArtSigmaPipeline

    ids = backbone.tokenizer(
        ["a red circle", ""], padding="max_length", max_length=300, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        condition = backbone.encode_condition({"input_ids": ids}, text_grad=False)
        assert condition["embeds"].shape == (2, 300, configs["text_encoder"]["d_model"])
        assert condition["mask"].sum(1).tolist() == [4, 1]  # 3 words + </s>; empty: 1
        noisy = torch.randn(2, 4, 16, 16)
        pred = backbone.predict(noisy, torch.tensor([10, 900]), condition)
    assert pred.shape == noisy.shape and torch.isfinite(pred).all()


def test_the_512_assembly_command_in_the_config_makes_a_loadable_folder(
    sigma_folder, tmp_path, monkeypatch
):
    """conf/model/pixart_sigma_512.yaml's command, run over local stand-ins for the two repos:
    the transformer-only 512 repo and pixart_sigma_sdxlvae_T5_diffusers."""
    rest = tmp_path / "sdxlvae_T5"
    shutil.copytree(sigma_folder[0], rest)
    shutil.rmtree(rest / "transformer")
    small_512 = dict(SIGMA_512_TRANSFORMER, **REDUCTIONS["transformer"])
    PixArtTransformer2DModel(**small_512).save_pretrained(tmp_path / "512" / "transformer")
    lines = [line[4:] for line in (MODELS / "pixart_sigma_512.yaml").read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -c"))
    command = ""
    for line in lines[start:]:
        command += line.removesuffix("\\")
        if not line.endswith("\\"):
            break
    python, flag, code = shlex.split(command)  # as the shell splits it
    assert (python, flag) == ("python", "-c")
    monkeypatch.chdir(tmp_path)
    exec(
        code.replace("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", str(tmp_path / "512")).replace(
            "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", str(rest)
        ),
        {},
    )
    cfg = dict(model_cfg("pixart_sigma_512"), pretrained=str(tmp_path / "pixart_sigma_512"))
    backbone = load_pixart_components(cfg)
    loaded = backbone.transformer.config
    assert {k: loaded[k] for k in small_512} == small_512
    assert backbone.sigma and backbone.tokenizer.model_max_length == 300


def test_stage2_alpha_export_initialises_a_sigma_stage3(tmp_path):
    from t2ilab.models.stages import init_from_previous_stage

    stage2 = model_cfg("tiny_pixart")
    stage2.tiny.seed = 1  # weights unlike the new Sigma model's (same widths, seed 0)
    alpha = load_pixart_components(stage2)
    export = tmp_path / "stage2" / "export"
    alpha.save_pipeline(export, make_sampler("DDIMScheduler", alpha.scheduler_config))
    sigma = load_pixart_components(model_cfg("tiny_pixart_sigma"))
    before = {k: v.clone() for k, v in sigma.transformer.state_dict().items()}
    cfg = OmegaConf.create({"model": {"init_from": str(tmp_path / "stage2"), "resolution": 128}})
    init_from_previous_stage(cfg, sigma)

    source = alpha.transformer.state_dict()
    loaded = sigma.transformer.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    assert any(not torch.equal(loaded[k], before[k]) for k in before)
    # 128 px over the 2x tiny VAE: 64 latents; stage 2 computed positions at scale 1 on 32.
    assert sigma.transformer.config.sample_size == 64
    assert sigma.transformer.config.interpolation_scale == 2
    pipe = sigma.pipeline(make_sampler("DDIMScheduler", sigma.scheduler_config))
    assert type(pipe) is PixArtSigmaPipeline
    out = pipe(
        "a red circle", num_inference_steps=1, output_type="np", **pipeline_call_kwargs(pipe)
    )
    assert out.images.shape == (1, 128, 128, 3)  # the export renders at the new size by default
