"""Training orchestration: validate, build from cfg, fit, export, write results.

Kept free of method logic: what is trained lives in t2ilab.modules, data in t2ilab.data.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from t2ilab.data.class_images import generate_class_images
from t2ilab.data.dreambooth import prompt_slug, resolve_prompts
from t2ilab.errors import UserError
from t2ilab.models.export import export_pipeline
from t2ilab.models.loading import load_sd_components, load_tokenizer
from t2ilab.models.pipelines import build_sd_pipeline, make_sampler
from t2ilab.results import collect_factors, write_results
from t2ilab.validation import check_dreambooth_inputs

log = logging.getLogger("t2ilab.train")

# Frozen VAE / text encoder are kept in eval mode on purpose (see TextToImageModule.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def _instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Lightning-hydra-template style: a dict of name -> {_target_: ...} configs."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = _instantiate_dict(cfg.get("logger"))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        # A CSV log is always written, whatever else is on.
        # version=None: csv/version_N/, so resuming into a run never deletes its earlier log.
        loggers.append(CSVLogger(save_dir=cfg.paths.output_dir, name="csv"))
    return loggers


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    path = (
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    )
    path = path.expanduser()
    if not path.is_file():
        hint = " (ckpt_path=last needs hydra.run.dir=<the run to resume>)" if ckpt == "last" else ""
        raise UserError(f"ckpt_path={ckpt}: no checkpoint at {path}{hint}")
    return str(path)


def generation_device(cfg: DictConfig) -> torch.device:
    if cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_class_images(cfg: DictConfig, components, class_prompt: str) -> Path:
    """Fill the class folder with images from the frozen base model (its own schedule)."""
    class_dir = Path(
        cfg.data.class_dir
        or Path(cfg.paths.class_images_dir) / cfg.model.name / prompt_slug(class_prompt)
    ).expanduser()
    sampler = make_sampler(cfg.sampling.scheduler, components.scheduler_config)
    pipe = build_sd_pipeline(
        components.unet, components.vae, components.text_encoder, components.tokenizer, sampler
    )
    device = generation_device(cfg)
    pipe.to(device)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        generate_class_images(
            pipe,
            class_prompt,
            class_dir,
            num_images=int(cfg.method.num_class_images),
            batch_size=int(cfg.method.class_image_batch_size),
            seed=int(cfg.seed),
            num_inference_steps=int(cfg.sampling.num_inference_steps),
            guidance_scale=float(cfg.sampling.guidance_scale),
            resolution=int(cfg.data.resolution),
        )
    pipe.to("cpu")
    return class_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns metrics. Raises UserError on bad input before weights load."""
    L.seed_everything(cfg.seed, workers=True)
    check_dreambooth_inputs(cfg)
    resume_from = resolve_ckpt_path(cfg)

    tokenizer = load_tokenizer(cfg.model)
    data_cfg = cfg.data
    prompts = resolve_prompts(
        identifier=data_cfg.identifier,
        class_noun=data_cfg.class_noun,
        instance_prompt=data_cfg.instance_prompt,
        instance_prompt_template=data_cfg.instance_prompt_template,
        class_prompt=data_cfg.class_prompt,
        with_prior_preservation=bool(cfg.method.prior_preservation),
        tokenizer=tokenizer,
        seed=int(cfg.seed),
        identifier_id_range=tuple(data_cfg.identifier_id_range),
    )
    log.info("instance prompt: %r, class prompt: %r", prompts.instance_prompt, prompts.class_prompt)

    components = load_sd_components(cfg.model, tokenizer)
    class_dir = None
    if cfg.method.prior_preservation:
        class_dir = prepare_class_images(cfg, components, prompts.class_prompt)

    module = hydra.utils.instantiate(
        cfg.method.module,
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        scheduler_config=components.scheduler_config,
        noise=OmegaConf.to_container(cfg.noise, resolve=True),
    )
    module.prompt_vars = {"identifier": prompts.identifier, "class_noun": prompts.class_noun or ""}

    datamodule = hydra.utils.instantiate(cfg.data, class_dir=str(class_dir) if class_dir else None)
    num_class = int(cfg.method.num_class_images) if cfg.method.prior_preservation else 0
    datamodule.bind(tokenizer, prompts, num_class)

    loggers = build_loggers(cfg)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    for lg in loggers:
        lg.log_hyperparams(_flat_config(cfg))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    metrics = {
        "train_loss": float(trainer.callback_metrics["train/loss"])
        if "train/loss" in trainer.callback_metrics
        else None
    }
    if trainer.is_global_zero and cfg.export.enabled:
        export_pipeline(
            module, Path(cfg.paths.output_dir) / "export", scheduler=cfg.sampling.scheduler
        )
    _finish_wandb(loggers)
    return {"metrics": metrics, "steps": trainer.global_step}


def _flat_config(cfg: DictConfig) -> dict[str, Any]:
    """Dotted keys, so W&B dashboards can group by any config value."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _finish_wandb(loggers: list[Logger]) -> None:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_dir = Path(lg.experiment.dir).parent
            offline = lg._offline
            lg.experiment.finish()
            if offline:
                log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)


def _experiment_name() -> str:
    return HydraConfig.get().runtime.choices.get("experiment") or "default"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and always write results.json, also when the run fails."""
    hydra_cfg = HydraConfig.get()
    is_multirun = hydra_cfg.mode == RunMode.MULTIRUN
    factors = collect_factors(
        cfg,
        list(hydra_cfg.overrides.task),
        dict(hydra_cfg.runtime.choices),
        list(cfg.results.factor_keys),
    )
    results_path = Path(cfg.paths.output_dir) / "results.json"
    is_rank_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
    start = time.time()
    status, reason, outcome = "ok", None, {"metrics": {}, "steps": 0}
    try:
        outcome = train(cfg)
    except UserError as err:
        status, reason = "failed", str(err)
        log.error("%s", err)
    except Exception as err:
        status, reason = "failed", f"{type(err).__name__}: {err}"
        if not is_multirun:
            _write(results_path, is_rank_zero, factors, status, reason, outcome, start)
            raise
        log.exception("run failed; the sweep goes on")
    results = _write(results_path, is_rank_zero, factors, status, reason, outcome, start)
    if status == "failed" and not is_multirun:
        print(f"t2ilab: error: {reason}", file=sys.stderr)
        sys.exit(2)
    return results


def _write(path, is_rank_zero, factors, status, reason, outcome, start) -> dict[str, Any]:
    if not is_rank_zero:
        return {}
    return write_results(
        path,
        experiment=_experiment_name(),
        status=status,
        reason=reason,
        factors=factors,
        metrics=outcome["metrics"],
        steps=outcome["steps"],
        wall_time_s=time.time() - start,
    )


def main() -> None:
    """Console entry point (`t2ilab-train`); the repo's train.py calls the same."""
    os.environ.setdefault("T2ILAB_ROOT", str(Path.cwd()))
    config_dir = str(Path(os.environ["T2ILAB_ROOT"]) / "conf")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="train")(run)()
