"""Building diffusers pipelines and samplers from trained components."""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers import StableDiffusionPipeline

from t2ilab.errors import UserError
from t2ilab.flow import SAMPLERS as FLOW_SAMPLERS
from t2ilab.flow import is_flow_config


def make_sampler(name: str | None, config: dict[str, Any]):
    """A diffusers scheduler class by name (DDIMScheduler, DPMSolverMultistepScheduler, ...)
    over a training schedule's config. None: the schedule's own kind (DDIMScheduler for DDPM
    schedules, FlowMatchEulerDiscreteScheduler for flow matching). A DDPM sampler cannot run a
    flow-matching schedule, nor the other way round: that is one line."""
    flow_schedule = is_flow_config(config)
    if name is None:
        name = FLOW_SAMPLERS[0] if flow_schedule else "DDIMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(
            f"sampling.scheduler={name} is not a diffusers scheduler: use e.g. DDIMScheduler, "
            "DPMSolverMultistepScheduler, EulerDiscreteScheduler or PNDMScheduler"
        )
    if flow_schedule != (name in FLOW_SAMPLERS):
        kind = "flow-matching" if flow_schedule else "DDPM"
        use = " or ".join(FLOW_SAMPLERS) if flow_schedule else "e.g. DDIMScheduler"
        raise UserError(
            f"sampling.scheduler={name} cannot sample a {kind} schedule: use {use} "
            "(or leave sampling.scheduler unset)"
        )
    if flow_schedule:
        return cls.from_config(dict(config))
    # Most pipeline scheduler configs (PNDM in SD 1.x) predate `clip_sample`; latents of
    # latent diffusion must not be clipped, and DDIM warns loudly when the key is missing.
    return cls.from_config({"clip_sample": False, **dict(config)})


def build_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_kwargs(pipe) -> dict[str, Any]:
    """Call kwargs every sampling site passes, so a pipeline renders what was trained:
    - exactly the requested height/width: PixArt's pipelines otherwise snap sizes to
      aspect-ratio bins computed for an 8x VAE, wrong for tiny models and not what
      validation/evaluation at the training resolution wants;
    - prompts no longer than the tokenizer's length: PixArt's pipelines pad to 120 tokens by
      default, more positions than the toy PixArt's CLIP text tower has (T5 is left alone);
    - prompts as training tokenized them: PixArt's pipelines otherwise "clean" captions (and
      warn when beautifulsoup4 is missing), which training here never does."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {}
    if "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False
    if "clean_caption" in parameters:
        kwargs["clean_caption"] = False
    tokenizer = getattr(pipe, "tokenizer", None)
    length = parameters.get("max_sequence_length")
    if length is not None and tokenizer is not None:
        if int(tokenizer.model_max_length) < int(length.default):
            kwargs["max_sequence_length"] = int(tokenizer.model_max_length)
    return kwargs
