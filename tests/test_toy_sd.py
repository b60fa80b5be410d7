"""The toy Stable Diffusion's pretraining path: on-the-fly toy-world data, a new UNet over
pretrained parts loaded from folders, and export.dir that never replaces a user's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from t2ilab.data.dreambooth import tokenize
from t2ilab.errors import UserError
from t2ilab.models.loading import load_sd_components, load_tokenizer, vae_scale_factor
from t2ilab.toy.datamodules import ToyWorldDataModule, ToyWorldTextImages
from t2ilab.toy.tokenizer import build_toy_tokenizer
from t2ilab.toy.world import class_caption, dense_caption, scene_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def _is(tokenizer, ids, caption: str) -> bool:
    return torch.equal(ids, tokenize(tokenizer, caption))


def test_examples_are_renders_with_their_exact_captions(tokenizer):
    data = ToyWorldTextImages(tokenizer, size=8, seed=3, resolution=64)
    item = data[5]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert _is(tokenizer, item["input_ids"], dense_caption(scene_at(3, 5)))
    assert torch.equal(data[5]["pixel_values"], item["pixel_values"])  # deterministic
    # Item 5 of epoch 2 is draw 2 * 8 + 5 (t2ilab.data.loader): a new scene every epoch.
    assert _is(tokenizer, data[21]["input_ids"], dense_caption(scene_at(3, 21)))
    sparse = ToyWorldTextImages(tokenizer, size=8, seed=3, resolution=64, caption="class")
    assert _is(tokenizer, sparse[5]["input_ids"], class_caption(scene_at(3, 5)))


def test_caption_dropout_gives_empty_captions_at_its_rate(tokenizer):
    data = ToyWorldTextImages(tokenizer, 400, 0, 16, caption_dropout=0.25)
    empty = sum(_is(tokenizer, data[i]["input_ids"], "") for i in range(400))
    assert 70 <= empty <= 130  # binomial(400, 0.25): mean 100, sd 8.7


def test_partial_captions_mix_dense_class_and_subsets_that_stay_true(tokenizer):
    """caption=partial: a quarter dense, a quarter class-only, the rest a random subset of the
    attributes in the dense caption's order; never an attribute the scene does not have."""
    from t2ilab.toy.world import OPTIONAL_ATTRIBUTES, partial_caption

    data = ToyWorldTextImages(tokenizer, 400, 1, 16, caption="partial")
    kinds = {"dense": 0, "class": 0, "subset": 0}
    for i in range(400):
        scene = scene_at(1, i)
        subsets = [
            [a for a, keep in zip(OPTIONAL_ATTRIBUTES, bits, strict=True) if keep]
            for bits in __import__("itertools").product([0, 1], repeat=len(OPTIONAL_ATTRIBUTES))
        ]
        ids = data[i]["input_ids"]
        if _is(tokenizer, ids, dense_caption(scene)):
            kinds["dense"] += 1
        elif _is(tokenizer, ids, class_caption(scene)):
            kinds["class"] += 1
        else:
            assert any(_is(tokenizer, ids, partial_caption(scene, s)) for s in subsets), i
            kinds["subset"] += 1
    # dense and class also arise as subsets (1/32 each of the half that draws one)
    assert 70 <= kinds["dense"] <= 140 and 70 <= kinds["class"] <= 140, kinds
    assert 150 <= kinds["subset"] <= 230, kinds


def test_datamodule_batches_and_bad_settings(tokenizer):
    dm = ToyWorldDataModule(size=8, batch_size=4, num_workers=0, resolution=32)
    dm.check()
    dm.bind(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["num_instance"] == 4
    assert dm.class_prompt is None
    with pytest.raises(UserError, match="data.caption=sparse"):
        ToyWorldDataModule(caption="sparse").check()
    with pytest.raises(UserError, match="unknown \\['dodecahedron'\\]"):
        ToyWorldDataModule(shapes=["dodecahedron"]).check()


def test_the_curriculum_moves_from_large_centred_objects_to_the_whole_world(tokenizer):
    """data.curriculum_steps: draw d is large and centred with probability 1 - d / N (N draws =
    steps x batch size); everything else about the scene and its caption stays its own."""
    import numpy as np

    plain = ToyWorldTextImages(tokenizer, 4000, 0, 32, caption="dense")
    taught = ToyWorldTextImages(tokenizer, 4000, 0, 32, caption="dense", curriculum_draws=4000)

    def easy(scene):
        return scene.size == "large" and scene.position == "center"

    for start, expected in ((0, 0.95), (1800, 0.55), (3600, 0.05)):  # mean of 1 - d/N
        draws = range(start, start + 400)
        share = np.mean([easy(taught.scene(d)) for d in draws])
        base = np.mean([easy(plain.scene(d)) for d in draws])  # 1/27 without a curriculum
        assert abs(share - (expected + (1 - expected) * base)) < 0.06, (start, share)
    beyond = [taught.scene(d) == plain.scene(d) for d in range(4000, 4200)]
    assert all(beyond)  # past N the world is the world
    for d in range(50):  # shape, colours, pattern, pose unchanged; the caption says large, center
        a, b = taught.scene(d), plain.scene(d)
        assert (a.shape, a.color, a.background, a.pattern) == (
            b.shape,
            b.color,
            b.background,
            b.pattern,
        )
        assert _is(tokenizer, taught[d]["input_ids"], dense_caption(a))
    dm = ToyWorldDataModule(size=8, batch_size=4, curriculum_steps=3)
    assert dm.curriculum_draws == 12
    with pytest.raises(UserError, match="data.curriculum_steps=-1"):
        ToyWorldDataModule(curriculum_steps=-1).check()


def test_a_curriculum_floor_keeps_a_share_of_large_centred_objects(tokenizer):
    """data.curriculum_floor f: the share never falls below f, during the curriculum or after
    it, so a model keeps practising the outlines it learned first; draws the floor does not
    pick are the world's own."""
    import numpy as np

    plain = ToyWorldTextImages(tokenizer, 4000, 0, 32, caption="dense")
    kept = ToyWorldTextImages(
        tokenizer, 4000, 0, 32, caption="dense", curriculum_draws=1000, curriculum_floor=0.4
    )
    only_floor = ToyWorldDataModule(size=4000, curriculum_floor=0.4)

    def easy(scene):
        return scene.size == "large" and scene.position == "center"

    base = np.mean([easy(plain.scene(d)) for d in range(2000, 3000)])
    after = np.mean([easy(kept.scene(d)) for d in range(2000, 3000)])
    assert abs(after - (0.4 + 0.6 * base)) < 0.05, after
    early = np.mean([easy(kept.scene(d)) for d in range(0, 200)])  # 1 - d/N is above the floor
    assert early > 0.85, early
    moved = [d for d in range(2000, 3000) if kept.scene(d) != plain.scene(d)]
    assert moved and all(easy(kept.scene(d)) for d in moved)
    only_floor.check()
    only_floor.tokenizer = tokenizer
    only_floor.setup()
    share = np.mean([easy(only_floor.dataset.scene(d)) for d in range(1000)])
    assert abs(share - (0.4 + 0.6 * base)) < 0.06, share  # a floor without a curriculum
    with pytest.raises(UserError, match="data.curriculum_floor=1.5"):
        ToyWorldDataModule(curriculum_floor=1.5).check()


def test_shape_weights_draw_a_shape_more_often_and_keep_the_rest_of_each_scene():
    """data.shape_weights {hexagon: 3}: hexagons are 3 of every 10 draws (8 shapes, the other
    seven weigh 1), each scene's colours, size and pose stay its own draw, labels follow the
    redrawn shape, and without weights every scene is the world's own."""
    import dataclasses

    from omegaconf import OmegaConf

    from t2ilab.toy.datamodules import ToyWorldClassDataModule
    from t2ilab.toy.world import SHAPES

    dm = ToyWorldClassDataModule(size=4000, shape_weights=OmegaConf.create({"hexagon": 3}))
    dm.check()  # as Hydra passes it
    dm.setup()
    draws = range(4000)
    scenes = [dm.dataset.scene(d) for d in draws]
    share = sum(s.shape == "hexagon" for s in scenes) / len(scenes)
    assert abs(share - 0.3) < 0.025, share  # 3/10; 0.125 unweighted; standard error 0.007
    others = [sum(s.shape == shape for s in scenes) / len(scenes) for shape in SHAPES[:-1]]
    assert SHAPES[-1] == "hexagon" and all(abs(o - 0.1) < 0.02 for o in others), others
    for d, scene in zip(draws, scenes, strict=True):
        assert dataclasses.replace(scene_at(0, d), shape=scene.shape) == scene
    item = dm.dataset[7]
    assert SHAPES[int(item["class_labels"])] == scenes[7].shape

    plain = ToyWorldClassDataModule(size=100)
    plain.setup()
    assert all(plain.dataset.scene(d) == scene_at(0, d) for d in range(100))

    for bad, says in [
        ({"blob": 2}, "data.shape_weights names \\['blob'\\]"),
        ({"hexagon": -1}, "0 or more"),
        ({"hexagon": "many"}, "0 or more"),
        ({s: 0 for s in SHAPES}, "at least one shape above 0"),
        (3, "give shapes and their weights"),
        (["hexagon"], "give shapes and their weights"),
    ]:
        with pytest.raises(UserError, match=says):
            ToyWorldClassDataModule(shape_weights=bad).check()


def test_a_new_unet_over_pretrained_parts_from_folders(tmp_path, tokenizer):
    """model.components: VAE and text encoder load from folders, the UNet is built."""
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8],
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )
    vae.save_pretrained(tmp_path / "vae")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    )
    text.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    cfg = OmegaConf.load("conf/model/toy_sd_init.yaml")
    cfg.components = {
        "vae": str(tmp_path / "vae"),
        "text_encoder": str(tmp_path / "clip"),
        "tokenizer": str(tmp_path / "clip"),
    }
    assert vae_scale_factor(cfg) == 4
    assert load_tokenizer(cfg).get_vocab() == tokenizer.get_vocab()
    c = load_sd_components(cfg)
    assert torch.equal(c.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    loaded, saved = c.text_encoder.state_dict(), text.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert c.unet.config.cross_attention_dim == 128 and not c.unet.training
    cfg.components.vae = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="model.components.vae=.*nowhere is not a saved model"):
        load_sd_components(cfg)


@pytest.mark.slow
def test_export_dir_is_written_and_never_replaced_unasked(tmp_path):
    from _support import FAST, run_train

    args = ["experiment=dreambooth_sigmoid", *FAST, "eval=none", "callbacks.samples.at_end=false"]
    target = tmp_path / "my_model"
    done = run_train([*args, f"export.dir={target}"], tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "model_index.json").is_file() and not (tmp_path / "run" / "export").exists()
    refused = run_train([*args, f"export.dir={target}"], tmp_path / "again")
    assert refused.returncode == 2
    assert "export.dir=" in refused.stderr and "export.overwrite=true" in refused.stderr
    assert not (tmp_path / "again" / "checkpoints").exists()  # refused before training


def test_ship_links_shared_parts_and_refuses_a_changed_copy(tmp_path):
    """t2ilab.toy.ship: the export's VAE / text encoder / tokenizer copies become links to the
    shipped folders beside it, only when they hold exactly the shipped weights, and the linked
    folder still loads in stock diffusers with those weights."""
    import shutil

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from t2ilab.toy.ship import link_shared_parts

    toy = ROOT / "models" / "toy"
    for name in ("toy_vae", "toy_clip"):
        shutil.copytree(toy / name, tmp_path / name)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "toy_sd_init.yaml"))
    cfg["components"] = {
        "vae": str(tmp_path / "toy_vae"),
        "text_encoder": str(tmp_path / "toy_clip"),
        "tokenizer": str(tmp_path / "toy_clip"),
    }
    cfg["tiny"]["unet"]["block_out_channels"] = [16, 32]
    cfg["tiny"]["unet"]["norm_num_groups"] = 8
    components = load_sd_components(cfg)
    export = tmp_path / "toy_x"
    pipe = components.pipeline(DDPMScheduler.from_config(components.scheduler_config))
    pipe.save_pretrained(export)

    changed = tmp_path / "changed"
    shutil.copytree(export, changed)
    weights = next((changed / "vae").glob("*.safetensors"))
    state = load_file(weights)
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, weights)
    with pytest.raises(ValueError, match="differs"):
        link_shared_parts(changed)
    assert not any((changed / sub).is_symlink() for sub in ("vae", "tokenizer"))
    retokenized = tmp_path / "retokenized"  # the VAE is the shipped one, the tokenizer not
    shutil.copytree(export, retokenized)
    config_file = retokenized / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 77
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer differs"):
        link_shared_parts(retokenized)
    assert not (retokenized / "vae").is_symlink()  # nothing changed, the good part included

    assert sorted(link_shared_parts(export)) == ["tokenizer", "vae"]
    assert link_shared_parts(export) == []  # already linked
    assert (export / "vae").resolve() == (tmp_path / "toy_vae").resolve()
    assert str((export / "tokenizer").readlink()) == "../toy_clip"
    assert not (export / "text_encoder").is_symlink()
    loaded = StableDiffusionPipeline.from_pretrained(export, safety_checker=None)
    vae = AutoencoderKL.from_pretrained(tmp_path / "toy_vae")
    for (name, a), b in zip(
        loaded.vae.state_dict().items(), vae.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    shipped_text = CLIPTextModel.from_pretrained(tmp_path / "toy_clip")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            loaded.text_encoder.state_dict().values(),
            shipped_text.state_dict().values(),
            strict=True,
        )
    )
    assert loaded.tokenizer.get_vocab() == components.tokenizer.get_vocab()
