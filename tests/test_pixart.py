"""PixArt-alpha end to end: the three stages hand over, exports load in stock diffusers."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from _support import FAST, ROOT, run_train
from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtTransformer2DModel

import t2ilab.train as train_module
from t2ilab.errors import UserError

STAGE_FAST = [
    "logger=csv",
    "trainer.max_steps=3",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.images_per_prompt=1",
]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    proc = subprocess.run(
        ["bash", str(ROOT / "sweeps" / "pixart_stages.sh"), str(out), *STAGE_FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_each_stage_runs_and_starts_from_the_previous(stages):
    for i, name in enumerate(("pixart_stage1", "pixart_stage2", "pixart_stage3"), start=1):
        results = json.loads((stages / f"stage{i}" / "results.json").read_text())
        assert results["experiment"] == name and results["status"] == "ok" and results["steps"] == 3
    logs = {i: (stages / f"stage{i}" / "train.log").read_text() for i in (2, 3)}
    assert "reparameterised from the DiT" in logs[2]
    assert "init: PixArt transformer from" in logs[3]


@pytest.mark.slow
def test_stage1_exports_a_dit_pipeline(stages):
    export = stages / "stage1" / "export"
    pipe = DiTPipeline.from_pretrained(export)
    labels = json.loads((export / "id2label.json").read_text())
    assert sorted(labels.values()) == ["circle", "square", "star", "triangle"]
    out = pipe(class_labels=[0, 3], num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_stage3_starts_from_stage2_weights_and_exports_pixart(stages):
    stage2 = PixArtTransformer2DModel.from_pretrained(
        stages / "stage2" / "export", subfolder="transformer"
    )
    stage3 = PixArtTransformer2DModel.from_pretrained(
        stages / "stage3" / "export", subfolder="transformer"
    )
    # Three small steps of training move the weights a little from where stage 2 left them.
    a, b = stage2.state_dict(), stage3.state_dict()
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) < 0.5 and max(diffs) > 0
    pipe = PixArtAlphaPipeline.from_pretrained(stages / "stage3" / "export")
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=128,
        width=128,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_dreambooth_pixart_exports_and_generates(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["experiment=dreambooth_pixart", *FAST, "trainer.max_steps=2"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert {"dino", "clip_i", "clip_t", "pres", "div"} <= set(results["metrics"])
    pipe = PixArtAlphaPipeline.from_pretrained(run_dir / "export")
    out = pipe(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert np.isfinite(out).all()


def test_pixart_loss_goes_down_on_a_fixed_batch():
    from omegaconf import OmegaConf
    from test_learning import fit_steps, fixed_eval_loss, smooth_images

    from t2ilab.models.pixart_dit import load_pixart_components
    from t2ilab.modules.full import FullModule as PixArtModule

    c = load_pixart_components(OmegaConf.load(ROOT / "conf" / "model" / "tiny_pixart.yaml"))
    torch.manual_seed(0)
    module = PixArtModule(
        **c.module_kwargs(), optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3)
    )
    ids = c.tokenizer(
        ["a red circle"] * 4, padding="max_length", max_length=120, return_tensors="pt"
    ).input_ids
    batch = {"pixel_values": smooth_images(4), "input_ids": ids, "num_instance": 4}
    before = fixed_eval_loss(module, batch)
    fit_steps(module, batch, 40)
    assert fixed_eval_loss(module, batch) < 0.7 * before


@pytest.mark.parametrize(
    "overrides,match",
    [
        (lambda t: ["experiment=pixart_stage2", f"model.init_from={t}"], "holds no transformer/"),
        (
            lambda t: ["experiment=pixart_stage1", "model.tiny.transformer.num_embeds_ada_norm=2"],
            "4 classes .* 2 class embeddings",
        ),
        (lambda t: ["experiment=pixart_stage1", f"data.train_dir={t / 'none'}"], "does not exist"),
    ],
)
def test_bad_stage_inputs(overrides, match, make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train_module, "load_components", lambda *a, **k: pytest.fail("weights loaded")
    )
    cfg = make_cfg(*STAGE_FAST, *overrides(tmp_path))
    with pytest.raises(UserError, match=match):
        train_module.train(cfg)


def _caption_datamodule(cache: bool, tmp_path, components, multi_aspect=False):
    from t2ilab.data.pixart_captions import PixArtCaptionDataModule

    folder = "example_multiaspect" if multi_aspect else "example_captioned"
    dm = PixArtCaptionDataModule(
        train_dir=str(ROOT / "data" / folder),
        resolution=64,
        multi_aspect=multi_aspect,
        cache={"latents": cache, "text": cache, "dir": str(tmp_path)},
        caption_dropout=0.0,
        batch_size=4,
    )
    dm.check()
    dm.bind(components.tokenizer)
    dm.prepare_features(components, {"model": "tiny_pixart"}, vae_factor=2, patch_size=2)
    dm.setup()
    return dm


@pytest.mark.parametrize(
    "multi_aspect, model",
    [(False, "tiny_pixart"), (True, "tiny_pixart"), (True, "tiny_sd3"), (False, "tiny_flux")],
)
def test_training_from_the_cache_gives_the_same_loss(tmp_path, multi_aspect, model):
    """The disk cache of latents and text features (T5's, with SD3's and Flux's CLIP parts)
    trains to the loss the images and captions give."""
    from omegaconf import OmegaConf

    from t2ilab.models.loading import load_components
    from t2ilab.modules.full import FullModule as PixArtModule
    from t2ilab.modules.step_random import StepRandom

    c = load_components(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml"))
    from_images = next(
        iter(_caption_datamodule(False, tmp_path, c, multi_aspect).train_dataloader())
    )
    from_cache = next(iter(_caption_datamodule(True, tmp_path, c, multi_aspect).train_dataloader()))
    assert "latent_mean" in from_cache and "pixel_values" in from_images
    module = PixArtModule(**c.module_kwargs()).eval()
    losses = []
    for batch in (from_images, from_cache):
        with torch.no_grad():  # the same step's draws for both
            losses.append(module.diffusion_loss(batch, StepRandom(seed=0, key=(0,)))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    if multi_aspect:  # one bucket per batch, with the MS size conditioning
        assert from_images["resolution"].shape == (from_images["pixel_values"].shape[0], 2)


def test_multi_aspect_batches_are_homogeneous(tmp_path):
    from omegaconf import OmegaConf

    from t2ilab.models.pixart_dit import load_pixart_components

    c = load_pixart_components(OmegaConf.load(ROOT / "conf" / "model" / "tiny_pixart.yaml"))
    dm = _caption_datamodule(False, tmp_path, c, multi_aspect=True)
    shapes = {tuple(b["pixel_values"].shape[-2:]) for b in dm.train_dataloader()}
    assert len(shapes) == 3  # portrait, landscape and square buckets, never mixed in a batch


@pytest.mark.slow
def test_evaluate_measures_a_pixart_export(stages, tmp_path):
    images = ROOT / "data" / "example_captioned"
    proc = run_train(
        [
            f"export_dir={stages / 'stage3' / 'export'}",
            "eval=tiny",  # the stage-3 run had no evaluation to repeat: name one
            f"data.instance_dir={images}",
            "data.identifier=sks",
            "data.class_noun=shape",
            "logger=csv",
            "eval.prompts=['a red circle on a blue background','a green star on a yellow background']",
            "eval.num_inference_steps=2",
            f"eval.reference_dir={images}",
            "eval.fid_feature=dino",
            "eval.resolution=128",
        ],
        tmp_path / "eval",
        script="evaluate.py",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert {"clip_t", "fid", "kid"} <= set(metrics)
