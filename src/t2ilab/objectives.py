"""The training objective behind the one shared step: how timesteps are drawn, how latents are
noised, what the network predicts, the loss weights, and the scheduler config that samples the
result. DDPM (SD 1.x/2.x, SDXL, PixArt, DiT: t2ilab.noise) and rectified flow (SD3, Flux:
t2ilab.flow) are the two. Which one a model trains with is its family's (`Family.objective`);
`noise.objective` may only confirm it. `draws` is the step's keyed random source
(t2ilab.modules.step_random.GroupedDraws)."""

from __future__ import annotations

from typing import Any

import torch

from t2ilab import flow
from t2ilab.noise import (
    NoiseConfig,
    build_noise_scheduler,
    inference_scheduler_config,
    min_snr_weights,
    resolved_beta_schedule,
    training_target,
)


class DDPMObjective:
    """Integer timesteps (uniform, as SD trains, or from one of flow matching's densities), the
    scheduler's add_noise, an epsilon / v / sample target and Min-SNR-gamma weights."""

    name = "ddpm"

    def __init__(self, scheduler_config: dict[str, Any], noise: NoiseConfig):
        self.noise = noise
        self.scheduler = build_noise_scheduler(scheduler_config, noise)
        self.density = flow.TimestepDensity.configured(noise, default="uniform")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def timesteps(self, draws, latents: torch.Tensor) -> torch.Tensor:
        shape = tuple(latents.shape[:1])
        steps = self.num_train_timesteps
        if self.density.name == "uniform":  # SD's recipe
            return draws.randint("timesteps", shape, high=steps).long()
        # Another density (as flow matching draws t) moves the training towards a band of
        # noise levels, e.g. the high ones where a small model decides an object's outline.
        t = self.density.draw(draws, shape)
        return (t * steps).long().clamp(0, steps - 1)

    def noised(self, latents, noise, timesteps) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, timesteps)

    def loss_weights(self, timesteps) -> torch.Tensor | None:
        if self.noise.snr_gamma is None:
            return None
        return min_snr_weights(self.scheduler, timesteps, self.noise.snr_gamma)

    def inference_config(self) -> dict[str, Any]:
        return inference_scheduler_config(self.scheduler, self.noise)

    def factors(self) -> dict[str, Any]:
        config = self.scheduler.config
        return {
            "noise.objective": self.name,
            "noise.beta_schedule": resolved_beta_schedule(config),
            "noise.prediction_type": config.prediction_type,
            "noise.num_train_timesteps": config.num_train_timesteps,
            "noise.zero_terminal_snr": bool(config.rescale_betas_zero_snr),
            # named only when it is not SD's uniform one, so uniform runs' factor tables stay
            **({} if self.density.name == "uniform" else self.density.factors()),
        }


class FlowObjective:
    """Rectified flow (t2ilab.flow): t from the configured density, shifted as the model's
    scheduler says (static SD3 shift, or Flux's resolution-dependent one), x_t on the line
    from the latents to the noise, the velocity as target. The denoiser sees t * 1000."""

    name = "flow"

    def __init__(self, scheduler_config: dict[str, Any], noise: NoiseConfig, patch_size: int = 2):
        self.noise = noise
        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        if noise.num_train_timesteps is not None:
            config["num_train_timesteps"] = noise.num_train_timesteps
        config.setdefault("num_train_timesteps", 1000)
        if noise.shift is not None:
            config["shift"] = noise.shift
        config.setdefault("shift", 1.0)
        if noise.dynamic_shift is not None:
            config["use_dynamic_shifting"] = noise.dynamic_shift
        config.setdefault("use_dynamic_shifting", False)
        self.config = config
        self.patch_size = int(patch_size)
        # SD3's best (rf/lognorm(0, 1)) unless configured
        self.density = flow.TimestepDensity.configured(noise, default="logit_normal")
        self.weighting = noise.loss_weighting or "none"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config["num_train_timesteps"])

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens of one image: latent pixels over the patch area (Flux packs 2x2)."""
        return (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)

    def t(self, draws, latents: torch.Tensor) -> torch.Tensor:
        """The noise level of each row, in (0, 1]."""
        shape = tuple(latents.shape[:1])
        t = self.density.draw(draws, shape)
        if self.config["use_dynamic_shifting"]:
            t = flow.dynamic_shift(t, flow.dynamic_mu(self.image_seq_len(latents), self.config))
        else:
            t = flow.static_shift(t, float(self.config["shift"]))
        return t.clamp(flow.T_MIN, 1.0)

    def timesteps(self, draws, latents: torch.Tensor) -> torch.Tensor:
        return self.t(draws, latents) * self.num_train_timesteps

    def _t(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def noised(self, latents, noise, timesteps) -> torch.Tensor:
        return flow.noised(latents, noise, self._t(timesteps))

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        return flow.velocity(latents, noise)

    def loss_weights(self, timesteps) -> torch.Tensor | None:
        return flow.loss_weights(self._t(timesteps), self.weighting)

    def inference_config(self) -> dict[str, Any]:
        """FlowMatchEulerDiscreteScheduler's config with the shift trained with."""
        return dict(self.config)

    def factors(self) -> dict[str, Any]:
        return {
            "noise.objective": self.name,
            "noise.timestep_density": self.density.name,
            "noise.shift": "dynamic"
            if self.config["use_dynamic_shifting"]
            else self.config["shift"],
            "noise.loss_weighting": self.weighting,
            "noise.num_train_timesteps": self.num_train_timesteps,
        }


Objective = DDPMObjective | FlowObjective


def build_objective(
    scheduler_config: dict[str, Any], noise: NoiseConfig, patch_size: int = 2
) -> Objective:
    """The objective `noise` names (resolved by NoiseConfig.for_objective) over the model's
    scheduler config."""
    if noise.objective == "flow":
        return FlowObjective(scheduler_config, noise, patch_size)
    return DDPMObjective(scheduler_config, noise)
