"""Rectified-flow (flow-matching) training, the objective of SD3 and Flux (Esser et al. 2024).

A clean latent x0 and noise e meet on a straight line: x_t = (1 - t) x0 + t e, with t in [0, 1]
(t = 1 is pure noise, so there is no terminal-SNR problem to fix), and the network predicts the
velocity e - x0. What varies between recipes is how t is drawn and shifted:
- the density of t (SD3 paper sec. 3.1): uniform, logit-normal (t = sigmoid(m + s n)) or "mode"
  (f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u));
- a shift that moves t towards noise, which larger images need (more pixels carry more of the
  same signal): static (SD3: t' = s t / (1 + (s - 1) t), shift 3) or resolution-dependent
  (Flux: t' = e^mu / (e^mu + 1/t - 1), with mu linear in the image's token count);
- an optional loss weighting (diffusers' `compute_loss_weighting_for_sd3`).

The denoiser takes t * num_train_timesteps, as diffusers' flow-matching pipelines pass it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

DENSITIES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# Keep t inside (0, 1]: t = 0 would be a clean input (no signal for the loss) and sigma_sqrt's
# weight 1/t^2 would be infinite. diffusers' schedulers use the same floor (1 / 1000 steps).
T_MIN = 1e-3


def t_from_uniform(u: torch.Tensor, density: str, mode_scale: float = 1.29) -> torch.Tensor:
    """t for uniform draws `u` under the "uniform" or "mode" density."""
    if density == "uniform":
        return u
    if density == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"{density} is not drawn from uniforms")


def t_from_normal(n: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0):
    """t for standard-normal draws `n` under the logit-normal density."""
    return torch.sigmoid(logit_mean + logit_std * n)


@dataclass(frozen=True)
class TimestepDensity:
    """The density of t in (0, 1) (SD3 paper sec. 3.1) with its parameters, as `noise.*` sets
    them; both objectives draw from it (t2ilab.objectives)."""

    name: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def configured(cls, noise, default: str) -> TimestepDensity:
        """From a NoiseConfig; `default` is the objective's own density when none is set."""
        given = {
            key: float(getattr(noise, key))
            for key in ("logit_mean", "logit_std", "mode_scale")
            if getattr(noise, key) is not None
        }
        return cls(noise.timestep_density or default, **given)

    def draw(self, draws, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise levels in (0, 1), drawn under the step's "timesteps" key."""
        if self.name == "logit_normal":
            return t_from_normal(draws.randn("timesteps", shape), self.logit_mean, self.logit_std)
        return t_from_uniform(draws.rand("timesteps", shape), self.name, self.mode_scale)

    def factors(self) -> dict[str, object]:
        """The density and the parameters it uses, as run factors."""
        factors: dict[str, object] = {"noise.timestep_density": self.name}
        if self.name == "logit_normal":
            factors.update({"noise.logit_mean": self.logit_mean, "noise.logit_std": self.logit_std})
        if self.name == "mode":
            factors["noise.mode_scale"] = self.mode_scale
        return factors


def static_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: the noise level at which an image of `shift`^2 times the pixels keeps the
    same signal (shift 1 is no change)."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_mu(image_seq_len: int, config: dict[str, Any]) -> float:
    """Flux's mu for an image of `image_seq_len` tokens, from the scheduler config's
    base/max shift and sequence lengths."""
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def dynamic_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's exponential time shift (the scheduler's time_shift with sigma = 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def noised(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - t) * latents + t * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t: what a rectified-flow model predicts."""
    return noise - latents


def loss_weights(t: torch.Tensor, weighting: str) -> torch.Tensor | None:
    if weighting == "none":
        return None
    return compute_loss_weighting_for_sd3(weighting, sigmas=t).float()


# The flow-matching schedulers a flow model samples with (diffusers' FlowMatch* classes).
SAMPLERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def is_flow_config(scheduler_config: dict[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching one (FlowMatchEulerDiscreteScheduler's):
    its class says so, or, with no class named, it has a shift and no betas (recent DDPM-family
    schedulers carry `use_dynamic_shifting` too)."""
    name = scheduler_config.get("_class_name")
    if name:
        return "FlowMatch" in str(name)
    return "shift" in scheduler_config and "beta_start" not in scheduler_config
