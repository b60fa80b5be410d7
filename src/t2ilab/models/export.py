"""Exporting a trained module as a diffusers pipeline folder that stock diffusers loads."""

from __future__ import annotations

import logging
from pathlib import Path

from t2ilab.models.pipelines import make_sampler
from t2ilab.noise import inference_scheduler_config
from t2ilab.utils.atomic import atomic_directory

log = logging.getLogger(__name__)


def export_pipeline(module, out_dir: str | Path, scheduler: str = "DDIMScheduler") -> Path:
    """Write `module.pipeline(...)` with the schedule it was trained on to `out_dir`, atomically.

    The scheduler config carries the training betas as `trained_betas`, so swapping in any other
    sampler with `OtherScheduler.from_config(pipe.scheduler.config)` keeps the trained schedule.
    """
    out_dir = Path(out_dir)
    sampler = make_sampler(
        scheduler, inference_scheduler_config(module.noise_scheduler, module.noise)
    )
    pipe = module.pipeline(sampler)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("export: diffusers pipeline in %s", out_dir)
    return out_dir
