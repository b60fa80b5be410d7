"""Evaluation orchestration: `python evaluate.py` on a run, an export, or a base model.

"Before" and "after" fine-tuning go through the same DreamBoothProtocol as the training
callback: same prompts, seeds, sampler and evaluators.
"""

from __future__ import annotations

import json
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
from t2ilab.models.export import METADATA_FILE, load_export
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler
from t2ilab.runner import run_task
from t2ilab.validation import check_eval_matches_model

log = logging.getLogger("t2ilab.evaluate")

# Subject keys that an export's t2ilab.json fills in unless given on the command line.
_SUBJECT_KEYS = ("identifier", "class_noun", "instance_dir")


def resolve_export(cfg: DictConfig) -> Path | None:
    """The pipeline folder to evaluate, or None for the base model in cfg.model."""
    if cfg.get("run_dir") and cfg.get("export_dir"):
        raise UserError("give run_dir=... or export_dir=..., not both")
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir).expanduser()
        if not run_dir.is_dir():
            raise UserError(
                f"run_dir={cfg.run_dir} does not exist: pass a folder under logs/train/runs/"
            )
        export = run_dir / "export"
        if not (export / "model_index.json").is_file() and not (export / METADATA_FILE).is_file():
            raise UserError(
                f"run_dir={cfg.run_dir} has no export/ (the run failed, is still going, or had "
                "export.enabled=false): resume it with ckpt_path=last, or pass export_dir=..."
            )
        return export
    if cfg.get("export_dir"):
        export = Path(cfg.export_dir).expanduser()
        if not (export / "model_index.json").is_file() and not (export / METADATA_FILE).is_file():
            raise UserError(
                f"export_dir={cfg.export_dir} is not a diffusers pipeline folder (no "
                "model_index.json): pass <run dir>/export or a folder from save_pretrained()"
            )
        return export
    return None


def apply_export_metadata(cfg: DictConfig, export: Path) -> None:
    """Fill data.identifier/class_noun/instance_dir from the export unless set on the command line."""
    path = export / METADATA_FILE
    if not path.is_file():
        return
    metadata = json.loads(path.read_text())
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    with open_dict(cfg):
        for key in _SUBJECT_KEYS:
            if f"data.{key}" not in given and metadata.get(key):
                cfg.data[key] = metadata[key]
    log.info("subject from %s: %s", path, {k: cfg.data[k] for k in _SUBJECT_KEYS})


def load_pipeline(cfg: DictConfig, export: Path | None):
    sampler_name = cfg.eval.scheduler
    if export is not None:
        # A pipeline folder, or LoRA / textual-inversion / adapter weights on their base model.
        pipe = load_export(export, base_model=cfg.model.pretrained)
        # The export's scheduler config carries its trained betas; keep them, swap the class.
        pipe.scheduler = make_sampler(sampler_name, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    c = load_components(cfg.model)  # any family: SD, PixArt
    return c.pipeline(make_sampler(sampler_name, c.scheduler_config))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.eval.get("enabled", True):
        raise UserError("eval=none turns evaluation off: pick eval=dreambooth")
    export = resolve_export(cfg)
    if export is not None:
        apply_export_metadata(cfg, export)
    else:  # the base model: its name says which world it is from
        check_eval_matches_model(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    identifier = cfg.data.identifier
    if not identifier:
        raise UserError("evaluation needs the subject's identifier: set data.identifier=sks")
    protocol = DreamBoothProtocol(
        OmegaConf.to_container(cfg.eval, resolve=True),
        cfg.data.instance_dir,
        identifier,
        cfg.data.class_noun or "",
        device=device,
    )
    protocol.evaluators()  # a missing evaluator model fails before the pipeline loads
    pipe = load_pipeline(cfg, export).to(device)
    out = protocol.run(pipe)

    save_eval_outputs(out, Path(cfg.paths.output_dir) / "samples")
    loggers = build_loggers(cfg)
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))
    log_eval_outputs(out, loggers, step=0)
    finish_loggers(loggers)
    log.info("eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in out.metrics.items()))
    return {"metrics": out.metrics, "steps": 0}


def run(cfg: DictConfig) -> dict[str, Any]:
    return run_task(cfg, evaluate, name="evaluate")
