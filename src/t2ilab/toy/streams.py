"""Pretraining streams for the toy VAE, CLIP and DINO, rendered on the fly from the toy world.

Item i of a stream is a pure function of (seed, i), like `scene_at`, so every run with the same
seed sees the same images in the same order and nothing is stored.

- `Renders`: images of the world for the VAE, now and then with a subject-like feature
  (two-colour stripes, a central spot) so the codec also reproduces the subjects' details.
- `CaptionedRenders`: (image, caption) pairs for CLIP. Half the captions are the dense caption,
  half state a random subset of the attributes ("a red star", "a large star, top left"), so the
  text tower also embeds short prompts. Each caption carries the attributes it states, which
  decide which images of a batch it is true of (the contrastive targets).
- `ObjectViews`: two renders of one object (same shape, colours and pattern) with different
  background, size, position and pose, for the self-supervised DINO stand-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from t2ilab.toy.world import (
    BACKGROUNDS,
    COLORS,
    MAX_JITTER,
    OPTIONAL_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    SIZES,
    SUBJECT_MAX_ROTATION,
    Scene,
    dense_caption,
    image_to_tensor,
    partial_caption,
    render,
    scene_at,
)

# Fields that make an object's appearance, and the ones a view changes.
APPEARANCE_FIELDS = (
    "shape",
    "color",
    "pattern",
    "pattern_color",
    "second_pattern_color",
    "spot_color",
)


def _pick(rng: np.random.Generator, values):
    values = tuple(values)
    return values[int(rng.integers(len(values)))]


def object_at(seed: int, index: int, extras_prob: float = 0.0) -> Scene:
    """Scene `index` of the world; with probability `extras_prob` it also gets what only the
    DreamBooth subjects have (a second stripe colour, or a central spot of another colour)."""
    scene = scene_at(seed, index)
    rng = np.random.default_rng([seed, index, 7])
    extra, spot = rng.random() < extras_prob, rng.random() < 0.5
    others = [c for c in COLORS if c not in (scene.color, scene.pattern_color)]
    first, second = _pick(rng, others), _pick(rng, others)
    if not extra:
        return scene
    if scene.pattern == "stripes" and not spot:
        return dataclasses.replace(scene, second_pattern_color=first)
    return dataclasses.replace(scene, spot_color=second)


def random_view(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same object elsewhere: new background, size, position, pose (up to the subjects'
    35 degrees) and jitter; the appearance fields stay."""
    return dataclasses.replace(
        scene,
        background=_pick(rng, (b for b in BACKGROUNDS if b != scene.color)),
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS),
        rotation=round(float(rng.uniform(-SUBJECT_MAX_ROTATION, SUBJECT_MAX_ROTATION)), 2),
        jitter=tuple(round(float(j), 4) for j in rng.uniform(-MAX_JITTER, MAX_JITTER, size=2)),
    )


def contrast_share(contrast: tuple[float, float], progress: float) -> float:
    """The share of high-contrast scenes at `progress` (0..1) through a stream: linear from
    `contrast[0]` to `contrast[1]`."""
    start, end = contrast
    return start + (end - start) * progress


def high_contrast(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene as a white shape on black or a black one on white, plain.

    A curriculum: the shape is the hardest attribute to see (the figure has to be told from an
    arbitrarily coloured ground) and a small ViT plateaus for ~1500 steps before it does; on
    black and white it learns shapes within a few hundred, and then transfers them to colour."""
    color, background = ("white", "black") if rng.random() < 0.5 else ("black", "white")
    return dataclasses.replace(
        scene, color=color, background=background, pattern="plain", pattern_color=None
    )


def appearance(scene: Scene) -> tuple:
    """What makes two renders "the same object" for the DINO stand-in."""
    return tuple(getattr(scene, field) for field in APPEARANCE_FIELDS)


# --- captions ------------------------------------------------------------------------------------


def caption_constraints(scene: Scene, stated: Iterable[str]) -> dict:
    """What a caption claims about an image, as field -> value. A caption without a pattern
    phrase claims "plain" only when it states everything else too (a dense caption); a short
    one ("a red star") is also true of a red star with dots."""
    stated = set(stated)
    claims = {"shape": scene.shape}
    for field in ("size", "color", "background", "position"):
        if field in stated:
            claims[field] = getattr(scene, field)
    if "pattern" in stated and (scene.pattern != "plain" or stated >= set(OPTIONAL_ATTRIBUTES)):
        claims["pattern"] = scene.pattern
        claims["pattern_color"] = scene.pattern_color
    return claims


def caption_is_true(claims: dict, scene: Scene) -> bool:
    return all(getattr(scene, field) == value for field, value in claims.items())


def sample_stated(rng: np.random.Generator, dense_prob: float) -> tuple[str, ...]:
    """Which attributes a training caption states: all of them with `dense_prob`, else each
    with probability 1/2 (the colour, the most asked-for attribute, with 3/4)."""
    dense = rng.random() < dense_prob
    draws = rng.random(len(OPTIONAL_ATTRIBUTES))
    if dense:
        return OPTIONAL_ATTRIBUTES
    keep = [0.5, 0.75, 0.5, 0.5, 0.5]
    return tuple(a for a, u, p in zip(OPTIONAL_ATTRIBUTES, draws, keep, strict=True) if u < p)


# --- datasets ------------------------------------------------------------------------------------


def _check_index(index: int, size: int) -> None:
    if not 0 <= index < size:  # also ends iteration over a dataset
        raise IndexError(f"index {index} out of range for {size} items")


class Renders(Dataset):
    """Images of the world (`extras_prob`: share with a subject-like feature), [3, H, W] in
    [-1, 1]."""

    def __init__(self, size: int, seed: int, resolution: int = 64, extras_prob: float = 0.0):
        self.size, self.seed, self.resolution, self.extras_prob = (
            size,
            seed,
            resolution,
            extras_prob,
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        _check_index(index, self.size)
        scene = object_at(self.seed, index, self.extras_prob)
        return image_to_tensor(render(scene, self.resolution))


class CaptionedRenders(Dataset):
    """(image, caption, claims, scene) with a dense caption with probability `dense_prob`,
    else a partial one.

    Items come in groups of `group_size` scenes that differ only in their shape (same colour,
    background, size, position, pattern, pose; captions stating the same attributes): without
    such hard negatives a batch is told apart by colour, background and position alone, and
    the text tower learns to ignore the shape word."""

    def __init__(
        self,
        size: int,
        seed: int,
        resolution: int = 64,
        dense_prob: float = 0.5,
        group_size: int = 2,
        contrast: tuple[float, float] = (0.0, 0.0),
    ):
        if not 1 <= group_size <= len(SHAPES):
            raise ValueError(f"group_size={group_size}: use 1 to {len(SHAPES)}")
        self.size, self.seed, self.resolution = size, seed, resolution
        self.dense_prob, self.group_size, self.contrast = dense_prob, group_size, tuple(contrast)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[Scene, tuple[str, ...]]:
        """Scene `index` and the attributes its caption states."""
        group, member = divmod(index, self.group_size)
        scene = scene_at(self.seed, group)
        rng = np.random.default_rng([self.seed, group, 3])
        stated = sample_stated(rng, self.dense_prob)
        if rng.random() < contrast_share(self.contrast, index / self.size):
            scene = high_contrast(scene, rng)
        others = [s for s in SHAPES if s != scene.shape]
        shapes = [scene.shape] + [others[j] for j in rng.permutation(len(others))]
        return dataclasses.replace(scene, shape=shapes[member]), stated

    def __getitem__(self, index: int) -> dict:
        _check_index(index, self.size)
        scene, stated = self.scene(index)
        caption = partial_caption(scene, stated)
        if stated == OPTIONAL_ATTRIBUTES:
            assert caption == dense_caption(scene)
        return {
            "image": image_to_tensor(render(scene, self.resolution)),
            "caption": caption,
            "claims": caption_constraints(scene, stated),
            "scene": scene,
        }


def collate_captioned(batch: list[dict]) -> dict:
    """Images stacked; `match[t, i]`: caption t is true of image i (the diagonal always)."""
    scenes = [item["scene"] for item in batch]
    match = torch.tensor(
        [[caption_is_true(item["claims"], scene) for scene in scenes] for item in batch]
    )
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "match": match,
    }


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The softness a decoder gives a render: a Gaussian blur (radius 0.3-1.5 px) or a round
    trip through a lower resolution (20-40 px). Real DINO shrugs off SD's VAE; a toy one trained
    only on crisp renders scored the subject's own VAE round trips 0.52 (issue 16)."""
    side = image.width
    if rng.random() < 0.5:
        return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    low = int(rng.integers(20, 41))
    return image.resize((low, low), Image.BILINEAR).resize((side, side), Image.BICUBIC)


class ObjectViews(Dataset):
    """Two views of object i: {"views": [2, 3, H, W], "key": its appearance}; each view is
    softened by `degrade` with probability `degrade_prob`."""

    def __init__(
        self,
        size: int,
        seed: int,
        resolution: int = 64,
        extras_prob: float = 0.25,
        degrade_prob: float = 0.0,
    ):
        self.size, self.seed, self.resolution, self.extras_prob = (
            size,
            seed,
            resolution,
            extras_prob,
        )
        self.degrade_prob = degrade_prob

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        _check_index(index, self.size)
        scene = object_at(self.seed, index, self.extras_prob)
        rng = np.random.default_rng([self.seed, index, 11])
        views = [render(random_view(scene, rng), self.resolution) for _ in range(2)]
        if self.degrade_prob > 0:  # its own stream: views stay those of degrade_prob = 0
            soft = np.random.default_rng([self.seed, index, 19])
            views = [degrade(v, soft) if soft.random() < self.degrade_prob else v for v in views]
        return {
            "views": torch.stack([image_to_tensor(v) for v in views]),
            "key": appearance(scene),
        }


def collate_views(batch: list[dict]) -> dict:
    """Views stacked; `same[i, j]`: objects i and j look the same (the diagonal always)."""
    keys = [item["key"] for item in batch]
    return {
        "views": torch.stack([item["views"] for item in batch]),
        "same": torch.tensor([[a == b for b in keys] for a in keys]),
    }
