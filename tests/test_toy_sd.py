"""The toy Stable Diffusion's pretraining path: on-the-fly toy-world data, a new UNet over
pretrained parts loaded from folders, and export.dir that never replaces a user's folder."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from t2ilab.data.dreambooth import tokenize
from t2ilab.data.toy import class_caption, dense_caption, scene_at
from t2ilab.data.toy_world import ToyWorldDataModule, ToyWorldTextImages
from t2ilab.errors import UserError
from t2ilab.models.loading import load_sd_components, load_tokenizer, vae_scale_factor
from t2ilab.toy.tokenizer import build_toy_tokenizer


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
    data.set_epoch(2)  # a new epoch renders new scenes: index 5 is scene 2 * 8 + 5
    assert _is(tokenizer, data[5]["input_ids"], dense_caption(scene_at(3, 21)))
    sparse = ToyWorldTextImages(tokenizer, size=8, seed=3, resolution=64, caption="class")
    assert _is(tokenizer, sparse[5]["input_ids"], class_caption(scene_at(3, 5)))


def test_caption_dropout_gives_empty_captions_at_its_rate(tokenizer):
    data = ToyWorldTextImages(tokenizer, 400, 0, 16, caption_dropout=0.25)
    empty = sum(_is(tokenizer, data[i]["input_ids"], "") for i in range(400))
    assert 70 <= empty <= 130  # binomial(400, 0.25): mean 100, sd 8.7


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
