"""Evaluation orchestration: `python evaluate.py` on a run, an export, or a base model.

"Before" and "after" fine-tuning go through the protocols training uses: the DreamBooth protocol
(DreamBoothProtocol: same prompts, seeds, sampler and evaluators as the training callback) and,
for toy models, prompt following read from the pixels (`eval=toy_alignment`). An export is
measured as its run measured it: its t2ilab.json names the base model, the subject and the
evaluation, and each of them wins unless the command line names its own (`model=` or
`model.pretrained=`; `data.*` or `subject=`; `eval=` or `eval.*`, key by key).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from t2ilab.callbacks.evaluation import log_eval_outputs, save_eval_outputs
from t2ilab.errors import UserError
from t2ilab.loggers import build_loggers, finish_loggers, flat_config
from t2ilab.metrics.protocol import DreamBoothProtocol
from t2ilab.models.export import (
    METADATA_FILE,
    export_base_model,
    load_export,
    native_resolution,
    pipeline_class_name,
    read_metadata,
)
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler
from t2ilab.results import override_key
from t2ilab.runner import run_task
from t2ilab.utils.atomic import recover_interrupted_writes
from t2ilab.validation import check_alignment_matches_model, check_eval_matches_model

log = logging.getLogger("t2ilab.evaluate")

# Subject keys that an export's t2ilab.json fills in unless given on the command line.
_SUBJECT_KEYS = ("identifier", "class_noun", "instance_dir")


def command_line_keys() -> set[str]:
    """The config keys the user set on the command line (`model`, `eval.seed`, ...)."""
    return {override_key(o) for o in HydraConfig.get().overrides.task}


def user_named_model(given: set[str]) -> bool:
    return "model" in given or "model.pretrained" in given


def _check_export_folder(export: Path, key: str, value: str) -> None:
    if not (export / "model_index.json").is_file() and not (export / METADATA_FILE).is_file():
        if key == "run_dir":
            raise UserError(
                f"run_dir={value} has no export/ (the run failed, is still going, or had "
                "export.enabled=false): run its train.py command again with "
                f"hydra.run.dir={value} ckpt_path=last export.enabled=true (a finished run is "
                "exported without training), or pass export_dir=..."
            )
        raise UserError(
            f"export_dir={value} is not a diffusers pipeline folder (no model_index.json): "
            "pass <run dir>/export or a folder from save_pretrained()"
        )


def resolve_export(cfg: DictConfig) -> Path | None:
    """The pipeline folder to evaluate, or None for the base model in cfg.model. An export whose
    writer was killed while replacing it is put back first (utils.atomic)."""
    if cfg.get("run_dir") and cfg.get("export_dir"):
        raise UserError("give run_dir=... or export_dir=..., not both")
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir).expanduser()
        if not run_dir.is_dir():
            raise UserError(
                f"run_dir={cfg.run_dir} does not exist: pass a folder under logs/train/runs/"
            )
        export, key, value = run_dir / "export", "run_dir", cfg.run_dir
    elif cfg.get("export_dir"):
        export, key, value = Path(cfg.export_dir).expanduser(), "export_dir", cfg.export_dir
    else:
        return None
    recover_interrupted_writes(export)
    _check_export_folder(export, key, value)
    return export


def apply_subject(cfg: DictConfig, metadata: dict[str, Any], given: set[str]) -> None:
    """data.identifier/class_noun/instance_dir from the export unless set on the command line."""
    if "subject" in given:
        return
    applied = [k for k in _SUBJECT_KEYS if f"data.{k}" not in given and metadata.get(k)]
    with open_dict(cfg):
        for key in applied:
            cfg.data[key] = metadata[key]
    if applied:
        log.info("subject from the export: %s", {k: cfg.data[k] for k in _SUBJECT_KEYS})


def apply_model(cfg: DictConfig, export: Path, metadata: dict[str, Any], given: set[str]) -> None:
    """The run's model name and resolution (what the checks and image size go by), unless the
    user named a model; a folder that records none renders at its own default size."""
    if user_named_model(given):
        return
    model = metadata.get("model") if isinstance(metadata.get("model"), dict) else {}
    resolution = model.get("resolution") or native_resolution(export)
    with open_dict(cfg):
        if model:
            cfg.model.name = model["name"]
            cfg.model.family = model.get("family", "sd")
            # Exports before model.toy_world recorded only the name (toy models: toy_*).
            cfg.model.toy_world = model.get("toy_world", str(model["name"]).startswith("toy"))
        if resolution and "model.resolution" not in given:
            cfg.model.resolution = resolution


def apply_evaluation(cfg: DictConfig, metadata: dict[str, Any], given: set[str]) -> None:
    """The run's own evaluation (preset and settings), unless the user picked one with `eval=`;
    `eval.*` keys given on the command line still win over the recorded ones."""
    recorded = metadata.get("eval")
    if "eval" in given or not isinstance(recorded, dict):
        return
    keep = [key.removeprefix("eval.") for key in given if key.startswith("eval.")]
    if "subject" in given:  # a subject config sets its prompt list
        keep.append("subject_type")
    if user_named_model(given) or "model.resolution" in given:
        keep.append("resolution")
    current = OmegaConf.create(OmegaConf.to_container(cfg.eval, resolve=True))
    evaluation = OmegaConf.create(recorded)
    for key in keep:
        value = OmegaConf.select(current, key, default=None)
        OmegaConf.update(evaluation, key, value, merge=False, force_add=True)
    with open_dict(cfg):
        cfg.eval = evaluation
    log.info(
        "evaluation of the run: eval=%s (%s)", metadata.get("eval_preset"), recorded_summary(cfg)
    )


def recorded_summary(cfg: DictConfig) -> str:
    keys = ("evaluators", "dino_model", "clip_model", "images_per_prompt", "num_inference_steps")
    return ", ".join(f"{k}={cfg.eval.get(k)}" for k in keys)


def is_class_conditional(cfg: DictConfig, export: Path | None) -> bool:
    if export is not None:
        return pipeline_class_name(export) == "DiTPipeline"
    return cfg.model.get("family", "sd") == "dit"


def check_something_to_evaluate(cfg: DictConfig, export: Path | None, given: set[str]) -> None:
    """One protocol at least, and one that fits the model: the DreamBooth protocol needs text
    prompts, which a class-conditional DiT does not take."""
    dreambooth = bool(cfg.eval.get("enabled", False))
    alignment = bool((cfg.eval.get("toy_alignment") or {}).get("enabled", False))
    what = f"{export}" if export is not None else f"model {cfg.model.name}"
    toy = bool(cfg.model.get("toy_world", False))
    if is_class_conditional(cfg, export) and (dreambooth or not alignment):
        use = (
            "use eval=toy_alignment (its shape accuracy)"
            if toy
            else "t2ilab measures class-conditional models only in the toy world "
            "(eval=toy_alignment); sample it with DiTPipeline.from_pretrained"
        )
        reason = "the DreamBooth protocol needs text prompts" if dreambooth else "no evaluation"
        raise UserError(f"{what} is a class-conditional DiT ({reason}): {use}")
    if dreambooth or alignment:
        return
    if export is None or "eval" in given:
        raise UserError("eval=none turns evaluation off: pick eval=dreambooth")
    raise UserError(
        f"{what} comes from a run without evaluation (eval=none, or no subject): name one, e.g. "
        "eval=dreambooth data.instance_dir=DIR data.class_noun=NOUN data.identifier=sks "
        "(toy models: eval=toy, or eval=toy_alignment)"
    )


def build_protocol(cfg: DictConfig, device: torch.device) -> DreamBoothProtocol | None:
    if not cfg.eval.get("enabled", False):
        return None
    identifier = cfg.data.identifier
    if not identifier:
        raise UserError("evaluation needs the subject's identifier: set data.identifier=sks")
    return DreamBoothProtocol(
        OmegaConf.to_container(cfg.eval, resolve=True),
        cfg.data.instance_dir,
        identifier,
        cfg.data.class_noun or "",
        device=device,
    )


def load_pipeline(cfg: DictConfig, export: Path | None, base_model: str | None = None):
    """(pipeline, the scheduler config every sampler is made from: the trained schedule)."""
    if export is not None:
        # A pipeline folder, or LoRA / textual-inversion / adapter weights on their base model.
        pipe = load_export(export, base_model=base_model)
        pipe.set_progress_bar_config(disable=True)
        return pipe, dict(pipe.scheduler.config)
    c = load_components(cfg.model)  # any family: SD, PixArt, DiT
    return c.pipeline(make_sampler(cfg.eval.scheduler, c.scheduler_config)), c.scheduler_config


def use_sampler(pipe, name: str, scheduler_config: dict[str, Any]) -> None:
    # The export's scheduler config carries its trained betas; keep them, swap the class.
    pipe.scheduler = make_sampler(name, scheduler_config)


def run_dreambooth(cfg, protocol, pipe, scheduler_config, loggers) -> dict[str, float]:
    use_sampler(pipe, cfg.eval.scheduler, scheduler_config)
    out = protocol.run(pipe)
    save_eval_outputs(out, Path(cfg.paths.output_dir) / "samples")
    log_eval_outputs(out, loggers, step=0)
    return dict(out.metrics)


def run_toy_alignment(cfg, pipe, scheduler_config, loggers) -> dict[str, float]:
    """As train.evaluate_toy_alignment scores a toy run at its end, on the loaded pipeline."""
    from t2ilab.toy.alignment import save_grid, score_pipeline

    alignment = OmegaConf.to_container(cfg.eval.toy_alignment, resolve=True)
    use_sampler(pipe, alignment["scheduler"], scheduler_config)
    metrics, images, labels, _ = score_pipeline(
        pipe,
        n=int(alignment["n"]),
        seed=int(alignment["seed"]),
        steps=int(alignment["num_inference_steps"]),
        guidance=float(alignment["guidance_scale"]),
    )
    path = Path(cfg.paths.output_dir) / "samples" / "alignment.png"
    save_grid(images, labels, path, int(alignment["grid_images"]))
    for lg in loggers:
        lg.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    export = resolve_export(cfg)
    given = command_line_keys()
    base_model = None
    if export is not None:
        metadata = read_metadata(export)
        apply_subject(cfg, metadata, given)
        apply_model(cfg, export, metadata, given)
        apply_evaluation(cfg, metadata, given)
    check_something_to_evaluate(cfg, export, given)
    check_eval_matches_model(cfg)  # config only: before anything reads a model
    check_alignment_matches_model(cfg)
    if export is not None:  # a missing base model fails before anything loads
        named = cfg.model.pretrained if user_named_model(given) else None
        base_model = export_base_model(export, named)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    protocol = build_protocol(cfg, device)
    if protocol is not None:
        protocol.evaluators()  # a missing evaluator model fails before the pipeline loads
    pipe, scheduler_config = load_pipeline(cfg, export, base_model)
    pipe.to(device)

    loggers = build_loggers(cfg)
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))
    metrics: dict[str, float] = {}
    if protocol is not None:
        metrics.update(run_dreambooth(cfg, protocol, pipe, scheduler_config, loggers))
    if (cfg.eval.get("toy_alignment") or {}).get("enabled", False):
        metrics.update(run_toy_alignment(cfg, pipe, scheduler_config, loggers))
    finish_loggers(loggers)
    log.info("eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    # The record names what was evaluated (the export's model and evaluation), not the defaults.
    evaluated = {key: OmegaConf.select(cfg, key) for key in cfg.results.factor_keys}
    return {"metrics": metrics, "steps": 0, "factors": evaluated}


def run(cfg: DictConfig) -> dict[str, Any]:
    return run_task(cfg, evaluate, name="evaluate")
