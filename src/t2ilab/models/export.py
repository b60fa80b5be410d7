"""Exports: each method's artefact in its standard format, written atomically, loadable in stock
diffusers; `load_export` is the inverse for evaluation and inference.

| method            | artefact in export/                         | stock diffusers                        |
| ----------------- | ------------------------------------------- | -------------------------------------- |
| full fine-tuning  | a pipeline folder (model_index.json, ...)    | DiffusionPipeline.from_pretrained       |
|                   | (DiT: class labels in model_index.json)     |                                        |
| LoRA on SD, SDXL  | pytorch_lora_weights.safetensors             | pipe.load_lora_weights(export)          |
| LoRA on PixArt,   | adapter_config.json + adapter_model         | PeftModel.from_pretrained(              |
| DiT               | .safetensors (peft's format)                 |     pipe.transformer, export)           |
| textual inversion | learned_embeds.safetensors (SDXL: and        | pipe.load_textual_inversion(export)     |
|                   | learned_embeds_2.safetensors)                | (SDXL: one call per text encoder)       |
| adapters          | adapters.safetensors (+ json)                | t2ilab.adapters.load_adapters(pipe, …)  |

Parameter-efficient exports also hold scheduler/ (the trained schedule, as trained_betas), and,
when the base model was built from config rather than loaded by id or folder, base_model/.

t2ilab.json records the run (method, model, base model, subject, evaluation) so that
`python evaluate.py export_dir=...` measures the export as its run did. Exports are portable:
a path inside the project (T2ILAB_ROOT) is recorded relative to it (`models/toy/toy_sd`) and
read against the project root of whoever loads it; hub ids stay hub ids; paths elsewhere stay
absolute (`model.pretrained=...` overrides a base model that cannot be found).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError
from t2ilab.models.pipelines import make_sampler
from t2ilab.models.sources import is_local_reference
from t2ilab.utils.atomic import atomic_directory, write_json_atomic

log = logging.getLogger(__name__)

# Beside the diffusers files (which ignore it): the method, model, base model, subject and
# evaluation, which `python evaluate.py export_dir=...` reads to evaluate the export as its run did.
METADATA_FILE = "t2ilab.json"
BASE_MODEL_DIR = "base_model"
BASE_MODEL_FIX = "set model.pretrained=<folder or hub id> of the model it was trained on"


def project_root() -> Path:
    """T2ILAB_ROOT (train.py and evaluate.py set it to the checkout), else the working folder."""
    return Path(os.environ.get("T2ILAB_ROOT") or ".").resolve()


def portable_path(value: str | None, may_be_hub_id: bool = True) -> str | None:
    """How t2ilab.json records a model or folder: relative to the project root when inside it,
    absolute when elsewhere; a hub id as it is."""
    if not value or (may_be_hub_id and not is_local_reference(str(value))):
        return value
    path = Path(value).expanduser().resolve()
    try:
        return path.relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


def resolve_recorded_path(value: str | None, may_be_hub_id: bool = True) -> str | None:
    """The inverse of `portable_path` on this machine: a relative path is the project root's
    (a model reference that is not there and has the shape of a hub id, `org/name`, is one)."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    in_project = project_root() / path
    if in_project.exists() or not may_be_hub_id or is_local_reference(value):
        return str(in_project)
    return value


# Recorded paths: (key in t2ilab.json or in its "eval", whether it may name a hub model).
_PATH_KEYS = {"base_model": True, "instance_dir": False}
_EVAL_PATH_KEYS = {"dino_model": True, "clip_model": True, "reference_dir": False}


def _map_paths(metadata: dict[str, Any], convert) -> dict[str, Any]:
    def mapped(values: dict[str, Any], keys: dict[str, bool]) -> dict[str, Any]:
        return {
            k: convert(v, keys[k]) if k in keys and isinstance(v, str) else v
            for k, v in values.items()
        }

    out = mapped(metadata, _PATH_KEYS)
    if isinstance(out.get("eval"), dict):
        out["eval"] = mapped(out["eval"], _EVAL_PATH_KEYS)
    return out


def export_metadata(
    cfg: DictConfig, experiment: str, subject: dict[str, Any], dreambooth_evaluated: bool
) -> dict[str, Any]:
    """What t2ilab.json records about the run besides the artefact: its model and base, subject,
    and evaluation (the `eval=` preset and its resolved settings, `enabled` only when the
    DreamBooth protocol actually ran), with portable paths."""
    from hydra.core.hydra_config import HydraConfig

    evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
    evaluation["enabled"] = bool(evaluation.get("enabled")) and dreambooth_evaluated
    preset = HydraConfig.get().runtime.choices.get("eval") if HydraConfig.initialized() else None
    metadata = {
        "experiment": experiment,
        "method": cfg.method.name,
        "model": {
            "name": cfg.model.name,
            "family": cfg.model.get("family", "sd"),
            "resolution": int(cfg.model.resolution),
            "toy_world": bool(cfg.model.get("toy_world", False)),
        },
        "base_model": cfg.model.pretrained,
        **subject,
        "eval_preset": preset,
        "eval": evaluation,
    }
    return _map_paths(metadata, portable_path)


def export_pipeline(
    module,
    out_dir: str | Path,
    scheduler: str | None = None,
    metadata: dict | None = None,
    base_components=None,
) -> Path:
    """Write `module`'s artefact (`module.save_artefact`) with the schedule it was trained with.

    The scheduler config carries the training betas as `trained_betas`, so swapping in any other
    sampler with `OtherScheduler.from_config(pipe.scheduler.config)` keeps the trained schedule.
    `base_components` (a Backbone) adds base_model/ for artefacts that need one.
    """
    out_dir = Path(out_dir)
    sampler = make_sampler(scheduler, module.objective.inference_config())
    with atomic_directory(out_dir) as tmp:
        module.save_artefact(tmp, sampler)
        if base_components is not None:  # a Backbone built from config
            base_components.save_pipeline(tmp / BASE_MODEL_DIR, sampler)
        write_json_atomic(tmp / METADATA_FILE, {"artefact": module.artefact, **(metadata or {})})
    log.info("export: %s in %s", module.artefact, out_dir)
    return out_dir


def read_metadata(export_dir: str | Path) -> dict:
    """The export's t2ilab.json, its paths resolved on this machine ({} when it has none)."""
    path = Path(export_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    return _map_paths(json.loads(path.read_text()), resolve_recorded_path)


def pipeline_class_name(export_dir: str | Path) -> str | None:
    """The pipeline class a diffusers folder names (StableDiffusionPipeline, DiTPipeline, ...)."""
    path = Path(export_dir) / "model_index.json"
    return json.loads(path.read_text()).get("_class_name") if path.is_file() else None


def native_resolution(pipeline_dir: str | Path) -> int | None:
    """The image size a diffusers pipeline folder renders by default (its denoiser's sample_size
    in latents times the VAE's factor), read from the configs; None when they do not say."""
    folder = Path(pipeline_dir)
    vae = folder / "vae" / "config.json"
    denoiser = next(
        (folder / d / "config.json" for d in ("unet", "transformer") if (folder / d).is_dir()),
        None,
    )
    if not vae.is_file() or denoiser is None or not denoiser.is_file():
        return None
    size = json.loads(denoiser.read_text()).get("sample_size")
    blocks = json.loads(vae.read_text()).get("block_out_channels")
    if not isinstance(size, int) or not blocks:
        return None
    return size * 2 ** (len(blocks) - 1)


def export_base_model(export_dir: str | Path, base_model: str | None = None) -> str | None:
    """The base model a parameter-efficient export applies to, checked without loading it:
    `base_model` when given, else its own base_model/, else the one t2ilab.json names. None for a
    pipeline folder, which needs none."""
    export_dir = Path(export_dir)
    if (export_dir / "model_index.json").is_file():
        return None
    metadata = read_metadata(export_dir)
    artefact = metadata.get("artefact")
    if artefact is None:
        raise UserError(
            f"{export_dir} is neither a diffusers pipeline folder (no model_index.json) nor a "
            f"t2ilab export (no {METADATA_FILE}): pass <run dir>/export"
        )
    if base_model:
        base = str(base_model)
    elif (export_dir / BASE_MODEL_DIR / "model_index.json").is_file():
        return str(export_dir / BASE_MODEL_DIR)
    else:
        base = metadata.get("base_model")
    if not base:
        raise UserError(
            f"{export_dir} holds {artefact} weights but names no base model: {BASE_MODEL_FIX}"
        )
    if not is_local_reference(base):
        return base  # a hub id: checked when it loads
    if not (Path(base).expanduser() / "model_index.json").is_file():
        raise UserError(
            f"{export_dir} holds {artefact} weights for base model {base}, which is not a "
            f"diffusers folder here: {BASE_MODEL_FIX}"
        )
    return str(Path(base).expanduser())


def load_base_pipeline(base: str):
    """The pipeline a parameter-efficient export applies to, as its folder's model_index.json
    names it (SD, SDXL, PixArt-alpha/Sigma, DiT)."""
    from diffusers import DiffusionPipeline

    from t2ilab.models.pixart_dit import load_dit_pipeline

    name = DiffusionPipeline.load_config(base).get("_class_name", "")
    if name == "DiTPipeline":
        return load_dit_pipeline(base)
    # SD's own safety checker is not part of a trained model (and not in tiny base models).
    extra = {"safety_checker": None} if name == "StableDiffusionPipeline" else {}
    return DiffusionPipeline.from_pretrained(base, **extra)


def apply_lora(pipe, export_dir: Path) -> None:
    """diffusers' LoRA loader where the pipeline has one (SD, SDXL); otherwise the peft adapter
    folder on the transformer (PixArt, DiT), merged so the pipeline keeps its own classes."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(export_dir)
        return
    from peft import PeftModel

    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, export_dir).merge_and_unload()


def apply_textual_inversion(pipe, export_dir: Path) -> None:
    """One embeddings file per text encoder: learned_embeds.safetensors, and SDXL's second
    encoder's learned_embeds_2.safetensors (as diffusers' SDXL example writes them)."""
    second = export_dir / "learned_embeds_2.safetensors"
    if not second.is_file():
        pipe.load_textual_inversion(export_dir)
        return
    for file, encoder, tokenizer in (
        ("learned_embeds.safetensors", pipe.text_encoder, pipe.tokenizer),
        (second.name, pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(
            str(export_dir / file), text_encoder=encoder, tokenizer=tokenizer
        )


def load_export(export_dir: str | Path, base_model: str | None = None):
    """A ready pipeline for any t2ilab export (or any diffusers pipeline folder). `base_model`
    (a folder or hub id) replaces the base a parameter-efficient export names."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    export_dir = Path(export_dir)
    if pipeline_class_name(export_dir) == "DiTPipeline":
        from t2ilab.models.pixart_dit import load_dit_pipeline

        return load_dit_pipeline(export_dir)
    if (export_dir / "model_index.json").is_file():  # SD, SDXL or PixArt pipeline folder
        return DiffusionPipeline.from_pretrained(export_dir)
    base = export_base_model(export_dir, base_model)
    artefact = read_metadata(export_dir)["artefact"]
    try:
        pipe = load_base_pipeline(base)
    except OSError as err:  # a hub id that is offline, unknown or gated
        raise UserError(
            f"{export_dir} holds {artefact} weights for base model {base}, which could not be "
            f"loaded ({type(err).__name__}): {BASE_MODEL_FIX}"
        ) from None
    if (export_dir / "scheduler").is_dir():  # the trained schedule, in the sampler it names
        config = DDIMScheduler.load_config(export_dir, subfolder="scheduler")
        pipe.scheduler = make_sampler(config.get("_class_name", "DDIMScheduler"), config)
    if artefact == "lora":
        apply_lora(pipe, export_dir)
    elif artefact == "textual_inversion":
        apply_textual_inversion(pipe, export_dir)
    elif artefact == "adapters":
        from t2ilab.adapters import load_adapters

        load_adapters(pipe, export_dir / "adapters.safetensors")  # modules.adapter.ADAPTERS_FILE
    else:
        raise UserError(f"{export_dir}: unknown artefact {artefact!r} in {METADATA_FILE}")
    return pipe
