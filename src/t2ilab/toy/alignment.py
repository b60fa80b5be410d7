"""Prompt following of a toy text-to-image model, read from the pixels (`quality`): at the end
of training (`eval=toy_alignment`) or on any exported toy pipeline:

    python -m t2ilab.toy.alignment models/toy/toy_pixart
    python -m t2ilab.toy.alignment runs/toy_pixart/stage1/export     # a class-conditional DiT

A text-to-image pipeline gets the dense captions of fresh scenes (a large plain shape on a plain
background) and is scored on background colour, object colour and shape (`prompt_following`).
A class-conditional DiT (PixArt's stage 1, whose class is the shape) gets the scenes' shape
labels and is scored on shape alone. In training the metrics go into results.json, so a sweep's
table comes from `python -m t2ilab.analysis.collect`; the images into <run>/samples/alignment.png.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from PIL import Image

from t2ilab.models.pipelines import make_sampler
from t2ilab.toy import quality
from t2ilab.toy.world import SHAPES, Scene
from t2ilab.utils.atomic import save_image_atomic
from t2ilab.utils.images import make_grid

log = logging.getLogger(__name__)


def is_class_conditional(pipe) -> bool:
    return type(pipe).__name__ == "DiTPipeline"


def class_conditional_images(
    pipe, scenes: list[Scene], seed: int, steps: int, guidance: float, batch_size: int = 32
) -> list[Image.Image]:
    """One image per scene's shape label (class id i is SHAPES[i], as the toy stage 1 trains)."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    return quality.batched_images(
        lambda batch: pipe(class_labels=[SHAPES.index(s.shape) for s in batch], **kwargs),
        scenes,
        batch_size,
    )


def read_shapes(images: list[Image.Image]) -> list[str | None]:
    """The shape each image shows, when nothing names the colours (`quality.read_shape_unnamed`)."""
    return [quality.read_shape_unnamed(image) for image in images]


def class_shape_accuracy(asked: list[str], read: list[str | None]) -> dict[str, float]:
    return {"shape_acc": float(np.mean([r == a for r, a in zip(read, asked, strict=True)]))}


def shape_breakdown(asked: list[str], read: list[str | None]) -> str:
    """One line per shape asked for: how many came out as asked, and what the misses were
    drawn as, most often first (a class a model has not learned shows here, not in the mean)."""
    lines = []
    for shape in [s for s in SHAPES if s in asked]:
        got = [r for a, r in zip(asked, read, strict=True) if a == shape]
        misses = Counter(str(r) for r in got if r != shape).most_common()
        missed = ", ".join(f"{m} {k}" for m, k in misses)
        lines.append(
            f"  {shape:<8} {got.count(shape):>4}/{len(got)}"
            + (f"  (drawn as {missed})" if misses else "")
        )
    return "\n".join(lines)


class AlignmentScore(NamedTuple):
    metrics: dict[str, float]
    images: list[Image.Image]
    labels: list[str]  # a short label of what each image was asked for
    read: list[str | None] | None = None  # a DiT's shapes as read from its images


@torch.no_grad()
def score_pipeline(
    pipe, n: int = 64, seed: int = quality.EVAL_SEED, steps: int = 25, guidance: float = 4.0
) -> AlignmentScore:
    """The metrics and images of a toy pipeline. Labels: the shape label for a
    class-conditional DiT (whose shapes as read come along, for `shape_breakdown`),
    "<colour> <shape> / on <background>" (the attributes the dense caption names and the
    score reads) for a text-to-image pipeline."""
    scenes = quality.sd_color_scenes(seed, n)
    if is_class_conditional(pipe):
        images = class_conditional_images(pipe, scenes, seed, steps, guidance)
        asked, read = [s.shape for s in scenes], read_shapes(images)
        return AlignmentScore(class_shape_accuracy(asked, read), images, asked, read)
    images = quality.prompt_following_images(pipe, scenes, seed, steps, guidance)
    scores = quality.prompt_following(scenes, images)
    # The render_* checks must be 1.0; only the model's own scores are reported.
    if min(v for k, v in scores.items() if k.startswith("render_")) < 1.0:
        log.warning("toy alignment: the pixel readers miss on renders: %s", scores)
    metrics = {k: v for k, v in scores.items() if not k.startswith("render_")}
    return AlignmentScore(
        metrics, images, [f"{s.color} {s.shape}\non {s.background}" for s in scenes]
    )


def save_grid(images: list[Image.Image], labels: list[str], path: Path, shown: int = 16) -> Path:
    """The first `shown` images in rows of at most 8, each under the short label of what it
    was asked for."""
    shown = min(shown, len(images))
    grid = make_grid(images[:shown], rows=max(1, -(-shown // 8)), labels=labels[:shown])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(grid, path)
    return path


@torch.no_grad()
def evaluate_alignment(module, alignment_cfg: dict[str, Any], output_dir: Path, device) -> dict:
    """`alignment_cfg`: n (scenes), seed, num_inference_steps, guidance_scale, scheduler,
    grid_images (how many go into the grid). Runs on the module's weights as they are: call
    it inside `module.for_inference()` to score the EMA weights."""
    was_training = module.training
    module.eval()
    try:
        sampler = make_sampler(
            alignment_cfg["scheduler"],
            module.objective.inference_config(),
        )
        metrics, images, labels, _ = score_pipeline(
            module.pipeline(sampler).to(device),
            n=int(alignment_cfg["n"]),
            seed=int(alignment_cfg["seed"]),
            steps=int(alignment_cfg["num_inference_steps"]),
            guidance=float(alignment_cfg["guidance_scale"]),
        )
    finally:
        module.train(was_training)
    path = save_grid(
        images, labels, Path(output_dir) / "samples" / "alignment.png", alignment_cfg["grid_images"]
    )
    log.info("toy alignment %s (images: %s)", metrics, path)
    return metrics


class ToyAlignmentCallback(L.Callback):
    """eval=toy_alignment during training: the prompt following of a toy model, scored once
    training ends (on the EMA weights when EMA is on), logged as eval/<metric> and kept in
    `last_metrics` for results.json."""

    def __init__(self, settings: dict[str, Any], output_dir: str):
        self.settings = dict(settings)
        self.output_dir = Path(output_dir)
        self.last_metrics: dict[str, float] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        with pl_module.for_inference():
            metrics = evaluate_alignment(
                pl_module, self.settings, self.output_dir, pl_module.device
            )
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, trainer.global_step)
        self.last_metrics = metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an exported toy pipeline folder")
    parser.add_argument("--n", type=int, default=64, help="scenes (default 64)")
    parser.add_argument("--seed", type=int, default=quality.EVAL_SEED)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--grid", type=Path, help="also save the first 16 images here (PNG)")
    args = parser.parse_args(argv)
    from diffusers import DDIMScheduler, DiffusionPipeline

    if not (args.export / "model_index.json").is_file():
        raise SystemExit(f"error: {args.export} is not a pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(args.export)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    pipe.set_progress_bar_config(disable=True)
    metrics, images, labels, read = score_pipeline(
        pipe, args.n, args.seed, args.steps, args.guidance
    )
    if args.grid:
        save_grid(images, labels, args.grid)
    if read is not None:  # a class-conditional DiT: labels are the shapes asked for
        print("drawn as asked, by shape:\n" + shape_breakdown(labels, read))
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
