"""The toy PixArt (issue 7): its three stages on the toy world hand over (DiT reparameterised,
then a resolution change), score prompt following at the end, and export folders that stock
diffusers loads; and the pieces the toy needs (CLIP tokens in T5's place, class labels, the
pixel shape reader) match independent computations."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _support import ROOT, run_train
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from omegaconf import OmegaConf
from PIL import Image
from transformers import ByT5Tokenizer, CLIPTextModel, CLIPTokenizer

import t2ilab.train as train_module
from t2ilab.errors import UserError
from t2ilab.models.pipelines import pipeline_call_kwargs
from t2ilab.models.pixart_dit import tokenizer_attention_mask
from t2ilab.models.stages import resolution_change
from t2ilab.toy import quality, world
from t2ilab.toy.datamodules import ToyWorldClassDataModule
from t2ilab.toy.world import COLORS, SHAPES, Scene, render, scene_at

TOY = ROOT / "models" / "toy"
FAST = [
    "logger=csv",
    "trainer.max_steps=3",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "eval.toy_alignment.n=4",
    "eval.toy_alignment.num_inference_steps=2",
]


def _stages(out):
    return subprocess.run(
        ["bash", str(ROOT / "sweeps" / "pixart_stages.sh"), str(out), *FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "STAGES": "toy_pixart_stage", "OMP_NUM_THREADS": "2"},
    )


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_stages")
    proc = _stages(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_stages_hand_over_and_score_prompt_following(stages):
    logs = {i: (stages / f"stage{i}" / "train.log").read_text() for i in (2, 3)}
    assert "reparameterised from the DiT" in logs[2]
    assert "init: sample_size 16 -> 32 latents" in logs[3]
    labels = json.loads((stages / "stage1" / "export" / "id2label.json").read_text())
    assert list(labels.values()) == list(SHAPES)
    for i in (1, 2, 3):
        metrics = json.loads((stages / f"stage{i}" / "results.json").read_text())["metrics"]
        # class-conditional stage 1: shape only (nothing names its colours)
        names = ["shape_acc"] + (["background_acc", "object_color_acc"] if i > 1 else [])
        assert sorted(k for k in metrics if k != "train_loss") == sorted(names)
        assert all(0.0 <= metrics[name] <= 1.0 for name in names)
        assert (stages / f"stage{i}" / "samples" / "alignment.png").is_file()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_alignment_cli_scores_an_export(stages, stage, tmp_path):
    grid = tmp_path / "grid.png"
    export = stages / f"stage{stage}" / "export"
    cmd = ["-m", "t2ilab.toy.alignment", str(export), "--n", "8", "--steps", "2"]
    proc = subprocess.run(
        [sys.executable, *cmd, "--grid", str(grid)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    colours = {"background_acc", "object_color_acc"} if stage > 1 else set()
    assert set(metrics) == {"shape_acc", *colours}
    if stage == 1:  # a class-conditional DiT: what each shape was drawn as
        rows = proc.stdout.split("drawn as asked, by shape:\n")[1].splitlines()[:-1]
        right = sum(int(row.split()[1].split("/")[0]) for row in rows)
        assert sum(int(row.split()[1].split("/")[1]) for row in rows) == 8
        assert right == round(8 * metrics["shape_acc"])
    assert Image.open(grid).size[0] == 8 * 64  # 8 images of 64 px a row


def test_shape_breakdown_counts_each_shape_and_what_its_misses_were_drawn_as():
    from t2ilab.toy.alignment import shape_breakdown

    asked = ["circle", "hexagon", "hexagon", "hexagon", "square"]
    read = ["circle", "circle", "hexagon", None, "circle"]
    assert shape_breakdown(asked, read).splitlines() == [
        "  circle      1/1",
        "  square      0/1  (drawn as circle 1)",
        "  hexagon     1/3  (drawn as circle 1, None 1)",
    ]


@pytest.mark.slow
def test_alignment_cli_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "t2ilab.toy.alignment", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "no model_index.json" in bad.stderr


@pytest.mark.slow
def test_stage1_trains_the_null_class_that_guidance_samples_with(stages):
    """The DiT drops labels to its null class (id 1000) only in train mode; components load in
    eval mode and Lightning keeps it, so the module must switch itself (on_train_start). 96
    labels in 3 steps: all 8 shapes and, with dropout 0.1, the null class get gradients."""
    from diffusers import DiTTransformer2DModel
    from omegaconf import OmegaConf

    from t2ilab.models.pixart_dit import load_dit_components

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "toy_dit_init.yaml")
    cfg.components.vae = str(TOY / "toy_vae")
    before = load_dit_components(cfg).transformer
    after = DiTTransformer2DModel.from_pretrained(
        stages / "stage1" / "export", subfolder="transformer"
    )

    def table(model):
        return model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight

    changed = (table(before) - table(after)).abs().sum(1) > 0
    assert torch.nonzero(changed).flatten().tolist() == [*range(len(SHAPES)), 1000]


@pytest.mark.slow
def test_stage3_export_loads_in_diffusers_at_its_new_resolution(stages):
    pipe = PixArtAlphaPipeline.from_pretrained(stages / "stage3" / "export")
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 32
    # The text encoder is the frozen toy CLIP text tower, weight for weight.
    tower = CLIPTextModel.from_pretrained(TOY / "toy_sd" / "text_encoder").state_dict()
    own = pipe.text_encoder.state_dict()
    assert all(torch.equal(own[k], tower[k]) for k in tower)
    # No height/width: the transformer's sample_size now says 128 px.
    image = pipe(
        "a red star on a blue background",
        num_inference_steps=2,
        max_sequence_length=32,  # the toy tokenizer's length (the default is T5's 120)
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_ship_links_every_shared_part_and_records_all_stages(stages, tmp_path):
    import shutil

    from t2ilab.toy.ship import link_shared_parts, record_run

    for name in ("toy_vae", "toy_clip", "toy_sd/text_encoder"):
        shutil.copytree(TOY / name, tmp_path / name)
    export = tmp_path / "toy_p"
    shutil.copytree(stages / "stage3" / "export", export)
    assert sorted(link_shared_parts(export)) == ["text_encoder", "tokenizer", "vae"]
    assert str((export / "text_encoder").readlink()) == "../toy_sd/text_encoder"
    summary = record_run(export, stages / "stage3", n=4, steps=2)
    assert [s["command"].split()[2] for s in summary["stages"]] == [
        f"experiment=toy_pixart_stage{i}" for i in (1, 2, 3)
    ]
    assert summary["steps"] == 9 and summary["parameters"] > 10**6
    assert summary["metrics"]["render_shape_acc"] == 1.0
    assert json.loads((export / "training.json").read_text())["steps"] == 9
    pipe = PixArtAlphaPipeline.from_pretrained(export)
    image = pipe("a star", num_inference_steps=1, max_sequence_length=32, output_type="np")
    assert image.images.shape == (1, 128, 128, 3)


@pytest.mark.slow
def test_resolution_change_keeps_the_function_at_the_new_size(stages):
    """Stage 3 starts as exactly what stage 2's model computes on 128 px latents."""
    source = stages / "stage2" / "export"
    before = PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer")
    cfg = OmegaConf.create({"model": {"resolution": 128}})
    vae_config = type("Vae", (), {"config": type("C", (), {"block_out_channels": [1, 1, 1]})})
    overrides = resolution_change(cfg, source, vae_config)
    assert overrides == {"sample_size": 32, "interpolation_scale": 2.0}
    after = PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer", **overrides)
    torch.manual_seed(0)
    x, text = torch.randn(2, 4, 32, 32), torch.randn(2, 6, 128)
    kwargs = dict(
        encoder_hidden_states=text,
        encoder_attention_mask=torch.ones(2, 6),
        timestep=torch.tensor([20, 700]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    with torch.no_grad():
        torch.testing.assert_close(after(x, **kwargs).sample, before(x, **kwargs).sample)


@pytest.mark.slow
def test_a_finished_stage_is_not_run_again(stages):
    before = (stages / "stage1" / "results.json").read_text()
    proc = _stages(stages)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("already done") == 3
    assert (stages / "stage1" / "results.json").read_text() == before


@pytest.mark.slow
def test_a_stage_stopped_before_its_scores_is_scored_and_exported_on_resume(stages, tmp_path):
    """A run killed after its last checkpoint but before its end-of-training score and export
    (what a stop between two stages of the recipe can hit): resuming it trains nothing, and
    Lightning then skips on_train_end, so train.py scores it itself. The score must be the one
    the uninterrupted run gave: the same checkpoint, EMA and scenes."""
    finished = json.loads((stages / "stage1" / "results.json").read_text())
    run = tmp_path / "stage1"
    shutil.copytree(stages / "stage1", run)
    shutil.rmtree(run / "export")
    (run / "samples" / "alignment.png").unlink()
    killed = {**finished, "status": "failed", "reason": "killed", "metrics": {}}
    (run / "results.json").write_text(json.dumps(killed))

    proc = run_train(
        ["experiment=toy_pixart_stage1", *FAST, "ckpt_path=last"],
        run,
        timeout=600,
        env={"OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train, the export only" in (run / "train.log").read_text()
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["status"] == "ok"
    assert resumed["metrics"]["shape_acc"] == finished["metrics"]["shape_acc"]
    assert (run / "samples" / "alignment.png").is_file()
    assert (run / "export" / "model_index.json").is_file()


@pytest.mark.parametrize("kind", ["clip", "byt5"])
def test_attention_mask_from_ids_is_the_tokenizers(kind):
    tokenizer = (
        CLIPTokenizer.from_pretrained(TOY / "toy_clip") if kind == "clip" else ByT5Tokenizer()
    )
    length = 32
    captions = ["a small red star on a blue background", "", "a star"]
    tokens = tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    expected = tokens.attention_mask.clone()
    expected[:, 0] = 1  # one token to attend for an empty caption (T5's "" is all padding)
    assert torch.equal(tokenizer_attention_mask(tokens.input_ids, tokenizer), expected)


def test_pipeline_call_kwargs_shorten_only_what_the_encoder_cannot_read():
    class Fake:
        def __init__(self, length):
            self.tokenizer = type("T", (), {"model_max_length": length})()

        def __call__(self, prompt, max_sequence_length=120, clean_caption=True,
                     use_resolution_binning=True):  # fmt: skip
            pass

    assert pipeline_call_kwargs(Fake(32)) == {
        "use_resolution_binning": False,
        "clean_caption": False,
        "max_sequence_length": 32,
    }
    assert "max_sequence_length" not in pipeline_call_kwargs(Fake(120))


def test_class_datamodule_labels_each_render_with_its_shape():
    dm = ToyWorldClassDataModule(size=16, seed=3, resolution=32, batch_size=8, num_workers=0)
    dm.check()
    dm.bind(None)
    dm.setup()
    assert dm.id2label == dict(enumerate(SHAPES)) and dm.classes == list(SHAPES)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    for i in range(8):
        scene = scene_at(3, i)
        assert SHAPES[int(batch["class_labels"][i])] == scene.shape
        pixels = (batch["pixel_values"][i].permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(pixels - np.asarray(render(scene, 32), dtype=np.float32)).max() < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_reader_is_exact_on_turned_moved_and_resized_renders(shape):
    rng = np.random.default_rng(SHAPES.index(shape))
    for _ in range(6):
        scene = Scene(
            shape,
            "red",
            "blue",
            size=str(rng.choice(["small", "medium", "large"])),
            position=str(rng.choice(["center", "top left", "bottom"])),
            rotation=float(rng.uniform(-20, 20)),
        )
        assert quality.read_shape(render(scene), "blue", "red") == shape
        assert quality.read_shape_unnamed(render(scene)) == shape  # colours read, not named
    # Only background: no shape.
    empty = Image.new("RGB", (64, 64), COLORS["blue"])
    assert quality.read_shape(empty, "blue", "red") is None
    assert quality.read_shape_unnamed(empty) is None


def test_the_unnamed_reader_sees_shapes_on_every_kind_of_world_render():
    """A class-conditional DiT draws the whole world (patterns, checkered and gradient
    backgrounds, any size and place), so the reader that scores it must read all of it."""
    scenes = [scene_at(2024, i) for i in range(300)]
    textured = [s for s in scenes if s.background in ("checkered", "gradient")]
    assert len(textured) > 30  # the hard cases are in the sample
    for scene in scenes:
        assert quality.read_shape_unnamed(render(scene)) == scene.shape, scene
    # Only a texture: no shape.
    for background in ("checkered", "gradient"):
        assert quality.read_shape_unnamed(world._background(background, 64).copy()) is None


def test_prompt_following_scores_wrong_images_low():
    scenes = quality.sd_color_scenes(7, 16)
    right = quality.to_pil(quality.render_batch(scenes))
    shifted = [
        dataclasses.replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % 8]) for s in scenes
    ]
    wrong_shape = quality.to_pil(quality.render_batch(shifted))
    assert quality.prompt_following(scenes, right)["shape_acc"] == 1.0
    scores = quality.prompt_following(scenes, wrong_shape)
    assert scores["shape_acc"] == 0.0
    assert scores["object_color_acc"] == scores["background_acc"] == 1.0


def test_toy_alignment_refuses_a_model_outside_the_toy_world(make_cfg, monkeypatch):
    monkeypatch.setattr(
        train_module, "load_components", lambda *a, **k: pytest.fail("weights loaded")
    )
    cfg = make_cfg("experiment=pixart_stage2", "eval=toy_alignment", "logger=csv")
    with pytest.raises(UserError, match="eval=toy_alignment .* tiny_pixart"):
        train_module.train(cfg)
