"""DreamBooth caching: latents and prompt states computed once give the same loss."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import CONF, ROOT
from omegaconf import OmegaConf

from t2ilab.data.dreambooth import DreamBoothDataModule
from t2ilab.models.loading import load_components, load_sd_components
from t2ilab.modules.dreambooth import DreamBoothModule
from t2ilab.modules.step_random import StepRandom


@pytest.fixture(scope="module")
def components():
    return load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))


def _datamodule(components, cache: bool, text_frozen: bool = True, random_flip: bool = False):
    dm = DreamBoothDataModule(
        instance_dir=str(ROOT / "data" / "example_subject"),
        class_noun="toy",
        with_prior_preservation=False,
        resolution=64,
        random_flip=random_flip,
        batch_size=2,
        cache={"latents": cache, "text": cache},
    )
    dm.check()
    dm.bind(components.tokenizer)
    dm.prepare_features(components, text_frozen=text_frozen)
    dm.setup()
    return dm


def _first_batch(dm):
    torch.manual_seed(3)  # the loader's shuffle
    return next(iter(dm.train_dataloader()))


def test_cached_and_uncached_losses_are_equal(components):
    plain, cached = (
        _first_batch(_datamodule(components, False)),
        _first_batch(_datamodule(components, True)),
    )
    assert {"pixel_values", "input_ids"} <= set(plain)
    assert {"latent_mean", "latent_std", "condition"} <= set(cached)
    assert "pixel_values" not in cached and "input_ids" not in cached
    module = DreamBoothModule(**copy.deepcopy(components).module_kwargs()).eval()
    losses = []
    for batch in (plain, cached):
        with torch.no_grad():  # the same step's draws for both
            losses.append(module.diffusion_loss(batch, StepRandom(seed=0, key=(0,)))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_every_text_backbone_caches_its_own_condition(model):
    """SDXL's two encoders + pooled embedding + time ids, PixArt's T5 states + mask, SD3's
    joint CLIP + T5 sequence + pooled projections, Flux's T5 states + CLIP pooled: the cached
    condition trains to the same loss as encoding every step."""
    backbone = load_components(OmegaConf.load(CONF / "model" / f"{model}.yaml"))
    plain, cached = (
        _first_batch(_datamodule(backbone, False)),
        _first_batch(_datamodule(backbone, True)),
    )
    assert isinstance(cached["condition"], dict) and "input_ids" not in cached
    module = DreamBoothModule(**copy.deepcopy(backbone).module_kwargs()).eval()
    losses = []
    for batch in (plain, cached):
        with torch.no_grad():
            losses.append(module.diffusion_loss(batch, StepRandom(seed=0, key=(0,)))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)


def test_caching_stays_off_where_it_would_change_training(components):
    flipped = _datamodule(components, True, random_flip=True)
    assert flipped.image_features is None  # random augmentation: latents differ every epoch
    trainable_text = _datamodule(components, True, text_frozen=False)
    assert trainable_text.text_features is None and trainable_text.image_features is not None
    batch = _first_batch(trainable_text)
    assert "input_ids" in batch and "latent_mean" in batch


def test_a_cached_text_encoder_leaves_the_device_during_training(components):
    """No GPU here: the module's device is set by hand and the encoder's moves are recorded."""
    assert _datamodule(components, True).text_from_cache
    assert not _datamodule(components, True, text_frozen=False).text_from_cache
    module = DreamBoothModule(**copy.deepcopy(components).module_kwargs())
    moves = []
    module.text_encoder.to = lambda device: moves.append(str(device))
    module._device = torch.device("cuda", 0)
    module.on_train_start()
    assert moves == []  # offloading is only on when every prompt state is cached
    module.offload_text_encoder = True
    module.on_train_start()
    assert moves == ["cpu"]
    with module.for_inference():  # sampling, evaluation and export borrow it back
        assert moves == ["cpu", "cuda:0"]
    assert moves == ["cpu", "cuda:0", "cpu"]
