"""experiments/toy_world/dc_leak.py: the four initial noises differ only in their per-channel
spatial mean, and that mean is the one each kind says it plants."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOY_SD = ROOT / "models/toy/toy_sd"


def _dc_leak():
    spec = importlib.util.spec_from_file_location(
        "dc_leak", ROOT / "experiments/toy_world/dc_leak.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_noises_plant_the_means_they_name():
    from t2ilab.toy import quality

    dc_leak = _dc_leak()
    pipe = quality.load_scoring_pipeline(TOY_SD)
    scenes = quality.sd_color_scenes(quality.EVAL_SEED, 3)
    noises = dc_leak.initial_noises(pipe, scenes, seed=7, steps=25)

    plain = noises["plain"]
    assert torch.equal(plain, torch.randn(plain.shape, generator=torch.Generator().manual_seed(7)))
    centred = plain - plain.mean((2, 3), keepdim=True)
    # every kind is the same centred noise plus a constant per channel
    for name, noise in noises.items():
        mean = noise.mean((2, 3), keepdim=True)
        assert torch.allclose(noise - mean, centred, atol=1e-5), name
    assert noises["mean removed"].mean((2, 3)).abs().max() < 1e-5

    # the planted mean, computed here from the renders and the schedule by hand
    with torch.no_grad():
        latents = pipe.vae.encode(quality.render_batch(scenes)).latent_dist.mean
    means = (latents * pipe.vae.config.scaling_factor).mean((2, 3))
    pipe.scheduler.set_timesteps(25)
    first = int(pipe.scheduler.timesteps[0])
    alpha_bar = pipe.scheduler.alphas_cumprod[first]
    scale = (alpha_bar / (1 - alpha_bar)).sqrt()
    assert first > 900 and 0.05 < scale < 0.15  # the first DDIM step leaves a little signal
    target = noises["target mean"].mean((2, 3))
    assert torch.allclose(target, scale * means, atol=1e-5)
    # another prompt's mean: prompt i gets prompt i-1's
    assert torch.allclose(noises["another's mean"].mean((2, 3)), target.roll(1, 0), atol=1e-5)


def test_the_check_writes_one_row_per_noise(tmp_path):
    out = tmp_path / "dc_leak.json"
    _dc_leak().main([str(TOY_SD), "--n", "2", "--steps", "2", "--out", str(out)])
    table = json.loads(out.read_text())
    assert table["n"] == 2
    kinds = ["plain", "mean removed", "target mean", "another's mean"]
    assert [k for k in table if k in kinds] == kinds
    for kind in kinds:
        assert all(0.0 <= v <= 1.0 for v in table[kind].values()), table[kind]
