"""Noise-prediction difference maps on a tiny Stable Diffusion built from config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from t2ilab.analysis.noise_diff import (
    difference_figure,
    main,
    noise_difference_maps,
    save_difference_figure,
)
from t2ilab.cli import png_is_ours
from t2ilab.data.images import ImageTransform
from t2ilab.errors import UserError
from t2ilab.models.clip_tokenizer import build_clip_tokenizer
from t2ilab.models.pipelines import build_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
A, B = "a photo of sks dog", "a photo of dog"
TIMESTEPS = (200, 500, 800)
RES = 16  # sample_size 8 x VAE downsampling 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=49407,
        )
    ).eval()
    tokenizer = build_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDPMScheduler(),
    }


def _images() -> list[Image.Image]:
    first = Image.new("RGB", (24, 20), (200, 40, 40))
    first.paste((20, 20, 220), (6, 4, 16, 14))
    second = Image.new("RGB", (20, 20), (30, 160, 60))
    second.paste((250, 250, 250), (0, 0, 10, 20))
    return [first, second]


def _maps(tiny, prompt_a=A, prompt_b=B, **kwargs) -> torch.Tensor:
    return noise_difference_maps(
        **tiny, images=_images(), prompt_a=prompt_a, prompt_b=prompt_b, **kwargs
    )


def test_same_prompt_gives_zero_maps(tiny):
    maps = _maps(tiny, A, A)
    assert maps.shape == (2, 3, RES, RES)
    assert torch.count_nonzero(maps) == 0


def test_different_prompts_give_nonzero_maps_of_the_right_shape(tiny):
    maps = _maps(tiny)
    assert maps.shape == (2, len(TIMESTEPS), RES, RES) and maps.dtype == torch.float32
    assert (maps >= 0).all()
    assert (maps.flatten(2).amax(-1) > 0).all()  # every image, every timestep
    assert _maps(tiny, timesteps=(10,), resolution=32).shape == (2, 1, 32, 32)


def test_fixed_noise_is_reproducible_and_seeded(tiny):
    assert torch.equal(_maps(tiny, seed=3), _maps(tiny, seed=3))
    assert not torch.equal(_maps(tiny, seed=3), _maps(tiny, seed=4))


def test_maps_equal_a_recomputation_by_hand(tiny):
    maps = _maps(tiny, seed=5)
    i, j = 1, 1  # second image, t = 500
    unet, vae, text_encoder, tokenizer = (
        tiny[k] for k in ("unet", "vae", "text_encoder", "tokenizer")
    )
    with torch.no_grad():
        pixels = ImageTransform(RES)(_images()[i])[None]
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5 + i))
        t = torch.tensor([TIMESTEPS[j]])
        noisy = DDPMScheduler().add_noise(latents, noise, t)

        def embed(prompt):
            ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
            return text_encoder(ids.input_ids)[0]

        eps_a = unet(noisy, t, encoder_hidden_states=embed(A)).sample
        eps_b = unet(noisy, t, encoder_hidden_states=embed(B)).sample
        expected = (eps_a - eps_b).abs().mean(dim=1, keepdim=True)
        expected = F.interpolate(expected, size=(RES, RES), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps[i, j], expected[0, 0], rtol=1e-5, atol=1e-6)


def test_v_prediction_output_is_converted_to_epsilon(tiny):
    # eps = alpha_t * v + sigma_t * x_t, so eps_A - eps_B = alpha_t * (v_A - v_B): the same
    # network read as a v-predictor gives the epsilon maps scaled by alpha_t = sqrt(alpha_bar_t).
    eps_maps = _maps(tiny)
    v_tiny = {**tiny, "scheduler": DDPMScheduler(prediction_type="v_prediction")}
    v_maps = _maps(v_tiny)
    alpha = DDPMScheduler().alphas_cumprod[list(TIMESTEPS)].sqrt()
    torch.testing.assert_close(v_maps, eps_maps * alpha.view(1, -1, 1, 1), rtol=1e-4, atol=1e-6)


def test_bad_timesteps_and_no_images(tiny):
    with pytest.raises(UserError, match="timestep 1000 is outside the model's 0..999"):
        _maps(tiny, timesteps=(200, 1000))
    with pytest.raises(UserError, match="no images"):
        noise_difference_maps(**tiny, images=[], prompt_a=A, prompt_b=B)


def test_figure_reads_without_the_terminal(tiny, tmp_path):
    """One row per image, a column per timestep titled with t and its mean, one colour scale
    from 0 to the largest difference, a labelled colourbar, the prompts in the title."""
    maps = _maps(tiny)
    figure = difference_figure(maps, _images(), TIMESTEPS, (A, B))
    figure.canvas.draw()
    *cells, colourbar = figure.axes
    assert len(cells) == 2 * (len(TIMESTEPS) + 1)
    titles = [ax.get_title() for ax in cells[: len(TIMESTEPS) + 1]]
    assert titles[0] == "image"
    for title, t, j in zip(titles[1:], TIMESTEPS, range(len(TIMESTEPS)), strict=True):
        assert title == f"t={t}\nmean {float(maps[:, j].mean()):.3g}"
    map_images = [ax.images[0] for k, ax in enumerate(cells) if k % (len(TIMESTEPS) + 1)]
    assert len(map_images) == 2 * len(TIMESTEPS)
    assert all(im.get_clim() == (0.0, pytest.approx(float(maps.max()))) for im in map_images)
    assert "|eps_A - eps_B|" in colourbar.get_ylabel()
    assert colourbar.yaxis.get_offset_text().get_text() == ""
    assert A in figure.get_suptitle() and B in figure.get_suptitle()

    path = save_difference_figure(maps, _images(), tmp_path / "sub" / "maps.png", TIMESTEPS)
    assert path == tmp_path / "sub" / "maps.png" and png_is_ours(path)
    zero = difference_figure(torch.zeros_like(maps), _images(), TIMESTEPS)
    assert zero.axes[1].images[0].get_clim() == (0.0, 1.0)  # an all-zero figure stays black
    with pytest.raises(ValueError, match="N = len"):
        difference_figure(maps, _images()[:1], TIMESTEPS)


# --- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # steps_offset / clip_sample as in SD's own configs: the pipeline warns otherwise.
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    pipe = build_sd_pipeline(
        tiny["unet"], tiny["vae"], tiny["text_encoder"], tiny["tokenizer"], scheduler
    )
    pipe.save_pretrained(root / "pipeline")
    (root / "images").mkdir()
    for k, image in enumerate(_images()):
        image.save(root / "images" / f"{k}.png")
    return root


def test_cli_writes_the_grid(saved, tmp_path, capsys):
    out = tmp_path / "maps.png"
    args = ["--pipeline", str(saved / "pipeline"), "--images", str(saved / "images")]
    args += ["--prompt-a", A, "--prompt-b", B, "--timesteps", "100", "900", "--out", str(out)]
    assert main(args) == 0
    assert png_is_ours(out)
    assert "2 images x 2 timesteps" in capsys.readouterr().out
    assert main(args) == 0  # a rerun replaces its own figure


def test_cli_logs_the_grid_to_wandb_offline(saved, tmp_path, monkeypatch):
    from wandb_history import history_keys

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "maps.png"
    args = ["--pipeline", str(saved / "pipeline"), "--images", str(saved / "images")]
    args += ["--prompt-a", A, "--prompt-b", B, "--timesteps", "500", "--out", str(out)]
    assert main([*args, "--wandb-log"]) == 0
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    keys = history_keys(run, expect="noise_diff/mean_t500")
    assert "noise_diff/mean_t500" in keys
    assert any(k.startswith("noise_diff/grid") for k in keys)  # the image


def test_cli_errors_are_one_line_exit_2(saved, tmp_path, capsys):
    common = ["--prompt-a", A, "--prompt-b", B, "--out", str(tmp_path / "x.png")]
    missing = ["--pipeline", str(tmp_path / "nope"), "--images", str(saved / "images")]
    assert main([*missing, *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pipeline" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    empty = ["--pipeline", str(saved / "pipeline"), "--images", str(tmp_path / "empty")]
    assert main([*empty, *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no images" in err
    bad_t = ["--pipeline", str(saved / "pipeline"), "--images", str(saved / "images")]
    assert main([*bad_t, *common, "--timesteps", "5000"]) == 2
    assert "outside the model's" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_as_a_module_missing_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "t2ilab.analysis.noise_diff", "--pipeline", str(tmp_path / "nope")]
        + ["--images", str(tmp_path), "--prompt-a", A, "--prompt-b", B],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("t2ilab: error: --pipeline")
