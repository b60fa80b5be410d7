"""Multi-aspect training: aspect-ratio buckets, as in PixArt-alpha's stage 3 (its `-MS` models) and
SDXL.

Each image is assigned the bucket (a target height x width from a fixed table) whose aspect ratio
is closest to its own, resized to cover that size and center-cropped to it. A batch sampler makes
every batch come from one bucket, so a batch stacks into one tensor; the size conditioning of
PixArt's MS models (`resolution`, `aspect_ratio`) is built per batch.

The bucket tables are diffusers' own (the ones `PixArtAlphaPipeline` bins requested sizes with),
so training buckets and the pipeline's inference sizes agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset, Sampler

from t2ilab.data.images import load_rgb, opened_image
from t2ilab.errors import UserError

BucketTable = Mapping[str, Sequence[float]]  # ratio string ("0.57") -> [height, width]


def _as_table(bins: BucketTable) -> dict[str, tuple[int, int]]:
    return {ratio: (int(h), int(w)) for ratio, (h, w) in bins.items()}


# diffusers' tables, with integer (height, width) values.
ASPECT_RATIO_1024 = _as_table(ASPECT_RATIO_1024_BIN)
ASPECT_RATIO_512 = _as_table(ASPECT_RATIO_512_BIN)
ASPECT_RATIO_256 = _as_table(ASPECT_RATIO_256_BIN)
_BASE_TABLES = {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024}


def _log_ratio(height: float, width: float) -> float:
    return math.log(height / width)


def _round_to(value: float, divisor: int) -> int:
    # Half up (not Python's round-half-even), and never below one divisor.
    return max(divisor, math.floor(value / divisor + 0.5) * divisor)


def bucket_table(resolution: int, divisor: int) -> dict[str, tuple[int, int]]:
    """The bucket table for base `resolution`: diffusers' table of the nearest base (256, 512 or
    1024, nearest in log scale) scaled by `resolution / base`, every side rounded to a multiple of
    `divisor` (the VAE downsampling factor times the transformer's patch size, e.g. 8 * 2 = 16).

    At small resolutions neighbouring ratios round to the same size; such duplicates become one
    bucket, keyed by the ratio string nearest to its actual height / width. The table is ordered
    by aspect ratio. For 256/512/1024 with a divisor of 16 it equals diffusers' table.
    """
    if divisor < 1 or resolution < divisor:
        raise ValueError(
            f"bucket_table needs 1 <= divisor <= resolution, got {divisor=}, {resolution=}"
        )
    base = min(_BASE_TABLES, key=lambda b: abs(math.log(resolution / b)))
    scale = resolution / base
    by_size: dict[tuple[int, int], str] = {}
    for ratio, (height, width) in _BASE_TABLES[base].items():
        size = (_round_to(height * scale, divisor), _round_to(width * scale, divisor))
        kept = by_size.get(size)
        target = _log_ratio(*size)
        if kept is None or abs(math.log(float(ratio)) - target) < abs(
            math.log(float(kept)) - target
        ):
            by_size[size] = ratio
    ordered = sorted(by_size.items(), key=lambda item: _log_ratio(*item[0]))
    return {ratio: size for size, ratio in ordered}


def assign_bucket(width: int, height: int, table: BucketTable) -> tuple[str, tuple[int, int]]:
    """(bucket key, (height, width)) of the bucket whose aspect ratio is closest in log space to
    that of a `width` x `height` image.

    The bucket's ratio is its actual height / width (not its key, which rounding may have moved
    away from it), so the crop that follows removes as little of the image as the table allows.
    Log space makes 2:1 and 1:2 equally far from 1:1. Ties go to the first bucket in the table.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not table:
        raise ValueError("the bucket table is empty")
    target = _log_ratio(height, width)
    key = min(table, key=lambda k: abs(_log_ratio(table[k][0], table[k][1]) - target))
    bucket_height, bucket_width = table[key]
    return key, (int(bucket_height), int(bucket_width))


_ORIENTATION = ExifTags.Base.Orientation
_SWAPS_SIDES = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as `load_rgb` returns it (upright), without decoding pixels.

    Reads the header and the EXIF orientation (orientations 5-8 swap the sides). `Image.getexif`
    of the base class is used on purpose: it only looks at what `open` parsed, whereas PNG's
    override decodes the whole image to search for an eXIf chunk after the pixel data (a rare
    layout; such an image is then bucketed by its stored size, which only costs crop quality).
    """
    with opened_image(path) as image:  # a UserError naming the file if it cannot be read
        width, height = image.size
        orientation = Image.Image.getexif(image).get(_ORIENTATION, 1)
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def _to_model_tensor(image: Image.Image) -> torch.Tensor:
    # The same mapping as ImageTransform: uint8 RGB -> float CHW in [-1, 1] (what the VAE expects).
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BucketResizeCrop:
    """Resize an RGB image to cover `height` x `width` (aspect ratio kept), center-crop it to
    exactly that size and map it to a float tensor (3, height, width) in [-1, 1].

    `PIL.ImageOps.fit` does the cover-and-crop: it crops the source to the target's aspect ratio
    and resizes that region, so no pixels outside the crop are resampled.
    """

    def __init__(self, height: int, width: int):
        self.height = int(height)
        self.width = int(width)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        fitted = ImageOps.fit(
            image, (self.width, self.height), Image.Resampling.BILINEAR, centering=(0.5, 0.5)
        )
        return _to_model_tensor(fitted)

    def __repr__(self) -> str:
        return f"BucketResizeCrop(height={self.height}, width={self.width})"


def resize_to_bucket(image: Image.Image, table: BucketTable) -> torch.Tensor:
    """An image resized and cropped to its own bucket of `table` (a transform for code that sees
    decoded images, e.g. a feature-cache encoder: `functools.partial(resize_to_bucket, table=t)`)."""
    _, (height, width) = assign_bucket(image.width, image.height, table)
    return BucketResizeCrop(height, width)(image)


class AspectRatioBucketSampler(Sampler[list[int]]):
    """A batch sampler (pass it as `DataLoader(batch_sampler=...)`) whose every batch holds
    indices of one bucket only.

    Each epoch, with a generator seeded by `seed + epoch` (see `set_epoch`), the indices of every
    bucket are shuffled and cut into batches of `batch_size` (a bucket's last batch is smaller,
    or dropped with `drop_last`), then the order of all batches is shuffled, so consecutive steps
    see different buckets. Same seed and epoch, same batches: on every rank and in every run.

    Distributed (DDP): each of `num_replicas` ranks takes every `num_replicas`-th batch of the
    epoch's shuffled list, starting at `rank`; the ranks' lists are disjoint and equally long.
    To keep them equally long (DDP hangs when ranks run different step counts) without serving
    an example twice, the last `total % num_replicas` batches of the shuffled list are left out;
    which ones changes every epoch. `num_replicas`/`rank` default to the initialized process
    group's (1 and 0 without one). With Lightning, pass `use_distributed_sampler=False` to the
    Trainer (it cannot inject its DistributedSampler into a custom batch sampler); Lightning still
    calls `set_epoch` every epoch, through the `sampler` attribute.
    """

    def __init__(
        self,
        bucket_ids: Sequence[Hashable],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if int(batch_size) < 1:
            raise UserError(f"data.batch_size={batch_size} must be at least 1")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got {rank=}, {num_replicas=}")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        # Buckets in order of first appearance: deterministic, unlike hash order.
        self.buckets: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            self.buckets.setdefault(bucket, []).append(index)
        count = math.floor if drop_last else math.ceil
        self.total_batches = sum(count(len(ix) / self.batch_size) for ix in self.buckets.values())
        self.num_batches = self.total_batches // self.num_replicas
        if self.num_batches == 0:
            sizes = sorted((len(ix) for ix in self.buckets.values()), reverse=True)
            raise UserError(
                f"aspect-ratio buckets give no batch per process: {len(bucket_ids)} images in "
                f"{len(sizes)} buckets (largest {sizes[:3] or [0]}), data.batch_size="
                f"{self.batch_size}, drop_last={drop_last}, {self.num_replicas} processes: "
                "lower data.batch_size or add images"
            )

    @property
    def sampler(self) -> AspectRatioBucketSampler:
        # Lightning's fit loop calls set_epoch on `dataloader.batch_sampler.sampler` (not on the
        # batch sampler itself); pointing it here makes the per-epoch reshuffle happen.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for indices in self.buckets.values():
            if self.shuffle:
                order = torch.randperm(len(indices), generator=generator).tolist()
                indices = [indices[i] for i in order]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    break
                batches.append(batch)
        if self.shuffle:
            order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in order]
        return batches[: self.num_batches * self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches


def size_conditioning(
    heights: Sequence[int] | torch.Tensor,
    widths: Sequence[int] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """PixArt-alpha MS micro-conditioning for a batch: `resolution` (B, 2) as [height, width] in
    pixels and `aspect_ratio` (B, 1) as height / width, the `added_cond_kwargs` of a
    `PixArtTransformer2DModel` with `use_additional_conditions=True`.

    Built as `PixArtAlphaPipeline` builds it at inference, where height and width are the pixel
    size of the (binned) image being generated: pass the bucket sizes here so training and
    sampling condition on the same quantities.
    """
    pairs = [(float(h), float(w)) for h, w in zip(heights, widths, strict=True)]
    resolution = torch.tensor(pairs, dtype=dtype, device=device).reshape(len(pairs), 2)
    aspect_ratio = torch.tensor([[h / w] for h, w in pairs], dtype=dtype, device=device)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio.reshape(len(pairs), 1)}


class BucketedCaptionDataset(Dataset):
    """(image, caption) pairs, each image resized and cropped to its aspect-ratio bucket.

    Image sizes are read from file headers (EXIF orientation applied) when the dataset is built,
    so `bucket_ids` (one bucket key per item) is ready for `AspectRatioBucketSampler` without
    decoding any image. An item is `{"pixel_values": (3, h, w) in [-1, 1], "height": h,
    "width": w, **tokenize(caption)}`, h and w being the bucket's size. `tokenize` maps a caption
    to a dict of 1-D tensors (e.g. `input_ids`, `attention_mask`); a leading batch dimension of
    1, as a Hugging Face tokenizer called with `return_tensors="pt"` gives, is removed.
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, str]],
        table: BucketTable,
        tokenize: Callable[[str], Mapping[str, Any]],
    ):
        self.items = [(Path(path), caption) for path, caption in items]
        self.table = table
        self.tokenize = tokenize
        self.original_sizes = [image_size(path) for path, _ in self.items]  # (width, height)
        assigned = [assign_bucket(w, h, table) for w, h in self.original_sizes]
        self.bucket_ids: list[str] = [key for key, _ in assigned]
        self.sizes: list[tuple[int, int]] = [size for _, size in assigned]  # (height, width)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.items[index]
        height, width = self.sizes[index]
        example: dict[str, Any] = {
            "pixel_values": BucketResizeCrop(height, width)(load_rgb(path)),
            "height": height,
            "width": width,
        }
        for name, value in self.tokenize(caption).items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == 1:
                value = value[0]
            example[name] = value
        return example


def collate_bucketed(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a one-bucket batch of `BucketedCaptionDataset` items and add its size conditioning
    (`resolution`, `aspect_ratio`, what `PixArtBackbone` passes as `added_cond_kwargs`)."""
    shapes = {tuple(e["pixel_values"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_bucketed got images of {len(shapes)} sizes {sorted(shapes)} in one batch: "
            "batch with AspectRatioBucketSampler(dataset.bucket_ids, ...) as batch_sampler"
        )
    batch: dict[str, Any] = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    for name in examples[0]:
        if name in ("pixel_values", "height", "width"):
            continue
        values = [e[name] for e in examples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch.update(size_conditioning([e["height"] for e in examples], [e["width"] for e in examples]))
    batch["num_instance"] = len(examples)  # no prior-preservation half (see collate_captioned)
    return batch
