"""Aspect-ratio buckets: tables, assignment (EXIF included), resize-crop, the one-bucket batch
sampler (epochs, DDP ranks), size conditioning, and a PixArt MS transformer taking it."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image
from torch.utils.data import DataLoader

from t2ilab.data.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    AspectRatioBucketSampler,
    BucketedCaptionDataset,
    BucketResizeCrop,
    assign_bucket,
    bucket_table,
    collate_bucketed,
    image_size,
    resize_to_bucket,
    size_conditioning,
)
from t2ilab.data.images import load_rgb
from t2ilab.errors import UserError

# --- tables and assignment ----------------------------------------------------------------------


def test_tables_are_diffusers_tables():
    for ours, theirs in (
        (ASPECT_RATIO_1024, ASPECT_RATIO_1024_BIN),
        (ASPECT_RATIO_512, ASPECT_RATIO_512_BIN),
        (ASPECT_RATIO_256, ASPECT_RATIO_256_BIN),
    ):
        assert ours == {k: (int(h), int(w)) for k, (h, w) in theirs.items()}
    # Scaling a base table to its own resolution changes nothing.
    assert bucket_table(1024, 16) == ASPECT_RATIO_1024
    assert bucket_table(512, 32) == ASPECT_RATIO_512
    assert bucket_table(256, 16) == ASPECT_RATIO_256


@pytest.mark.parametrize(
    "resolution, divisor", [(64, 16), (64, 8), (96, 16), (128, 32), (384, 16), (768, 32)]
)
def test_scaled_table_divisible_and_sized(resolution, divisor):
    table = bucket_table(resolution, divisor)
    sizes = list(table.values())
    assert len(set(sizes)) == len(sizes)  # duplicates from rounding are merged
    assert any(h == w for h, w in sizes)
    for h, w in sizes:
        assert h % divisor == 0 and w % divisor == 0 and h >= divisor and w >= divisor
    # The square bucket has the base resolution; every bucket about its area.
    assert table["1.0"] == (resolution, resolution)
    for h, w in sizes:
        assert 0.5 < h * w / resolution**2 < 1.6
    # Ordered by aspect ratio, from landscape to portrait.
    ratios = [h / w for h, w in sizes]
    assert ratios == sorted(ratios)


def test_assign_bucket_portrait_landscape_square():
    table = ASPECT_RATIO_1024
    assert assign_bucket(1024, 1024, table) == ("1.0", (1024, 1024))
    key, (h, w) = assign_bucket(600, 1200, table)  # width, height: portrait 1:2
    assert key == "2.0" and h > w
    key, (h, w) = assign_bucket(1200, 600, table)  # landscape 2:1
    assert key == "0.5" and w > h
    key, (h, w) = assign_bucket(1920, 1080, table)  # 16:9
    assert w > h and abs(math.log(h / w) - math.log(1080 / 1920)) < 0.05
    # The nearest in log space over the whole table (2:1 and 1:2 are equally far from 1:1).
    for width, height in [(333, 1000), (1000, 333), (640, 480), (500, 510), (3000, 200)]:
        _, (h, w) = assign_bucket(width, height, table)
        best = min(abs(math.log(bh / bw) - math.log(height / width)) for bh, bw in table.values())
        assert abs(math.log(h / w) - math.log(height / width)) == pytest.approx(best)


def _jpeg_with_orientation(path, width, height, orientation):
    image = Image.new("RGB", (width, height), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


def test_image_size_applies_exif_orientation(tmp_path):
    # Stored landscape 64x32, EXIF "rotate 90" (6): shown, and loaded, as 32x64 portrait.
    rotated = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(rotated, 64, 32, 6)
    assert image_size(rotated) == (32, 64) == load_rgb(rotated).size
    # Orientations 1-4 keep the sides.
    mirrored = tmp_path / "mirrored.jpg"
    _jpeg_with_orientation(mirrored, 64, 32, 2)
    assert image_size(mirrored) == (64, 32) == load_rgb(mirrored).size
    plain = tmp_path / "plain.png"
    Image.new("RGB", (40, 20)).save(plain)
    assert image_size(plain) == (40, 20)
    # The portrait bucket, though the stored pixels are landscape.
    dataset = BucketedCaptionDataset(
        [(rotated, "a"), (plain, "b")], bucket_table(64, 16), lambda c: {}
    )
    (h0, w0), (h1, w1) = dataset.sizes
    assert h0 > w0 and h1 < w1
    assert dataset[0]["pixel_values"].shape == (3, h0, w0)


def test_image_size_unreadable_is_user_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read as an image"):
        image_size(bad)


def test_bucket_resize_crop_covers_then_center_crops():
    # 90x30: black | white | black thirds. Cropping 30x30 from the center keeps only white.
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (30, 0, 60, 30))
    out = BucketResizeCrop(16, 16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out[:, :, 2:-2].min() > 0.9  # white (bilinear may blend the outermost columns)
    # A cover resize: a 10x10 image grows to fill 32x48 (height, width) exactly.
    small = Image.new("RGB", (10, 10), (255, 0, 0))
    out = BucketResizeCrop(32, 48)(small)
    assert out.shape == (3, 32, 48)
    assert torch.allclose(out[0], torch.ones(32, 48)) and torch.allclose(
        out[1], -torch.ones(32, 48)
    )
    assert out.min() >= -1 and out.max() <= 1
    # resize_to_bucket picks the image's own bucket.
    table = bucket_table(64, 16)
    assert resize_to_bucket(Image.new("RGB", (40, 80)), table).shape[1:] == table["2.0"]


# --- the sampler ---------------------------------------------------------------------------------


def _bucket_ids(seed=0):
    ids = ["wide"] * 11 + ["tall"] * 7 + ["square"] * 5 + ["panorama"] * 1
    random.Random(seed).shuffle(ids)
    return ids


def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_batches_are_one_bucket_each(drop_last):
    ids = _bucket_ids()
    sampler = AspectRatioBucketSampler(ids, batch_size=3, drop_last=drop_last, seed=1)
    batches = _epoch(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({ids[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 3
        if drop_last:
            assert len(batch) == 3
    seen = Counter(i for batch in batches for i in batch)
    if drop_last:
        # 11 -> 3 batches, 7 -> 2, 5 -> 1, 1 -> 0
        assert len(batches) == 6 and max(seen.values()) == 1
    else:
        # Every index exactly once: 11 -> 4 batches, 7 -> 3, 5 -> 2, 1 -> 1
        assert len(batches) == 10
        assert sorted(seen) == list(range(len(ids))) and set(seen.values()) == {1}


def test_sampler_epochs_reshuffle_deterministically():
    ids = _bucket_ids()
    sampler = AspectRatioBucketSampler(ids, batch_size=2, seed=7)
    first, second = _epoch(sampler, 0), _epoch(sampler, 1)
    assert first != second
    assert sorted(map(sorted, first)) != sorted(map(sorted, second))  # also within buckets
    # Same seed and epoch: same batches, from a fresh sampler too (another run or rank).
    assert _epoch(sampler, 0) == first
    again = AspectRatioBucketSampler(ids, batch_size=2, seed=7)
    assert _epoch(again, 1) == second
    assert _epoch(AspectRatioBucketSampler(ids, batch_size=2, seed=8), 0) != first
    # Without shuffling: bucket by bucket, in order.
    plain = _epoch(AspectRatioBucketSampler(ids, batch_size=2, shuffle=False))
    assert plain == _epoch(AspectRatioBucketSampler(ids, batch_size=2, shuffle=False), 5)
    assert [i for batch in plain for i in batch] == sorted(
        range(len(ids)), key=lambda i: (list(dict.fromkeys(ids)).index(ids[i]), i)
    )


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ddp_ranks_disjoint_and_equal(num_replicas, drop_last):
    ids = _bucket_ids()
    samplers = [
        AspectRatioBucketSampler(
            ids, 2, drop_last=drop_last, seed=3, num_replicas=num_replicas, rank=rank
        )
        for rank in range(num_replicas)
    ]
    single = AspectRatioBucketSampler(ids, 2, drop_last=drop_last, seed=3)
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        lengths = {len(batches) for batches in per_rank}
        assert lengths == {len(samplers[0])} == {len(single) // num_replicas}
        indices = [i for batches in per_rank for batch in batches for i in batch]
        assert len(indices) == len(set(indices))  # disjoint
        for batches in per_rank:
            assert all(len({ids[i] for i in batch}) == 1 for batch in batches)
        # The ranks' batches are the single-process epoch less its last few batches.
        everything = _epoch(single, epoch)
        used = len(single) // num_replicas * num_replicas
        assert sorted(b for batches in per_rank for b in batches) == sorted(everything[:used])


def test_sampler_rejects_bad_settings():
    with pytest.raises(UserError, match="batch_size"):
        AspectRatioBucketSampler(["a"], batch_size=0)
    with pytest.raises(UserError, match="no batch"):
        AspectRatioBucketSampler(["a", "b"], batch_size=4, drop_last=True)
    with pytest.raises(UserError, match="no batch"):
        AspectRatioBucketSampler(["a"], batch_size=1, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        AspectRatioBucketSampler(["a"] * 4, batch_size=1, num_replicas=2, rank=2)


def test_lightning_reaches_set_epoch():
    # Lightning's fit loop calls set_epoch on dataloader.sampler and batch_sampler.sampler.
    sampler = AspectRatioBucketSampler(["a"] * 4, batch_size=2)
    loader = DataLoader(list(range(4)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3


# --- size conditioning ----------------------------------------------------------------------------


def test_size_conditioning_values():
    cond = size_conditioning([32, 64, 48], [64, 32, 48])
    assert set(cond) == {"resolution", "aspect_ratio"}
    assert cond["resolution"].shape == (3, 2) and cond["aspect_ratio"].shape == (3, 1)
    assert cond["resolution"].tolist() == [[32.0, 64.0], [64.0, 32.0], [48.0, 48.0]]
    assert cond["aspect_ratio"].tolist() == [[0.5], [2.0], [1.0]]
    # What PixArtAlphaPipeline builds for a batch of 2 at 768x1344 (height x width).
    height, width = 768, 1344
    pipeline_resolution = torch.tensor([height, width]).repeat(2, 1).to(torch.float16)
    pipeline_ratio = torch.tensor([float(height / width)]).repeat(2, 1).to(torch.float16)
    ours = size_conditioning(torch.tensor([height] * 2), [width] * 2, dtype=torch.float16)
    assert torch.equal(ours["resolution"], pipeline_resolution)
    assert torch.equal(ours["aspect_ratio"], pipeline_ratio)


def test_pixart_ms_transformer_takes_size_conditioning():
    torch.manual_seed(0)
    # 3 heads, not 2: the size embeddings are inner_dim // 3 wide each (resolution's two values
    # and the aspect ratio), so they only add up to inner_dim when 3 divides it (1152 in PixArt).
    # Captions are projected to inner_dim, so cross_attention_dim is inner_dim too (3 * 8).
    model = PixArtTransformer2DModel(
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=24,
        caption_channels=32,
        use_additional_conditions=True,
        norm_type="ada_norm_single",
    ).eval()
    latents = torch.randn(2, 4, 4, 8)  # a landscape bucket: 32x64 pixels with a factor-8 VAE
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 5, 32),
        encoder_attention_mask=torch.ones(2, 5),
        timestep=torch.tensor([10, 500]),
    )
    with torch.no_grad():
        out = model(latents, added_cond_kwargs=size_conditioning([32, 32], [64, 64]), **kwargs)
        other = model(latents, added_cond_kwargs=size_conditioning([64, 64], [32, 32]), **kwargs)
    assert out.sample.shape == (2, 8, 4, 8)
    assert torch.isfinite(out.sample).all()
    assert not torch.allclose(out.sample, other.sample)  # the conditioning is used


# --- dataset and loader ------------------------------------------------------------------------------


def test_dataloader_end_to_end_uniform_batches(tmp_path):
    sizes = {"landscape": (96, 48), "portrait": (48, 96), "square": (64, 64)}  # width, height
    items = []
    for name, (w, h) in sizes.items():
        for i in range(5):
            path = tmp_path / f"{name}_{i}.png"
            Image.new("RGB", (w, h), (i * 40, 100, 200)).save(path)
            items.append((path, f"a {name} photo number {i}"))
    table = bucket_table(64, 16)

    def tokenize(caption):  # a tokenizer's shape: (1, L) tensors
        ids = torch.tensor([[len(caption), len(caption.split()), 0, 0]])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    dataset = BucketedCaptionDataset(items, table, tokenize)
    assert len(set(dataset.bucket_ids)) == 3
    sampler = AspectRatioBucketSampler(dataset.bucket_ids, batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bucketed)
    shapes, seen = set(), []
    for batch in loader:
        b, _, h, w = batch["pixel_values"].shape
        shapes.add((h, w))
        assert batch["input_ids"].shape == (b, 4) and batch["attention_mask"].shape == (b, 4)
        assert batch["resolution"].tolist() == [[float(h), float(w)]] * b
        assert batch["aspect_ratio"].tolist() == [[h / w]] * b
        assert batch["num_instance"] == b
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        seen.extend(batch["input_ids"][:, 0].tolist())
    assert shapes == {table["0.5"], table["2.0"], table["1.0"]}
    assert len(seen) == len(items)


def test_collate_rejects_mixed_buckets():
    a = {"pixel_values": torch.zeros(3, 16, 32), "height": 16, "width": 32}
    b = {"pixel_values": torch.zeros(3, 32, 16), "height": 32, "width": 16}
    with pytest.raises(ValueError, match="AspectRatioBucketSampler"):
        collate_bucketed([a, b])
