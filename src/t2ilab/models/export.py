"""Exports: each method's artefact in its standard format, written atomically, loadable in stock
diffusers; `load_export` is the inverse for evaluation and inference.

| method            | artefact in export/                         | stock diffusers                        |
| ----------------- | ------------------------------------------- | -------------------------------------- |
| full fine-tuning  | a pipeline folder (model_index.json, ...)    | StableDiffusionPipeline.from_pretrained |
| LoRA              | pytorch_lora_weights.safetensors             | pipe.load_lora_weights(export)          |
| textual inversion | learned_embeds.safetensors                   | pipe.load_textual_inversion(export)     |
| adapters          | adapters.safetensors (+ json)                | t2ilab.adapters.load_adapters(pipe, …)  |

Parameter-efficient exports also hold scheduler/ (the trained schedule, as trained_betas), and,
when the base model was built from config rather than loaded by id or folder, base_model/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from t2ilab.errors import UserError
from t2ilab.models.pipelines import build_sd_pipeline, make_sampler
from t2ilab.noise import inference_scheduler_config
from t2ilab.utils.atomic import atomic_directory, write_json_atomic

log = logging.getLogger(__name__)

# Beside the diffusers files (which ignore it): the method, base model and subject, which
# `python evaluate.py export_dir=...` reads to evaluate the export like its training run did.
METADATA_FILE = "t2ilab.json"
BASE_MODEL_DIR = "base_model"


def export_pipeline(
    module,
    out_dir: str | Path,
    scheduler: str = "DDIMScheduler",
    metadata: dict | None = None,
    base_components=None,
) -> Path:
    """Write `module`'s artefact (`module.save_artefact`) with the schedule it was trained with.

    The scheduler config carries the training betas as `trained_betas`, so swapping in any other
    sampler with `OtherScheduler.from_config(pipe.scheduler.config)` keeps the trained schedule.
    `base_components` (a StableDiffusionComponents) adds base_model/ for artefacts that need one.
    """
    out_dir = Path(out_dir)
    sampler = make_sampler(
        scheduler, inference_scheduler_config(module.noise_scheduler, module.noise)
    )
    with atomic_directory(out_dir) as tmp:
        module.save_artefact(tmp, sampler)
        if base_components is not None:
            c = base_components
            base = build_sd_pipeline(c.unet, c.vae, c.text_encoder, c.tokenizer, sampler)
            base.save_pretrained(tmp / BASE_MODEL_DIR, safe_serialization=True)
        write_json_atomic(tmp / METADATA_FILE, {"artefact": module.artefact, **(metadata or {})})
    log.info("export: %s in %s", module.artefact, out_dir)
    return out_dir


def read_metadata(export_dir: str | Path) -> dict:
    path = Path(export_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_export(export_dir: str | Path, base_model: str | None = None):
    """A ready pipeline for any t2ilab export (or any diffusers pipeline folder)."""
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    export_dir = Path(export_dir)
    if (export_dir / "model_index.json").is_file():  # SD, PixArt or DiT pipeline folder
        return DiffusionPipeline.from_pretrained(export_dir)
    metadata = read_metadata(export_dir)
    artefact = metadata.get("artefact")
    if artefact is None:
        raise UserError(
            f"{export_dir} is neither a diffusers pipeline folder (no model_index.json) nor a "
            f"t2ilab export (no {METADATA_FILE}): pass <run dir>/export"
        )
    base = base_model or metadata.get("base_model")
    if (export_dir / BASE_MODEL_DIR / "model_index.json").is_file() and not base_model:
        base = str(export_dir / BASE_MODEL_DIR)
    if not base:
        raise UserError(
            f"{export_dir} holds {artefact} weights but names no base model: set model.pretrained="
        )
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    if (export_dir / "scheduler").is_dir():
        pipe.scheduler = DDIMScheduler.from_pretrained(export_dir, subfolder="scheduler")
    if artefact == "lora":
        pipe.load_lora_weights(export_dir)
    elif artefact == "textual_inversion":
        pipe.load_textual_inversion(export_dir)
    elif artefact == "adapters":
        from t2ilab.adapters import load_adapters

        load_adapters(pipe, export_dir / "adapters.safetensors")  # modules.adapter.ADAPTERS_FILE
    else:
        raise UserError(f"{export_dir}: unknown artefact {artefact!r} in {METADATA_FILE}")
    return pipe
