"""The VAE-latent / T5-feature cache: training from it equals training from images, it is built
once, resumes after a crash, recomputes changed items, separates keys and checks disk space."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from t2ilab.data.buckets import AspectRatioBucketSampler, bucket_table, resize_to_bucket
from t2ilab.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    sample_latents,
    t5_text_encoder,
    vae_image_encoder,
)
from t2ilab.data.images import ImageTransform, load_rgb
from t2ilab.errors import UserError

RESOLUTION = 32
MAX_LENGTH = 16
KEY = {"vae": "tiny-vae", "text_encoder": "tiny-t5", "resolution": RESOLUTION, "max_length": 16}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return ByT5Tokenizer(), T5EncoderModel(config).eval()


def _write_image(path: Path, seed: int, size=(RESOLUTION, RESOLUTION)) -> None:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


@pytest.fixture
def items(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pairs = []
    for i in range(10):
        path = folder / f"img_{i:02d}.png"
        _write_image(path, i)
        pairs.append((path, f"photo number {i} of a thing"))
    return pairs


class Counting:
    """An encoder wrapper that records what it was asked to encode (and can fail on a call)."""

    def __init__(self, encode, fail_on_call: int | None = None):
        self.encode = encode
        self.fail_on_call = fail_on_call
        self.calls: list[list] = []

    def __call__(self, inputs):
        self.calls.append(list(inputs))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.encode(inputs)

    @property
    def seen(self) -> list:
        return [x for call in self.calls for x in call]


def _encoders(vae, t5, transform=None):
    tokenizer, text_encoder = t5
    image = Counting(vae_image_encoder(vae, transform or ImageTransform(RESOLUTION)))
    text = Counting(t5_text_encoder(tokenizer, text_encoder, max_length=MAX_LENGTH))
    return image, text


def _build(cache, items, vae, t5, **kwargs):
    image, text = _encoders(vae, t5)
    cache.build(items, image, text, **kwargs)
    return image, text


def _all_tensors(cache) -> list[dict[str, torch.Tensor]]:
    dataset = CachedFeatureDataset(cache)
    return [dataset[i] for i in range(len(dataset))]


# --- (a) training from the cache equals training from images --------------------------------------


def _loss(latents: torch.Tensor, vae) -> torch.Tensor:
    """A diffusion-style loss with seeded noise and timesteps and a fixed "model"."""
    latents = latents * vae.config.scaling_factor
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.randint(
        0, 1000, (latents.shape[0],), generator=torch.Generator().manual_seed(2)
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    weight = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(3))
    prediction = weight * noisy  # depends on the latents, unlike a constant output
    return F.mse_loss(prediction, noise)


def test_cache_gives_the_same_loss_and_text_features(tmp_path, items, vae, t5):
    items = items[:4]
    cache = FeatureCache(tmp_path / "cache", KEY)
    _build(cache, items, vae, t5, batch_size=3, shard_size=2)
    cached = default_collate(_all_tensors(cache))
    assert set(cached) == {"latent_mean", "latent_std", "prompt_embeds", "prompt_mask"}

    # From images, the way the training step does it: encode, sample the posterior.
    transform = ImageTransform(RESOLUTION)
    pixels = torch.stack([transform(load_rgb(path)) for path, _ in items])
    with torch.no_grad():
        from_images = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    from_cache = sample_latents(
        cached["latent_mean"], cached["latent_std"], torch.Generator().manual_seed(0)
    )
    # The cache encoded batches of 3, this a batch of 4: kernels may sum in another order per
    # batch shape and thread count, so compare within float32's own tolerance (assert_close's
    # dtype default: rtol 1.3e-6, atol 1e-5), not bit for bit. A wrong image, order or posterior
    # is off by orders of magnitude more.
    torch.testing.assert_close(from_cache, from_images)
    assert _loss(from_cache, vae).item() == pytest.approx(_loss(from_images, vae).item(), rel=1e-5)

    # Text features: what the encoder gives now, for this batch, with its attention mask.
    tokenizer, text_encoder = t5
    tokens = tokenizer(
        [caption for _, caption in items],
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        fresh = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    assert cached["prompt_embeds"].shape == (4, MAX_LENGTH, 32)
    torch.testing.assert_close(cached["prompt_embeds"], fresh)  # float32's tolerance, as above
    assert torch.equal(cached["prompt_mask"], tokens.attention_mask)


# --- (b) built once ---------------------------------------------------------------------------------


def test_second_build_encodes_nothing(tmp_path, items, vae, t5):
    cache = FeatureCache(tmp_path / "cache", KEY)
    image, text = _build(cache, items, vae, t5, batch_size=4, shard_size=3)
    assert len(image.seen) == len(text.seen) == 10
    assert cache.complete and cache.missing(items) == []
    before = _all_tensors(cache)
    # The same run, and a later run with a fresh cache object: no encoder call at all.
    for again in (cache, FeatureCache(tmp_path / "cache", dict(reversed(KEY.items())))):
        image, text = _build(again, items, vae, t5, batch_size=4, shard_size=3)
        assert image.calls == [] and text.calls == []
    after = _all_tensors(cache)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after, strict=True) for k in a)
    shards = sorted(p.name for p in cache.path.glob("shard_*.safetensors"))
    assert shards == [f"shard_{i:05d}.safetensors" for i in range(4)]  # 3 + 3 + 3 + 1


# --- (c) resumable ---------------------------------------------------------------------------------


def test_crash_then_resume_encodes_only_the_rest(tmp_path, items, vae, t5):
    cache = FeatureCache(tmp_path / "cache", KEY)
    tokenizer, text_encoder = t5
    # batch 2, shard 4: calls 1-2 fill shard 0; call 3 (the second shard's first batch) fails.
    crashing = Counting(vae_image_encoder(vae, ImageTransform(RESOLUTION)), fail_on_call=3)
    text = Counting(t5_text_encoder(tokenizer, text_encoder, max_length=MAX_LENGTH))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.build(items, crashing, text, batch_size=2, shard_size=4)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert [len(s["ids"]) for s in manifest["shards"]] == [4]
    assert not list(cache.path.glob(".*tmp"))  # no half-written file left behind
    assert not cache.complete
    with pytest.raises(UserError, match="has not been built"):
        CachedFeatureDataset(cache)

    image, text = _build(cache, items, vae, t5, batch_size=2, shard_size=4)
    assert image.seen == [path for path, _ in items[4:]]
    assert text.seen == [caption for _, caption in items[4:]]
    assert cache.complete

    reference = FeatureCache(tmp_path / "reference", KEY)
    _build(reference, items, vae, t5, batch_size=2, shard_size=4)
    resumed, uninterrupted = _all_tensors(cache), _all_tensors(reference)
    assert len(resumed) == len(uninterrupted) == 10
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


# --- (d) changed items are recomputed ------------------------------------------------------------------


def test_changed_image_or_caption_is_recomputed(tmp_path, items, vae, t5):
    cache = FeatureCache(tmp_path / "cache", KEY)
    _build(cache, items, vae, t5, batch_size=4)
    old = _all_tensors(cache)

    changed = items[2][0]
    stat = changed.stat()
    _write_image(changed, seed=99)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = list(items)
    edited[5] = (items[5][0], "a new caption for image five")

    image, text = _build(cache, edited, vae, t5, batch_size=4)
    assert image.seen == [changed, items[5][0]]
    assert text.seen == [items[2][1], "a new caption for image five"]
    new = _all_tensors(cache)
    assert not torch.equal(new[2]["latent_mean"], old[2]["latent_mean"])
    assert not torch.equal(new[5]["prompt_embeds"], old[5]["prompt_embeds"])
    for i in (0, 1, 3, 4, 6, 7, 8, 9):
        assert torch.equal(new[i]["latent_mean"], old[i]["latent_mean"])
        assert torch.equal(new[i]["prompt_embeds"], old[i]["prompt_embeds"])


# --- (e) keys and folders --------------------------------------------------------------------------------


def test_key_decides_the_folder(tmp_path):
    a = FeatureCache(tmp_path, KEY)
    assert a.path.parent == tmp_path and len(a.path.name) == 64
    assert FeatureCache(tmp_path, dict(reversed(KEY.items()))).path == a.path
    assert FeatureCache(tmp_path, {**KEY, "max_length": 120}).path != a.path
    assert FeatureCache(tmp_path, {**KEY, "dtype": torch.float16}).path != a.path
    with pytest.raises(TypeError, match="not JSON"):
        FeatureCache(tmp_path, {**KEY, "model": object()})


def test_key_json_written_and_checked(tmp_path, items, vae, t5):
    cache = FeatureCache(tmp_path / "cache", {**KEY, "dtype": torch.float32})
    _build(cache, items[:2], vae, t5)
    assert json.loads((cache.path / "key.json").read_text()) == {**KEY, "dtype": "torch.float32"}
    (cache.path / "key.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match="does not match"):
        _build(cache, items[:2], vae, t5)


# --- (f) disk space -----------------------------------------------------------------------------------


def test_not_enough_disk_space_is_one_line_user_error(tmp_path, items, vae, t5, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    cache = FeatureCache(tmp_path / "cache", KEY)
    with pytest.raises(UserError) as error:
        _build(cache, items, vae, t5, batch_size=2)
    message = str(error.value)
    assert "\n" not in message and "10 items" in message and "free" in message
    assert not list(cache.path.glob("shard_*"))


# --- buckets: latents of several shapes ----------------------------------------------------------------


def test_bucketed_cache_batches_by_latent_shape(tmp_path, vae, t5):
    folder = tmp_path / "mixed"
    folder.mkdir()
    items = []
    for i, size in enumerate([(64, 32), (32, 64), (32, 32)] * 2):  # width, height
        path = folder / f"img_{i}.png"
        _write_image(path, i, size)
        items.append((path, f"caption {i}"))
    table = bucket_table(32, 8)
    transform = functools.partial(resize_to_bucket, table=table)
    cache = FeatureCache(tmp_path / "cache", {**KEY, "buckets": table})
    image, text = _encoders(vae, t5, transform)
    cache.build(items, image, text, batch_size=4)

    dataset = CachedFeatureDataset(cache)
    assert len(set(dataset.bucket_ids)) == 3
    first = dataset[0]  # opens a shard handle; a copy for a spawned worker must still work
    copy = pickle.loads(pickle.dumps(dataset))
    assert all(torch.equal(copy[0][name], first[name]) for name in first)
    sampler = AspectRatioBucketSampler(dataset.bucket_ids, batch_size=2)
    shapes = set()
    for batch in DataLoader(dataset, batch_sampler=sampler):
        assert batch["latent_mean"].shape[0] == 2
        shapes.add(tuple(batch["latent_mean"].shape[2:]))
    assert shapes == {(h // 2, w // 2) for h, w in (table["0.5"], table["2.0"], table["1.0"])}


# --- one answer to "where is the cache" ---------------------------------------------------------


def test_the_cache_location_and_default_have_one_answer(tmp_path, monkeypatch):
    """The config's defaults are the code's, and an unset data.cache.dir is the user's cache
    folder (never the data folder)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from t2ilab.data.feature_cache import default_cache_root
    from t2ilab.data.pixart_captions import PixArtCaptionDataModule

    yaml = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "pixart_captions.yaml")
    code = asdict(PixArtCaptionDataModule.CACHE)
    assert (
        OmegaConf.to_container(yaml.cache) == code == {"latents": True, "text": True, "dir": None}
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "t2ilab" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "t2ilab" / "features"
