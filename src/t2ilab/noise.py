"""Noise schedules and loss weighting, on top of diffusers' DDPMScheduler (the `noise` axis;
its flow-matching half is t2ilab.flow, and t2ilab.objectives puts both behind one interface).

The beta schedule (linear | scaled_linear | squaredcos_cap_v2 | sigmoid) and the zero-terminal-SNR
rescale (Lin et al. 2023, Algorithm 1, as used by Improved DreamBooth) are diffusers' own; this module
only merges the user's `noise` config over the model's scheduler config, and adds what a training
step needs: offset noise, the target for each prediction type, and Min-SNR-gamma weights that stay
finite where SNR == 0.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from t2ilab import flow
from t2ilab.errors import UserError

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction")
OBJECTIVES = ("ddpm", "flow")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys of the `noise` config that map 1:1 onto DDPMScheduler arguments.
_SCHEDULER_KEYS = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "num_train_timesteps",
    "prediction_type",
)

# Keys of each objective that the other refuses (NoiseConfig.for_objective).
_DDPM_ONLY = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "zero_terminal_snr",
    "prediction_type",
    "timestep_spacing",
    "snr_gamma",
)
_FLOW_ONLY = (
    "shift",
    "dynamic_shift",
    "loss_weighting",
)

# What diffusers' Euler and DPM-Solver put in place of alphas_cumprod[-1] == 0 so that
# sigma = sqrt((1 - a) / a) stays finite; we write the same clamp into epsilon exports.
TERMINAL_ALPHA_CUMPROD_CLAMP = 2.0**-24


@dataclass(frozen=True)
class NoiseConfig:
    """The `noise` config group. `None` means: keep the model's own value."""

    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    num_train_timesteps: int | None = None
    zero_terminal_snr: bool = False
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    # ddpm | flow; None: what the model's pipeline samples (its family's objective)
    objective: str | None = None
    # Both objectives: the density of t/T (None: uniform under DDPM, logit-normal under flow).
    timestep_density: str | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    # Flow matching only (t2ilab.flow); None: the model's own value or the recipe's default.
    shift: float | None = None
    dynamic_shift: bool | None = None
    loss_weighting: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> NoiseConfig:
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown noise keys: {sorted(unknown)}")
        noise = cls(**cfg)
        noise.validate()
        return noise

    def validate(self) -> None:
        _check_choice("noise.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("noise.prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("noise.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.offset_noise < 0:
            raise UserError(f"noise.offset_noise={self.offset_noise} must be >= 0 (0.1 is typical)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"noise.snr_gamma={self.snr_gamma} must be > 0 (5.0 is the paper's)")
        _check_choice("noise.objective", self.objective, OBJECTIVES)
        _check_choice("noise.timestep_density", self.timestep_density, flow.DENSITIES)
        _check_choice("noise.loss_weighting", self.loss_weighting, flow.LOSS_WEIGHTINGS)
        if self.logit_std is not None and self.logit_std <= 0:
            raise UserError(f"noise.logit_std={self.logit_std} must be > 0 (SD3 uses 1.0)")
        if self.shift is not None and self.shift <= 0:
            raise UserError(f"noise.shift={self.shift} must be > 0 (1 is no shift; SD3 uses 3.0)")

    def for_objective(self, model_objective: str, model: str) -> NoiseConfig:
        """This config with its objective resolved against the model's (what its pipeline
        samples), refusing in one line any key that makes no sense under that objective."""
        objective = self.objective or model_objective
        if objective != model_objective:
            raise UserError(
                f"noise.objective={objective}: model={model} samples with "
                f"{'flow matching' if model_objective == 'flow' else 'DDPM-family schedulers'}, "
                f"so it trains with noise.objective={model_objective} (or leave it unset)"
            )
        if objective == "flow":
            for key in _DDPM_ONLY:
                value = getattr(self, key)
                if value not in (None, False):
                    raise UserError(
                        f"noise.{key}={value} makes no sense under flow matching: rectified flow "
                        "already reaches pure noise at t = 1 and has no betas; drop it (the flow "
                        "keys are shift, dynamic_shift, loss_weighting; the timestep density is "
                        "shared)"
                    )
        else:
            for key in _FLOW_ONLY:
                value = getattr(self, key)
                if value is not None:
                    raise UserError(
                        f"noise.{key}={value} applies to flow matching (noise=flow); "
                        f"model={model} trains with DDPM: drop it"
                    )
        return dataclasses.replace(self, objective=objective)


def _check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}")


def build_noise_scheduler(
    model_scheduler_config: dict[str, Any], noise: NoiseConfig
) -> DDPMScheduler:
    """The training scheduler: the model's scheduler config with the user's overrides applied."""
    config = {k: v for k, v in dict(model_scheduler_config).items() if not k.startswith("_")}
    for key in _SCHEDULER_KEYS:
        value = getattr(noise, key)
        if value is not None:
            config[key] = value
    if noise.beta_schedule is not None:
        config.pop("trained_betas", None)  # an explicit schedule replaces stored betas
    config["rescale_betas_zero_snr"] = bool(noise.zero_terminal_snr)
    config.setdefault("prediction_type", "epsilon")
    if noise.zero_terminal_snr and config["prediction_type"] == "epsilon":
        log.warning(
            "zero terminal SNR with epsilon prediction: the last timestep carries no signal, so "
            "samplers clamp it; v-prediction is recommended (noise.prediction_type=v_prediction)"
        )
    return DDPMScheduler.from_config(config)


def resolved_beta_schedule(config) -> str:
    """The named schedule a scheduler config trains with. Exports store their betas as
    `trained_betas` (which win over `beta_schedule`, then a stale label): name the schedule they
    equal, or "trained_betas" when they equal none."""
    betas = config.get("trained_betas") if hasattr(config, "get") else None
    if betas is None:
        return config["beta_schedule"]
    betas = torch.tensor(betas, dtype=torch.float64)
    for name in BETA_SCHEDULES:
        candidate = DDPMScheduler(
            num_train_timesteps=len(betas),
            beta_start=config["beta_start"],
            beta_end=config["beta_end"],
            beta_schedule=name,
        ).betas.double()
        if torch.allclose(candidate, betas, rtol=1e-4, atol=1e-7):
            return name
    return "trained_betas"


def sample_noise(
    draw: Callable[[str, tuple[int, ...]], torch.Tensor],
    shape: tuple[int, ...],
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise (Guttenberg 2023) when `offset_noise` > 0.

    `draw(name, shape)` gives standard-normal draws; training keys them by step and row, so the
    named draws ("noise", "offset") are what a resumed run must repeat."""
    noise = draw("noise", tuple(shape))
    if offset_noise > 0:
        noise = noise + offset_noise * draw("offset", (*shape[:2], 1, 1))
    return noise


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network must predict, by the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise UserError(f"unsupported prediction_type {prediction_type!r}")


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float
) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), one per timestep.

    epsilon: min(SNR, g) / SNR, whose limit at SNR -> 0 is 1, used where SNR == 0 (zero terminal
    SNR) instead of 0/0. v_prediction: min(SNR, g) / (SNR + 1), finite everywhere.
    sample: min(SNR, g).
    """
    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        safe_snr = torch.where(snr > 0, snr, torch.ones_like(snr))
        return torch.where(snr > 0, clipped / safe_snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise UserError(f"unsupported prediction_type {prediction_type!r}")


def inference_scheduler_config(scheduler: DDPMScheduler, noise: NoiseConfig) -> dict[str, Any]:
    """A scheduler config that any diffusers sampler (DDIM, DPM-Solver, Euler, PNDM...) accepts
    and that reproduces the training schedule exactly.

    The betas are written out as `trained_betas`, because DDIM and DPM-Solver reject
    beta_schedule="sigmoid" and would otherwise silently rebuild a different schedule. With zero
    terminal SNR, v-prediction keeps the exact schedule (alphas_cumprod[-1] == 0) and sets
    `rescale_betas_zero_snr` so Euler/DPM-Solver apply their own clamp; epsilon prediction cannot
    sample from a pure-noise step without dividing by zero, so its last beta is clamped to give
    alphas_cumprod[-1] == 2**-24, as diffusers' Euler does.
    """
    betas = scheduler.betas.double().clone()
    prediction_type = scheduler.config.prediction_type
    rescale_flag = False
    if noise.zero_terminal_snr:
        if prediction_type == "epsilon":
            warnings.warn(
                "sampling a zero-terminal-SNR schedule with epsilon prediction: clamping "
                "alphas_cumprod[-1] to 2**-24 so samplers do not produce NaN; "
                "v-prediction is recommended (noise.prediction_type=v_prediction)",
                UserWarning,
                stacklevel=2,
            )
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            betas[-1] = 1.0 - TERMINAL_ALPHA_CUMPROD_CLAMP / alphas_cumprod[-2]
        else:
            rescale_flag = True
    spacing = noise.timestep_spacing
    if spacing is None:
        # Lin et al. 2023 sec. 3.3: with ZTSNR, sampling must start from the last timestep.
        spacing = "trailing" if noise.zero_terminal_snr else scheduler.config.timestep_spacing
    return {
        "num_train_timesteps": int(scheduler.config.num_train_timesteps),
        "beta_start": float(scheduler.config.beta_start),
        "beta_end": float(scheduler.config.beta_end),
        "beta_schedule": "linear",  # ignored: trained_betas take precedence
        "trained_betas": [float(b) for b in betas.tolist()],
        "prediction_type": prediction_type,
        "timestep_spacing": spacing,
        "rescale_betas_zero_snr": rescale_flag,
        "steps_offset": int(scheduler.config.get("steps_offset", 0) or 0),
        "clip_sample": False,
        "set_alpha_to_one": False,
    }
