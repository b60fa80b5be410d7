"""Exporting a trained module as a diffusers pipeline folder that stock diffusers loads."""

from __future__ import annotations

import logging
from pathlib import Path

from t2ilab.models.pipelines import make_sampler
from t2ilab.noise import inference_scheduler_config
from t2ilab.utils.atomic import atomic_directory, write_json_atomic

log = logging.getLogger(__name__)


# Beside the diffusers files (which ignore it): what `python evaluate.py export_dir=...` needs
# to evaluate the export like its training run did (identifier, class noun, subject folder).
METADATA_FILE = "t2ilab.json"


def export_pipeline(
    module, out_dir: str | Path, scheduler: str = "DDIMScheduler", metadata: dict | None = None
) -> Path:
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
        if metadata:
            write_json_atomic(Path(tmp) / METADATA_FILE, metadata)
    log.info("export: diffusers pipeline in %s", out_dir)
    return out_dir
