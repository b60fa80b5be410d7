"""Checks of the user's config and data that run before any weights load."""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError
from t2ilab.metrics.lpips import lpips_available
from t2ilab.models.families import family_of
from t2ilab.models.loading import vae_scale_factor


def check_resolution(cfg: DictConfig) -> None:
    resolution = int(cfg.data.resolution)
    factor = vae_scale_factor(cfg.model)
    if resolution <= 0 or resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise UserError(
            f"data.resolution={resolution} is not a multiple of the VAE factor {factor} of model "
            f"{cfg.model.name}: use {lower} or {lower + factor}"
        )


def check_eval_matches_model(cfg: DictConfig) -> None:
    """The toy evaluators have only seen the toy world: their numbers on a real model's images
    would look like metrics and mean nothing."""
    evaluation = cfg.get("eval") or {}
    if not evaluation.get("enabled", False):
        return
    if not evaluation.get("toy_world", False):
        check_real_evaluators_on_toy_model(cfg, evaluation)
        return
    if evaluation.get("evaluators") == "tiny_random":  # scale/tiny_sd: pipeline checks only
        return
    if not cfg.model.get("toy_world", False):
        raise UserError(
            f"eval=toy scores with the toy world's CLIP and DINO, which cannot judge model "
            f"{cfg.model.name}: add eval=dreambooth (the paper's DINO and CLIP)"
        )


def check_real_evaluators_on_toy_model(cfg: DictConfig, evaluation) -> None:
    """A toy model under the paper's evaluators (eval=dreambooth, the default) on a machine
    without torchvision: LPIPS would stop the run, and the toy evaluators are the ones made for
    these images, so the line names them first."""
    if cfg.model.get("toy_world", False) and evaluation.get("div_distance") == "lpips":
        if not lpips_available():
            raise UserError(
                f"model={cfg.model.name} draws the toy world: score it with eval=toy (the shipped "
                "toy evaluators); eval=dreambooth's LPIPS needs torchvision "
                "(pip install -e '.[gpu]')"
            )


def check_alignment_matches_model(cfg: DictConfig) -> None:
    """eval=toy_alignment reads toy-world colours and shapes from the pixels; a real model's
    images are not drawn in them."""
    alignment = (cfg.get("eval") or {}).get("toy_alignment") or {}
    if alignment.get("enabled", False) and not cfg.model.get("toy_world", False):
        raise UserError(
            f"eval=toy_alignment reads the toy world's colours and shapes, which model "
            f"{cfg.model.name} does not draw: use eval=none, or a toy model (model=toy_pixart_init)"
        )


# --- numbers, devices, and settings that would make a run meaningless ---------------------------


def _number(cfg: DictConfig, key: str, whole: bool = False):
    """The value at `key` as an int/float (None when unset); a UserError when it is not one."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return None
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool):
        raise UserError(f"{key}={value} is not {kind}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value} is not {kind}: give e.g. {key}=1") from None
    if not math.isfinite(number):
        raise UserError(f"{key}={value} is not a finite number")
    if whole:
        if number != int(number):
            raise UserError(f"{key}={value} is not a whole number: use {int(number)}")
        return int(number)
    return number


def _at_least(cfg: DictConfig, key: str, minimum: float, whole: bool = True, why: str = ""):
    value = _number(cfg, key, whole)
    if value is not None and value < minimum:
        reason = f" ({why})" if why else ""
        raise UserError(f"{key}={value} must be at least {minimum}{reason}")
    return value


def check_numbers(cfg: DictConfig) -> None:
    """Every number a user commonly sets, in its range, before anything loads."""
    lr = _number(cfg, "method.lr")
    if lr is not None and lr <= 0:
        raise UserError(
            f"method.lr={lr} must be positive: e.g. method.lr=1e-4 (nothing trains at 0)"
        )
    steps = _number(cfg, "trainer.max_steps", whole=True)
    epochs = _number(cfg, "trainer.max_epochs", whole=True)
    if steps is not None and (steps == 0 or steps < -1):
        raise UserError(
            f"trainer.max_steps={steps} trains nothing: give the number of optimizer steps, "
            "e.g. trainer.max_steps=800"
        )
    if steps == -1 and (epochs is None or epochs <= 0):
        raise UserError(
            "trainer.max_steps=-1 and no trainer.max_epochs: the run would never end; set "
            "trainer.max_steps=N or trainer.max_epochs=N"
        )
    for key in ("data.batch_size", "trainer.accumulate_grad_batches", "data.resolution"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "data.num_workers", 0)
    _at_least(cfg, "sampling.num_inference_steps", 1)
    _at_least(cfg, "sampling.guidance_scale", 0, whole=False)
    _at_least(cfg, "callbacks.model_checkpoint.every_n_train_steps", 1)
    _at_least(cfg, "callbacks.samples.every_n_steps", 0)
    if OmegaConf.select(cfg, "method.rank", default=None) is not None:
        _at_least(cfg, "method.rank", 1, why="the adapter's or LoRA's width")
    if OmegaConf.select(cfg, "eval.enabled", default=False):
        _at_least(cfg, "eval.images_per_prompt", 1)
        _at_least(cfg, "eval.num_inference_steps", 1)
    clip = _number(cfg, "trainer.gradient_clip_val")
    if clip is not None and clip <= 0:
        raise UserError(
            f"trainer.gradient_clip_val={clip} must be positive, or null for no clipping"
        )
    _number(cfg, "seed", whole=True)


def check_objective(cfg: DictConfig) -> None:
    """The `noise` keys and the sampler fit the objective the model's pipeline samples (DDPM
    or flow matching), before any weights load."""
    from t2ilab.flow import SAMPLERS as FLOW_SAMPLERS
    from t2ilab.models.families import family_of
    from t2ilab.noise import NoiseConfig

    objective = family_of(cfg.model).objective
    noise = NoiseConfig.from_dict(OmegaConf.to_container(cfg.noise, resolve=True))
    noise.for_objective(objective, cfg.model.name)
    name = cfg.get("sampling", {}).get("scheduler")
    if name and (name in FLOW_SAMPLERS) != (objective == "flow"):
        kind = "flow-matching" if objective == "flow" else "DDPM"
        use = " or ".join(FLOW_SAMPLERS) if objective == "flow" else "e.g. DDIMScheduler"
        raise UserError(
            f"sampling.scheduler={name} cannot sample model={cfg.model.name}'s {kind} schedule: "
            f"use {use} (or leave sampling.scheduler unset)"
        )


def check_prior_preservation(cfg: DictConfig) -> None:
    """Prior preservation that would silently drop out of the loss."""
    method = cfg.get("method") or {}
    if not method.get("prior_preservation", False):
        return
    count = _number(cfg, "method.num_class_images", whole=True)
    if count is not None and count < 1:
        raise UserError(
            f"method.num_class_images={count} with method.prior_preservation=true: the prior "
            "loss would have no class images; set method.num_class_images=N (e.g. 200) or "
            "method.prior_preservation=false"
        )
    weight = _number(cfg, "method.prior_loss_weight")
    if weight is not None and weight <= 0:
        raise UserError(
            f"method.prior_loss_weight={weight} with method.prior_preservation=true weighs the "
            "prior loss out: use a positive weight (the paper's 1.0), or "
            "method.prior_preservation=false"
        )
    _at_least(cfg, "method.class_image_batch_size", 1)


def check_something_trains(cfg: DictConfig) -> None:
    method = cfg.get("method") or {}
    if (
        "train_unet" in method
        and not method.get("train_unet")
        and not method.get("train_text_encoder", False)
    ):
        raise UserError(
            "method.train_unet=false and method.train_text_encoder=false: nothing would train; "
            "set one of them to true"
        )


def check_devices(cfg: DictConfig) -> None:
    """trainer.devices that this machine does not have, before anything loads (Lightning would
    find out after the weights loaded, with a traceback)."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "cpu"))
    devices = trainer.get("devices", 1)
    wanted = None
    if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        wanted = int(devices)
        if wanted == 0 or wanted < -1:
            raise UserError(f"trainer.devices={devices}: use a positive count, or -1 for all")
    elif devices is not None and not isinstance(devices, str):
        wanted = len(list(devices))  # a list of device indices
    if accelerator in ("gpu", "cuda"):
        import torch

        available = torch.cuda.device_count()
        if available == 0:
            raise UserError(
                f"trainer.accelerator={accelerator} but torch sees no GPU here: use trainer=cpu, "
                "or install a CUDA build of torch on a machine with a GPU"
            )
        if wanted is not None and wanted > available:
            raise UserError(
                f"trainer.devices={devices} but this machine has {available} GPU(s): use "
                f"trainer.devices={available} (or -1 for all)"
            )
    elif accelerator == "cpu" and wanted is not None and wanted > (os.cpu_count() or 1):
        raise UserError(
            f"trainer.devices={devices} CPU processes but this machine has {os.cpu_count()} "
            f"cores: use at most trainer.devices={os.cpu_count()}"
        )


def fill_prompt(template: str, prompt_vars: dict) -> str:
    """A sample-grid prompt template filled with the run's variables ({identifier}, ...): the
    one rule the samples callback applies and `check_sample_prompts` tries before training."""
    try:
        return str(template).format(**prompt_vars)
    except KeyError as err:
        known = ", ".join("{" + k + "}" for k in sorted(prompt_vars)) or "none"
        raise UserError(
            f"callbacks.samples.prompts: {template!r} uses {{{err.args[0]}}}, which this "
            f"run's data does not define (its variables: {known}); write the prompt out, "
            "or set callbacks.samples.prompts=null for the data's own prompts"
        ) from None
    except (IndexError, ValueError) as err:  # {} or unbalanced braces
        raise UserError(
            f"callbacks.samples.prompts: {template!r} is not a template "
            f"({type(err).__name__}: {err}); use {{{{ }}}} for literal braces"
        ) from None


def check_sample_prompts(cfg: DictConfig, prompt_vars: dict) -> None:
    """The sample grid's prompts use only variables this run's data defines: a template naming
    another ({identifier} on a run without a subject) would stop training at the first grid.
    A class-conditional model's grid draws classes and reads no prompts."""
    if not family_of(cfg.model).text:
        return
    for template in OmegaConf.select(cfg, "callbacks.samples.prompts") or []:
        fill_prompt(template, prompt_vars)
