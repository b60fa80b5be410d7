"""Training orchestration: validate, build from cfg, fit, export, write results.

Kept free of method logic: what is trained lives in t2ilab.modules, data in t2ilab.data.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from t2ilab.callbacks.evaluation import DreamBoothEvalCallback
from t2ilab.data.class_images import generate_class_images
from t2ilab.data.dreambooth import prompt_slug, resolve_prompts
from t2ilab.errors import UserError
from t2ilab.loggers import build_loggers, finish_loggers, flat_config, instantiate_dict
from t2ilab.metrics.protocol import DreamBoothProtocol
from t2ilab.models.export import export_pipeline
from t2ilab.models.loading import load_sd_components, load_tokenizer
from t2ilab.models.pipelines import build_sd_pipeline, make_sampler
from t2ilab.runner import experiment_name, run_task
from t2ilab.validation import check_dreambooth_inputs

log = logging.getLogger("t2ilab.train")

# Frozen VAE / text encoder are kept in eval mode on purpose (see TextToImageModule.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


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

    protocol = None
    if cfg.eval.get("enabled"):
        # Built (and its evaluator models loaded) before training, so a missing evaluator fails
        # now rather than after hours of fine-tuning.
        protocol = DreamBoothProtocol(
            OmegaConf.to_container(cfg.eval, resolve=True),
            cfg.data.instance_dir,
            prompts.identifier,
            prompts.class_noun or "",
            device=generation_device(cfg),
        )
        protocol.evaluators()

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
    callbacks = instantiate_dict(cfg.get("callbacks"))
    evaluation = None
    if protocol is not None:
        evaluation = DreamBoothEvalCallback(
            protocol,
            output_dir=Path(cfg.paths.output_dir) / "samples",
            every_n_steps=int(cfg.eval.every_n_steps),
            scheduler=cfg.eval.scheduler,
        )
        callbacks.append(evaluation)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    metrics = {}
    if "train/loss" in trainer.callback_metrics:
        metrics["train_loss"] = float(trainer.callback_metrics["train/loss"])
    if evaluation is not None:
        metrics.update(evaluation.last_metrics)
    if trainer.is_global_zero and cfg.export.enabled:
        subject = {
            "experiment": experiment_name(),
            "identifier": prompts.identifier,
            "class_noun": prompts.class_noun,
            "instance_prompt": prompts.instance_prompt,
            "class_prompt": prompts.class_prompt,
            "instance_dir": str(Path(cfg.data.instance_dir).expanduser().resolve()),
        }
        export_pipeline(
            module, Path(cfg.paths.output_dir) / "export", cfg.sampling.scheduler, metadata=subject
        )
    finish_loggers(loggers)
    return {"metrics": metrics, "steps": trainer.global_step}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and always write results.json, also when the run fails."""
    return run_task(cfg, train)


def main() -> None:
    """Console entry point (`t2ilab-train`); the repo's train.py calls the same."""
    os.environ.setdefault("T2ILAB_ROOT", str(Path.cwd()))
    config_dir = str(Path(os.environ["T2ILAB_ROOT"]) / "conf")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="train")(run)()
