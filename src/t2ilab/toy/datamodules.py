"""Text-to-image data rendered on the fly from the toy world (t2ilab.toy.world).

Used to pretrain the toy diffusion models: every example is a fresh render with its exact
caption, so there are no files to write and no fixed dataset to overfit. An "epoch" is `size`
renders; example i of epoch e is draw e * size + i (t2ilab.data.loader), rendered as scene
(seed, draw), so every epoch sees new scenes and a resumed run sees the same ones as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.base import T2IDataModule
from t2ilab.data.captioned import collate_captioned
from t2ilab.data.class_folder import collate_classes
from t2ilab.data.dreambooth import tokenize
from t2ilab.data.loader import draw_rng, resumable_loader
from t2ilab.errors import UserError
from t2ilab.toy.world import (
    OPTIONAL_ATTRIBUTES,
    SHAPES,
    class_caption,
    dense_caption,
    image_to_tensor,
    partial_caption,
    render,
    scene_at,
)

CAPTION_KINDS = ("dense", "class", "mixed", "partial")
# caption=partial: the share of dense and of class-only captions; the rest state a random subset
# of the attributes, as people write prompts ("a star on a blue background").
PARTIAL_DENSE, PARTIAL_CLASS = 0.25, 0.25


class ToyWorldScenes(Dataset):
    """Draw d (epoch * size + i, see t2ilab.data.loader) is scene (seed, d) at `resolution`:
    new scenes every epoch, the same ones after a resume.

    With `curriculum_draws` N, draw d shows its object large and centred with probability
    1 - d / N (its shape, colours, pattern, background and caption words stay the scene's own),
    so training starts on the objects whose outline is easiest to see and reaches the whole
    world at draw N. `curriculum_floor` f keeps that probability at f or above for good: a model
    that moves on to the whole world keeps practising the large outlines it learned first.

    `shape_weights` (shape -> relative weight; unlisted shapes weigh 1) redraws each scene's
    shape in those proportions, from a stream of its own, so the rest of the scene is the same
    draw as without it: more practice for a shape a model is slow to learn."""

    def __init__(
        self,
        size: int,
        seed: int,
        resolution: int,
        shapes: tuple[str, ...] = SHAPES,
        curriculum_draws: int = 0,
        curriculum_floor: float = 0.0,
        shape_weights: dict[str, float] | None = None,
    ):
        self.size, self.seed, self.resolution = int(size), int(seed), resolution
        self.shapes = tuple(shapes)
        self.curriculum_draws = int(curriculum_draws)
        self.curriculum_floor = float(curriculum_floor)
        weights = dict(shape_weights or {})
        self.shape_weights = [float(weights.get(s, 1.0)) for s in self.shapes] if weights else None

    def __len__(self) -> int:
        return self.size

    def scene(self, draw: int):
        scene = scene_at(self.seed, draw, shapes=self.shapes)
        if self.shape_weights is not None:
            rng = random.Random(f"{self.seed}/{draw}/shape")
            shape = rng.choices(self.shapes, weights=self.shape_weights)[0]
            scene = dataclasses.replace(scene, shape=shape)
        easy_share = 1.0 - draw / self.curriculum_draws if self.curriculum_draws > 0 else 0.0
        easy_share = max(easy_share, self.curriculum_floor)
        # A stream of its own, so that the curriculum does not move the caption choices.
        if easy_share > 0 and random.Random(f"{self.seed}/{draw}/curriculum").random() < easy_share:
            scene = dataclasses.replace(scene, size="large", position="center")
        return scene

    def pixels(self, scene) -> torch.Tensor:
        return image_to_tensor(render(scene, self.resolution))


class ToyWorldTextImages(ToyWorldScenes):
    """(render, tokenized caption) pairs; `caption` dense, class-only, mixed (each example
    dense or class with equal odds) or partial (dense, class-only or a random subset of the
    attributes); "" with probability `caption_dropout` (for CFG)."""

    def __init__(
        self,
        tokenizer,
        size: int,
        seed: int,
        resolution: int,
        caption: str = "dense",
        caption_dropout: float = 0.0,
        shapes: tuple[str, ...] = SHAPES,
        curriculum_draws: int = 0,
        curriculum_floor: float = 0.0,
        shape_weights: dict[str, float] | None = None,
    ):
        super().__init__(
            size, seed, resolution, shapes, curriculum_draws, curriculum_floor, shape_weights
        )
        self.tokenizer, self.caption, self.caption_dropout = tokenizer, caption, caption_dropout
        self.empty_ids = tokenize(tokenizer, "")

    def caption_for(self, scene, rng) -> str:
        kind = self.caption
        if kind == "mixed":
            kind = "dense" if rng.random() < 0.5 else "class"
        if kind == "partial":
            u = rng.random()
            if u < PARTIAL_DENSE:
                kind = "dense"
            elif u < PARTIAL_DENSE + PARTIAL_CLASS:
                kind = "class"
            else:
                stated = [a for a in OPTIONAL_ATTRIBUTES if rng.random() < 0.5]
                return partial_caption(scene, stated)
        return dense_caption(scene) if kind == "dense" else class_caption(scene)

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        scene = self.scene(draw)
        rng = draw_rng(self.seed, draw)  # caption choices, per example
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        caption = "" if drop else self.caption_for(scene, rng)
        ids = self.empty_ids if drop else tokenize(self.tokenizer, caption)
        return {"pixel_values": self.pixels(scene), "input_ids": ids, "prompt": caption}


class ToyWorldClassImages(ToyWorldScenes):
    """(render, shape id) pairs for class-conditional training (PixArt's stage 1 on the toy
    world: the shape is the class, as ImageNet's label is for the real stage 1); the same
    scenes, epoch by epoch, as ToyWorldTextImages with the same seed."""

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        scene = self.scene(draw)
        label = torch.tensor(self.shapes.index(scene.shape))
        return {"pixel_values": self.pixels(scene), "class_labels": label}


class ToyWorldDataModule(T2IDataModule):
    """Toy-world pretraining data: renders need no cache (nothing is read from disk)."""

    collate = staticmethod(collate_captioned)

    def __init__(
        self,
        size: int = 50_000,
        seed: int = 0,
        resolution: int = 64,
        caption: str = "dense",
        caption_dropout: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 1,
        validation_prompts: list[str] | None = None,
        shapes: list[str] | None = None,
        curriculum_steps: int = 0,
        curriculum_floor: float = 0.0,
        shape_weights: dict[str, float] | None = None,
        cache: dict | None = None,  # no caching: check() refuses data.cache.latents/text=true
        **_ignored,
    ):
        super().__init__(cache, **_ignored)
        self.curriculum_steps, self.curriculum_floor = curriculum_steps, curriculum_floor
        self.size, self.seed, self.resolution = size, seed, resolution
        self.caption, self.caption_dropout = caption, caption_dropout
        self.batch_size, self.num_workers = batch_size, num_workers
        self._validation_prompts = list(validation_prompts or [])
        self.shapes = tuple(shapes) if shapes else SHAPES
        self.shape_weights = shape_weights  # checked in check(): a mapping of shape -> weight
        self.dataset: ToyWorldTextImages | None = None

    def check(self) -> None:
        super().check()
        if self.caption not in CAPTION_KINDS:
            raise UserError(f"data.caption={self.caption}: use one of {', '.join(CAPTION_KINDS)}")
        if not 0.0 <= float(self.caption_dropout) <= 1.0:
            raise UserError(
                f"data.caption_dropout={self.caption_dropout} is not a probability: use 0.0 to 1.0"
            )
        if int(self.batch_size) < 1 or int(self.size) < 1:
            raise UserError("data.batch_size and data.size must be at least 1")
        if int(self.curriculum_steps) < 0:
            raise UserError(
                f"data.curriculum_steps={self.curriculum_steps}: use 0 (off) or the number of "
                "steps over which large centred objects give way to the whole world"
            )
        if not 0.0 <= float(self.curriculum_floor) <= 1.0:
            raise UserError(
                f"data.curriculum_floor={self.curriculum_floor} is not a share: use 0.0 (the "
                "whole world after the curriculum) to 1.0 (large centred objects only)"
            )
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise UserError(f"data.shapes: unknown {unknown}; the toy world has {list(SHAPES)}")
        self._check_shape_weights()

    def _check_shape_weights(self) -> None:
        weights = self.shape_weights
        if weights is None:
            return
        if not isinstance(weights, Mapping):
            raise UserError(
                f"data.shape_weights={weights}: give shapes and their weights, e.g. "
                "'data.shape_weights={hexagon: 3}' (unlisted shapes weigh 1)"
            )
        unknown = [s for s in weights if s not in self.shapes]
        if unknown:
            raise UserError(
                f"data.shape_weights names {unknown}, which this run does not draw; use shapes "
                f"of {list(self.shapes)}"
            )
        values = [weights.get(s, 1.0) for s in self.shapes]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if not numbers or min(values) < 0 or max(values) <= 0:
            raise UserError(
                f"data.shape_weights={dict(weights)}: weights are relative draw counts, 0 or "
                "more, with at least one shape above 0 (unlisted shapes weigh 1)"
            )

    def validation_prompts(self) -> list[str]:
        return self._validation_prompts

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("ToyWorldDataModule.bind(tokenizer) must run before setup")
        self.dataset = ToyWorldTextImages(
            self.tokenizer,
            self.size,
            self.seed,
            self.resolution,
            self.caption,
            self.caption_dropout,
            self.shapes,
            self.curriculum_draws,
            float(self.curriculum_floor),
            self.shape_weights,
        )

    @property
    def curriculum_draws(self) -> int:
        return int(self.curriculum_steps) * int(self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,  # every draw is already a random scene
            num_workers=self.num_workers,
            collate_fn=self.collate,
            drop_last=True,
        )


class ToyWorldClassDataModule(ToyWorldDataModule):
    """Toy-world renders labelled with their shape, for a class-conditional DiT (PixArt's
    stage 1). `classes` and `id2label` are what train.py checks and the export records."""

    collate = staticmethod(collate_classes)

    @property
    def classes(self) -> list[str]:
        return list(self.shapes)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.shapes))

    def setup(self, stage: str | None = None) -> None:
        self.dataset = ToyWorldClassImages(
            self.size,
            self.seed,
            self.resolution,
            self.shapes,
            self.curriculum_draws,
            float(self.curriculum_floor),
            self.shape_weights,
        )
