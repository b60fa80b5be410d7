"""Training orchestration: validate, build from cfg, fit, export, write results.

Kept free of method logic: what is trained lives in t2ilab.modules, data in t2ilab.data.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

import t2ilab.quiet  # noqa: F401  (first of t2ilab's: silences known third-party noise)
from t2ilab.build import (
    build_callbacks,
    build_module,
    build_protocol,
    build_trainer,
    log_parameter_counts,
    prepare_data,
    ranks_on_this_machine,
    release_training_state,
)
from t2ilab.callbacks.segments import SegmentRecorder, earlier_segments
from t2ilab.checkpoints import inspect_checkpoint
from t2ilab.compat import check_data_fits_model, check_method_fits_model
from t2ilab.errors import UserError
from t2ilab.launch import pin_job_for_lightning_ranks, rank_scope
from t2ilab.loggers import build_loggers, finish_loggers, flat_config
from t2ilab.models.export import export_metadata, export_pipeline
from t2ilab.models.loading import load_components, load_tokenizer
from t2ilab.models.stages import init_from_previous_stage
from t2ilab.preflight import preflight
from t2ilab.resume import settings_changes, settings_of
from t2ilab.run_folder import (
    check_apart_from_data,
    check_continuation,
    export_folder,
    finished_run,
    nothing_to_train,
    user_data_dirs,
)
from t2ilab.runner import command_line, experiment_name, run_task
from t2ilab.scale import scale_line
from t2ilab.threads import apply_cpu_threads
from t2ilab.validation import (
    check_alignment_matches_model,
    check_devices,
    check_eval_matches_model,
    check_numbers,
    check_objective,
    check_prior_preservation,
    check_resolution,
    check_sample_prompts,
    check_something_trains,
)

log = logging.getLogger("t2ilab.train")

# Frozen VAE / text encoder are kept in eval mode on purpose (see DiffusionModule.train).
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


def export_dir(cfg: DictConfig) -> Path:
    """export.dir, or <run dir>/export."""
    return export_folder(cfg, Path(cfg.paths.output_dir))


def check_export_dir(cfg: DictConfig) -> None:
    """An export.dir that already holds something is only replaced when asked to."""
    if not cfg.export.enabled or not cfg.export.get("dir") or cfg.export.get("overwrite"):
        return
    folder = export_dir(cfg)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"export.dir={folder} is not empty: choose a new folder, or set "
            "export.overwrite=true to replace it when training ends"
        )


def check_outputs_apart_from_data(cfg: DictConfig) -> None:
    """Nothing the run writes (its folder, export, class images, caches) lands among the user's
    own files: a subject folder must never gain files."""
    data = user_data_dirs(cfg)
    check_apart_from_data("the run folder", Path(cfg.paths.output_dir), data)
    if cfg.export.get("dir"):
        check_apart_from_data("export.dir", Path(cfg.export.dir), data, "the export")
    cache_dir = OmegaConf.select(cfg, "data.cache.dir", default=None)
    if cache_dir:
        check_apart_from_data("data.cache.dir", Path(cache_dir), data, "feature caches")
    subject = {k: v for k, v in data.items() if k in ("data.instance_dir", "data.train_dir")}
    if cfg.data.get("class_dir"):
        check_apart_from_data("data.class_dir", Path(cfg.data.class_dir), subject, "class images")
    check_apart_from_data(
        "paths.class_images_dir", Path(cfg.paths.class_images_dir), subject, "class images"
    )


def check_ema(cfg: DictConfig) -> None:
    if not cfg.ema.enabled:
        return
    if not 0.0 < float(cfg.ema.decay) < 1.0:
        raise UserError(f"ema.decay={cfg.ema.decay}: must be between 0 and 1, e.g. 0.9999")
    strategy = cfg.trainer.get("strategy") or {}
    target = str(strategy.get("_target_", "") if hasattr(strategy, "get") else strategy).lower()
    if "fsdp" in target or ("deepspeed" in target and int(strategy.get("stage", 2)) == 3):
        # Sharded strategies flatten the parameters after the EMA copies them.
        raise UserError(
            "ema.enabled=true works with one device, DDP and DeepSpeed stage 2, not with sharded "
            "parameters (FSDP, ZeRO-3): use trainer=ddp or set ema.enabled=false"
        )


def log_scale_changes(cfg: DictConfig) -> None:
    """One line when conf/scale/ replaced values of the experiment (it applies after it)."""
    try:
        line = scale_line(cfg)
    except Exception as err:  # the line informs; it never stops a run
        log.warning("could not compare the config with conf/scale/ left out: %s", err)
        return
    if line:
        log.info("%s", line)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns metrics. Raises UserError on bad input before weights load."""
    L.seed_everything(cfg.seed, workers=True)
    log_scale_changes(cfg)
    module_class = hydra.utils.get_class(cfg.method.module._target_)
    module_class.check_method(cfg.method)
    check_method_fits_model(cfg, module_class)
    check_numbers(cfg)  # the config alone: before anything reads a model or a file
    check_objective(cfg)  # the noise keys and the sampler fit what the model samples
    check_prior_preservation(cfg)
    check_something_trains(cfg)
    check_eval_matches_model(cfg)
    check_alignment_matches_model(cfg)
    check_ema(cfg)
    check_devices(cfg)  # this machine
    check_outputs_apart_from_data(cfg)  # the files: the user's and the run's
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.check()
    check_resolution(cfg)
    check_data_fits_model(cfg, datamodule)
    check_export_dir(cfg)
    resume = plan_resume(cfg)
    # A resume keeps the checkpoint's thread count under `auto`: the same arithmetic, bit for bit.
    threads = apply_cpu_threads(
        cfg.trainer.get("cpu_threads"), ranks_on_this_machine(cfg), resumed=resume.threads
    )

    tokenizer = load_tokenizer(cfg.model)
    # A method may add tokens (textual inversion) and rewrite prompts to use them.
    prompt_transform = module_class.prepare_tokenizer(tokenizer, cfg.method)
    prompt_vars = datamodule.bind(tokenizer, seed=int(cfg.seed), prompt_transform=prompt_transform)
    log.info("prompt variables: %s", prompt_vars)
    check_sample_prompts(cfg, prompt_vars)
    protocol = build_protocol(cfg, datamodule)

    components = load_components(cfg.model, tokenizer)
    init_from_previous_stage(cfg, components)
    prepare_data(cfg, datamodule, components, module_class)
    module = build_module(cfg, components, datamodule, prompt_vars, prompt_transform)
    module.run_record = {
        "settings": settings_of(cfg),
        "resumes": resume.history,
        "cpu_threads": threads,
    }

    loggers = build_loggers(cfg)
    changes = resume.changes if resume.ckpt_path else None
    callbacks, evaluation = build_callbacks(cfg, changes, protocol)
    segments = SegmentRecorder(command_line(), resume.segments, resume.step)
    callbacks.append(segments)
    trainer = build_trainer(cfg, loggers, callbacks)
    for lg in loggers:
        lg.log_hyperparams(flat_config(cfg))
    log_parameter_counts(module, loggers)

    export_only = bool(resume.ckpt_path) and nothing_to_train(cfg, resume.step)
    if export_only:
        log.info("step %d is trainer.max_steps: nothing to train, the export only", resume.step)
    pin_job_for_lightning_ranks()
    with rank_scope():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path)
    release_training_state(trainer, module)

    metrics = {}
    if export_only:  # no step and no end-of-training evaluation ran: the run's scores stand
        recorded = (finished_run(Path(cfg.paths.output_dir)) or {}).get("metrics") or {}
        metrics.update(recorded)
        if not recorded:  # it stopped after its last checkpoint, before it was scored
            score_at_end(trainer, module)
    if "train/loss" in trainer.callback_metrics:
        metrics["train_loss"] = float(trainer.callback_metrics["train/loss"])
    if evaluation is not None:
        metrics.update(evaluation.last_metrics)
    for callback in trainer.callbacks:  # e.g. eval=toy_alignment's score at the end
        if callback is not evaluation:
            metrics.update(getattr(callback, "last_metrics", None) or {})
    if trainer.is_global_zero and cfg.export.enabled:
        metadata = export_metadata(
            cfg,
            experiment=experiment_name(),
            subject=datamodule.subject(),
            dreambooth_evaluated=protocol is not None,
        )
        keep_previous_export(cfg, resume)
        with module.for_inference():  # e.g. the EMA weights when ema.enabled
            export_run(cfg, module, export_dir(cfg), metadata)
    finish_loggers(loggers)
    return {
        "metrics": metrics,
        "steps": trainer.global_step,
        "resolved": module.noise_factors(),
        "resumes": resume.history,
        "segments": segments.segments(trainer.global_step),
    }


def score_at_end(trainer: L.Trainer, module) -> None:
    """The end-of-training scores of a run whose last step is in its checkpoint: Lightning
    skips `on_train_end` when there is nothing to train, so the scoring callbacks (those that
    keep `last_metrics`) run here, on the device training used; fit's teardown left the module
    on the CPU, and there it goes back for the export, as after any fit."""
    scorers = [c for c in trainer.callbacks if hasattr(c, "last_metrics")]
    if not scorers or not trainer.is_global_zero:
        return
    module.to(trainer.strategy.root_device)
    try:
        for callback in scorers:
            callback.on_train_end(trainer, module)
    finally:
        module.cpu()


@dataclass
class ResumePlan:
    """How this run starts: from scratch, or from `ckpt_path` with `changes` to the settings
    the checkpoint was trained with; `history`: every such change since the run began."""

    ckpt_path: str | None = None
    changes: dict[str, list[Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    threads: int | None = None  # torch's CPU threads in the checkpoint's run
    segments: list[dict[str, Any]] = field(default_factory=list)  # launches before this one


def plan_resume(cfg: DictConfig) -> ResumePlan:
    """Before any weights load: the run folder is this run's to write, and the checkpoint (if
    any) is whole, of this model and method, with settings that may change on resume."""
    check_continuation(Path(cfg.paths.output_dir), cfg.get("ckpt_path"), cfg, "the run folder")
    path = resolve_ckpt_path(cfg)
    if path is None:
        return ResumePlan()
    settings = settings_of(cfg)
    record = inspect_checkpoint(Path(path), settings, cfg.paths.root_dir)
    trained = record.get("settings")
    if trained is None:
        log.warning("%s has no record of its settings (an older checkpoint): not compared", path)
    changes = settings_changes(trained, settings, path, cfg.paths.root_dir) if trained else {}
    history = list(record.get("resumes", []))
    if changes:
        history.append({"step": record["global_step"], "changed": changes})
    threads = record.get("cpu_threads")
    step = record["global_step"]
    return ResumePlan(path, changes, history, step, threads, earlier_segments(record, step))


def keep_previous_export(cfg: DictConfig, resume: ResumePlan) -> None:
    """A run continued past its end keeps the export it had as export_step_<N>/ beside the new
    one: nothing a finished run wrote is replaced."""
    folder = export_dir(cfg)
    if not resume.ckpt_path or cfg.export.get("dir") or not folder.is_dir():
        return
    kept = folder.with_name(f"{folder.name}_step_{resume.step:06d}")
    if kept.exists():
        return  # an earlier attempt at this continuation kept it already
    os.replace(folder, kept)
    log.info("export: the previous export (step %d) stays in %s", resume.step, kept)


def export_run(cfg: DictConfig, module, out_dir: Path, metadata: dict[str, Any]) -> None:
    """The method's own artefact. A parameter-efficient artefact needs its base model: one built
    from config (no hub id or folder to point at) is exported beside it as base_model/."""
    base = None
    if not cfg.model.pretrained and module.artefact != "pipeline":
        base = load_components(cfg.model)  # a fresh tokenizer: no added tokens
    export_pipeline(module, out_dir, cfg.sampling.scheduler, metadata, base_components=base)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and always write results.json, also when the run fails."""
    return run_task(cfg, train)


def main() -> None:
    """Console entry point (`t2ilab-train`); the repo's train.py calls the same."""
    os.environ.setdefault("T2ILAB_ROOT", str(Path.cwd()))
    config_dir = Path(os.environ["T2ILAB_ROOT"]) / "conf"
    preflight(config_dir, "train", sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name="train")(run)()
