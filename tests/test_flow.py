"""The flow-matching objective (t2ilab.flow, t2ilab.objectives.FlowObjective), each part
checked against an independent computation: the noising and its derivative, the velocity
target, the moments of each timestep density (numerical integration), both shifts, the loss
weights, the sampler, and the one-line refusals of keys that make no sense under it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _support import SeededDraws
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from scipy import integrate, stats

from t2ilab import flow
from t2ilab.errors import UserError
from t2ilab.models.pipelines import make_sampler
from t2ilab.modules.step_random import GroupedDraws, StepRandom
from t2ilab.noise import NoiseConfig
from t2ilab.objectives import FlowObjective

SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def flow_noise(**keys) -> NoiseConfig:
    return NoiseConfig.from_dict(keys).for_objective("flow", "tiny_sd3")


def test_noising_is_the_straight_line_and_the_target_its_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, e = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = flow.noised(x0, e, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], e[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * e[1])
    # The target is d x_t / d t, measured by a central difference.
    h = 1e-3
    t_mid = torch.full((3,), 0.5)
    slope = (flow.noised(x0, e, t_mid + h) - flow.noised(x0, e, t_mid - h)) / (2 * h)
    assert torch.allclose(slope, flow.velocity(x0, e), atol=1e-3)


def test_the_objective_feeds_the_denoiser_t_times_1000_and_noises_at_t():
    objective = FlowObjective(SD3_SCHEDULER, flow_noise(timestep_density="uniform", shift=1.0))
    latents = torch.randn(4, 4, 8, 8)
    noise = torch.randn_like(latents)
    timesteps = objective.timesteps(SeededDraws(), latents)
    t = timesteps / 1000
    assert ((t > 0) & (t <= 1)).all()
    expected = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
    assert torch.allclose(objective.noised(latents, noise, timesteps), expected, atol=1e-6)
    assert torch.equal(objective.target(latents, noise, timesteps), noise - latents)


def _moments(density: str, **keys) -> tuple[float, float]:
    objective = FlowObjective(
        SD3_SCHEDULER, flow_noise(timestep_density=density, shift=1.0, **keys)
    )
    t = objective.t(SeededDraws(), torch.zeros(40_000, 1, 2, 2)).double()
    return float(t.mean()), float(t.var())


def _integrated_moments(t_of) -> tuple[float, float]:
    mean = integrate.quad(t_of, 0, 1)[0]
    second = integrate.quad(lambda u: t_of(u) ** 2, 0, 1)[0]
    return mean, second - mean**2


@pytest.mark.parametrize(
    "density, keys, t_of",
    [
        ("uniform", {}, lambda u: u),
        # logit-normal: t = sigmoid(m + s * Phi^-1(u)) for uniform u
        (
            "logit_normal",
            {"logit_mean": 0.5, "logit_std": 1.2},
            lambda u: 1 / (1 + math.exp(-(0.5 + 1.2 * stats.norm.ppf(u)))),
        ),
        (
            "mode",
            {"mode_scale": 1.29},
            lambda u: 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u),
        ),
    ],
)
def test_each_timestep_density_has_its_moments(density, keys, t_of):
    mean, var = _moments(density, **keys)
    expected_mean, expected_var = _integrated_moments(t_of)
    n = 40_000
    assert abs(mean - expected_mean) < 4 * math.sqrt(expected_var / n)
    assert abs(var - expected_var) < 0.05 * expected_var


def test_the_logit_normal_mean_moves_the_draws_towards_noise():
    assert _moments("logit_normal", logit_mean=1.0)[0] > 0.65 > _moments("logit_normal")[0]


def test_the_static_shift_is_sd3s_and_moves_t_towards_noise():
    t = torch.linspace(0.001, 1, 1000).flip(0)
    shifted = flow.static_shift(t, 3.0)
    # The scheduler builds its training sigmas with the same shift.
    assert torch.allclose(shifted, FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas, atol=1e-6)
    assert flow.static_shift(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    assert (flow.static_shift(t, 1.0) == t).all()


def test_the_dynamic_shift_follows_the_image_size_as_flux_samples_it():
    # mu is linear in the token count: 0.5 at 256 tokens, 1.15 at 4096 (Flux's config).
    assert flow.dynamic_mu(256, FLUX_SCHEDULER) == pytest.approx(0.5)
    assert flow.dynamic_mu(4096, FLUX_SCHEDULER) == pytest.approx(1.15)
    assert flow.dynamic_mu(2176, FLUX_SCHEDULER) == pytest.approx(0.825)
    t = torch.tensor([0.1, 0.5, 0.9])
    mu = 1.15
    by_hand = torch.tensor([math.exp(mu) / (math.exp(mu) + (1 / x - 1)) for x in t.tolist()])
    assert torch.allclose(flow.dynamic_shift(t, mu), by_hand)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    assert torch.allclose(flow.dynamic_shift(t, mu), scheduler.time_shift(mu, 1.0, t))
    # A 1024 px Flux image is 64x64 packed tokens of 2x2 latents: 4096, the largest shift.
    objective = FlowObjective(FLUX_SCHEDULER, flow_noise(timestep_density="uniform"))
    # Only the shapes matter: expanded views, no memory.
    small = torch.zeros(1, 16, 32, 32).expand(20_000, -1, -1, -1)
    large = torch.zeros(1, 16, 128, 128).expand(20_000, -1, -1, -1)
    assert objective.image_seq_len(large) == 4096
    t_small = objective.t(SeededDraws(1), small)
    t_large = objective.t(SeededDraws(1), large)
    assert (t_large >= t_small).all() and t_large.mean() > t_small.mean() + 0.05


def test_loss_weightings():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert flow.loss_weights(t, "none") is None
    assert torch.allclose(flow.loss_weights(t, "sigma_sqrt"), 1 / t**2)
    cosmap = 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    assert torch.allclose(flow.loss_weights(t, "cosmap"), cosmap)


def test_the_training_draws_are_keyed_by_step_and_row():
    objective = FlowObjective(SD3_SCHEDULER, flow_noise())
    latents = torch.zeros(3, 4, 8, 8)

    def at(step):
        return objective.timesteps(GroupedDraws(StepRandom(0, (step, 0, 0)), 3), latents)

    assert torch.equal(at(5), at(5)) and not torch.equal(at(5), at(6))
    # The SD3 default: logit-normal(0, 1) shifted by the model's 3.0, within (0, 1000].
    assert objective.density.name == "logit_normal" and objective.config["shift"] == 3.0


def test_the_export_samples_with_the_trained_shift():
    objective = FlowObjective(SD3_SCHEDULER, flow_noise(shift=2.0))
    sampler = make_sampler(None, objective.inference_config())
    assert isinstance(sampler, FlowMatchEulerDiscreteScheduler)
    assert sampler.config.shift == 2.0 and not sampler.config.use_dynamic_shifting
    with pytest.raises(UserError, match="cannot sample a flow-matching schedule"):
        make_sampler("DDIMScheduler", objective.inference_config())
    ddpm = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    assert isinstance(make_sampler(None, ddpm), DDIMScheduler)
    with pytest.raises(UserError, match="cannot sample a DDPM schedule"):
        make_sampler("FlowMatchEulerDiscreteScheduler", ddpm)
    # Recent DDPM-family schedulers carry flow keys too (PixArt-Sigma's DPM-Solver): the class
    # decides.
    dpm = {"_class_name": "DPMSolverMultistepScheduler", "use_dynamic_shifting": False, **ddpm}
    assert isinstance(make_sampler(None, dpm), DDIMScheduler)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"beta_schedule": "sigmoid"}, "noise.beta_schedule=sigmoid makes no sense under flow"),
        ({"zero_terminal_snr": True}, "already reaches pure noise at t = 1"),
        ({"snr_gamma": 5.0}, "noise.snr_gamma=5.0 makes no sense under flow"),
        ({"prediction_type": "v_prediction"}, "noise.prediction_type"),
    ],
)
def test_ddpm_keys_are_refused_under_flow_in_one_line(keys, message):
    with pytest.raises(UserError, match=message) as err:
        flow_noise(**keys)
    assert "\n" not in str(err.value)


def test_flow_keys_and_objective_are_refused_on_a_ddpm_model():
    with pytest.raises(UserError, match="noise.shift=3.0 applies to flow matching"):
        NoiseConfig.from_dict({"shift": 3.0}).for_objective("ddpm", "toy_sd")
    with pytest.raises(UserError, match="model=toy_sd samples with DDPM"):
        NoiseConfig.from_dict({"objective": "flow"}).for_objective("ddpm", "toy_sd")
    with pytest.raises(UserError, match="noise.timestep_density='cubic' is not one of"):
        NoiseConfig.from_dict({"timestep_density": "cubic"})
    assert NoiseConfig.from_dict({}).for_objective("flow", "m").objective == "flow"


def test_moments_helper_agrees_with_scipy_for_the_standard_logit_normal():
    # The integration above, checked once against scipy's own expectation.
    expected = stats.norm.expect(lambda z: 1 / (1 + np.exp(-z)))
    assert _integrated_moments(lambda u: 1 / (1 + math.exp(-stats.norm.ppf(u))))[0] == (
        pytest.approx(expected, abs=1e-6)
    )
