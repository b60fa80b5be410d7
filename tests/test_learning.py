"""The shared step learns: on a fixed batch the loss goes down; the four arms export the
schedule they trained with; class images are generated reproducibly, resume, and say which
weights made them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from test_noise import expected_betas

from t2ilab.data.class_images import SOURCE_FILE, generate_class_images
from t2ilab.data.images import list_images
from t2ilab.errors import UserError
from t2ilab.models.export import export_pipeline
from t2ilab.models.fingerprint import weights_fingerprint
from t2ilab.models.loading import load_sd_components
from t2ilab.models.pipelines import build_sd_pipeline, make_sampler
from t2ilab.modules.dreambooth import DreamBoothModule
from t2ilab.noise import training_target


@pytest.fixture(scope="module")
def components():
    from _support import (
        CONF,
        compose_cfg,  # noqa: F401  (sets T2ILAB_ROOT)
    )
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.load(CONF / "model" / "tiny_sd.yaml")
    return load_sd_components(model_cfg)


@pytest.fixture(scope="module")
def class_pipe(components):
    """The frozen tiny model as class images are generated with it (DDIM)."""
    return build_sd_pipeline(
        components.unet,
        components.vae,
        components.text_encoder,
        components.tokenizer,
        make_sampler("DDIMScheduler", components.scheduler_config),
    )


def make_module(components, noise=None, lr=1e-3):
    c = copy.deepcopy(components)
    return DreamBoothModule(
        c,
        noise=noise or {},
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
    )


def smooth_images(n: int, size: int = 64) -> torch.Tensor:
    """A smooth, learnable image (x, y, xy ramps), n times."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.stack([xx, yy, xx * yy])] * n)


def fit_steps(module, batch, steps: int) -> None:
    """Plain optimisation steps of the shared diffusion loss on one fixed batch."""
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(steps):
        loss, _ = module.diffusion_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()


def fixed_eval_loss(module, batch, seed=123):
    """The loss at fixed noise and timesteps, so values are comparable across steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = module.encode_latents(batch["pixel_values"])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.linspace(50, 950, latents.shape[0]).long()
        noisy = module.noise_scheduler.add_noise(latents, noise, t)
        target = training_target(module.noise_scheduler, latents, noise, t)
        pred = module.predict(noisy, t, module.encode_condition(batch))
        return torch.nn.functional.mse_loss(pred, target).item()


@pytest.mark.parametrize(
    "noise",
    [
        {},
        {
            "beta_schedule": "sigmoid",
            "zero_terminal_snr": True,
            "prediction_type": "v_prediction",
            "snr_gamma": 5.0,
        },
    ],
)
def test_loss_goes_down_on_a_fixed_batch(components, noise):
    torch.manual_seed(0)
    module = make_module(components, noise)
    ids = module.tokenizer(
        ["a photo of sks toy"] * 4, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    batch = {"pixel_values": smooth_images(4), "input_ids": ids, "num_instance": 2}
    before = fixed_eval_loss(module, batch)
    # The frozen encoders' outputs once, as the feature cache hands them to the step: the same
    # loss, without re-encoding the fixed batch 40 times.
    with torch.no_grad():
        posterior = module.vae.encode(batch["pixel_values"]).latent_dist
        cached = {
            "latent_mean": posterior.mean,
            "latent_std": posterior.std,
            "condition": module.encode_condition(batch),
            "num_instance": 2,
        }
    fit_steps(module, cached, 40)
    after = fixed_eval_loss(module, batch)
    assert after < 0.7 * before, (before, after)


def test_only_the_unet_changes(components):
    module = make_module(components)
    frozen = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("unet.")}
    unet_before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "input_ids": torch.full((2, 77), 49407),
        "num_instance": 1,
    }
    optimizer = module.configure_optimizers()
    module.train()
    loss, parts = module.diffusion_loss(batch)
    assert set(parts) == {"instance_loss", "prior_loss"}
    loss.backward()
    optimizer.step()
    for k, v in module.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, unet_before[k]) for k, v in module.unet.state_dict().items())
    assert not module.vae.training and not module.text_encoder.training


@pytest.mark.parametrize(
    "schedule,zsnr", [(None, False), (None, True), ("sigmoid", False), ("sigmoid", True)]
)
def test_each_arm_exports_its_schedule(components, tmp_path, schedule, zsnr):
    module = make_module(components, {"beta_schedule": schedule, "zero_terminal_snr": zsnr})
    with pytest.warns(UserWarning) if zsnr else _nothing():
        export_pipeline(module, tmp_path / "export")
    loaded = DDIMScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
    expected = np.cumprod(1 - expected_betas(schedule or "scaled_linear", zsnr))
    ac = loaded.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=2e-5, atol=1e-7)
    if zsnr:
        assert ac[-1] == pytest.approx(2**-24)
    else:
        assert ac[-1] == pytest.approx(expected[-1], rel=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_export_replaces_only_atomically(components, tmp_path):
    module = make_module(components)
    export_pipeline(module, tmp_path / "export")
    (tmp_path / "export" / "marker").write_text("old")
    export_pipeline(module, tmp_path / "export")
    assert not (tmp_path / "export" / "marker").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_class_images_are_reproducible_and_resume(class_pipe, tmp_path):
    pipe = class_pipe
    kwargs = dict(num_inference_steps=2, batch_size=2, seed=5, resolution=64)
    assert generate_class_images(pipe, "a photo of toy", tmp_path / "a", 3, **kwargs) == 3
    assert generate_class_images(pipe, "a photo of toy", tmp_path / "a", 3, **kwargs) == 0
    # An interrupted run (1 of 3 made) resumes to the same three images.
    generate_class_images(pipe, "a photo of toy", tmp_path / "b", 1, **kwargs)
    generate_class_images(pipe, "a photo of toy", tmp_path / "b", 3, **kwargs)
    a, b = list_images(tmp_path / "a"), list_images(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    # Same seeds per index; batching differs (2+1 vs 1+2), so allow float rounding only.
    for pa, pb in zip(a, b, strict=True):
        diff = np.abs(np.asarray(Image.open(pa), float) - np.asarray(Image.open(pb), float))
        assert diff.max() <= 2
    first, second = (np.asarray(Image.open(p), float) for p in a[:2])
    assert np.abs(first - second).mean() > 5  # different seeds: different images


def test_weights_fingerprint_tells_weights_apart(components):
    parts = components.modules()
    same = weights_fingerprint(parts)
    assert weights_fingerprint(copy.deepcopy(parts)) == same
    # One fine-tuning step's worth of change in one weight of the UNet is a new model.
    moved = copy.deepcopy(parts)
    with torch.no_grad():
        next(moved["unet"].parameters()).view(-1)[0] += 1e-2
    assert weights_fingerprint(moved) != same


def test_class_images_refuse_a_folder_other_weights_made(class_pipe, tmp_path):
    pipe = class_pipe
    kwargs = dict(num_inference_steps=1, batch_size=2, seed=5, resolution=64)
    source = {"model": "tiny_sd", "pretrained": "None", "weights": "aaaaaaaaaaaa"}
    generate_class_images(pipe, "a toy", tmp_path / "made", 2, source=source, **kwargs)
    stamp = (tmp_path / "made" / SOURCE_FILE).read_text()
    assert '"weights": "aaaaaaaaaaaa"' in stamp and '"prompt": "a toy"' in stamp
    # The same weights top the folder up; other weights are refused before anything is made.
    assert generate_class_images(pipe, "a toy", tmp_path / "made", 3, source=source, **kwargs) == 1
    other = {**source, "weights": "bbbbbbbbbbbb"}
    with pytest.raises(UserError, match="other weights.*aaaaaaaaaaaa.*data.class_dir"):
        generate_class_images(pipe, "a toy", tmp_path / "made", 4, source=other, **kwargs)
    assert len(list_images(tmp_path / "made")) == 3
    # The user's own images carry no stamp: they count, and the stamp does not vouch for them.
    own = tmp_path / "own"
    own.mkdir()
    Image.new("RGB", (64, 64), "red").save(own / "mine.png")
    assert generate_class_images(pipe, "a toy", own, 2, source=other, **kwargs) == 1
    assert not (own / SOURCE_FILE).exists()
