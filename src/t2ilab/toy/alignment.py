"""Text-image alignment of a toy text-to-image model at the end of training (`eval=toy_alignment`):
images for the dense captions of fresh scenes, scored by reading their colours and shape from
the pixels (`quality.prompt_following`). The metrics go into results.json, so a sweep's table
comes from `python -m t2ilab.analysis.collect`; the images go into <run>/samples/alignment.png.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from t2ilab.models.pipelines import make_sampler
from t2ilab.noise import inference_scheduler_config
from t2ilab.toy import quality
from t2ilab.utils.atomic import save_image_atomic
from t2ilab.utils.images import make_grid

log = logging.getLogger(__name__)


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
            inference_scheduler_config(module.noise_scheduler, module.noise),
        )
        pipe = module.pipeline(sampler).to(device)
        scenes = quality.sd_color_scenes(int(alignment_cfg["seed"]), int(alignment_cfg["n"]))
        images = quality.prompt_following_images(
            pipe,
            scenes,
            seed=int(alignment_cfg["seed"]),
            steps=int(alignment_cfg["num_inference_steps"]),
            guidance=float(alignment_cfg["guidance_scale"]),
        )
    finally:
        module.train(was_training)
    scores = quality.prompt_following(scenes, images)
    # The render_* checks must be 1.0; only the model's own scores go to the results table.
    if min(v for k, v in scores.items() if k.startswith("render_")) < 1.0:
        log.warning("toy alignment: the pixel readers miss on renders: %s", scores)
    metrics = {k: v for k, v in scores.items() if not k.startswith("render_")}
    shown = int(alignment_cfg.get("grid_images", 16))
    captions = [quality.dense_caption(s) for s in scenes[:shown]]
    grid = make_grid(images[:shown], rows=max(1, shown // 8), captions=captions)
    path = Path(output_dir) / "samples" / "alignment.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(grid, path)
    log.info("toy alignment %s (images: %s)", metrics, path)
    return metrics
