"""Noise schedules against independent implementations of the papers' formulas."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from _support import SeededDraws
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from t2ilab.errors import UserError
from t2ilab.noise import (
    TERMINAL_ALPHA_CUMPROD_CLAMP,
    NoiseConfig,
    build_noise_scheduler,
    inference_scheduler_config,
    min_snr_weights,
    sample_noise,
    training_target,
)

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def np_scaled_linear(start, end, n):
    return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2


def np_sigmoid(start, end, n):
    x = np.linspace(-6, 6, n, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start


def np_algorithm1(betas):
    """Lin et al. 2023, Algorithm 1 (as printed in the paper, in numpy)."""
    alphas = 1.0 - betas
    alphas_bar = np.cumprod(alphas)
    alphas_bar_sqrt = np.sqrt(alphas_bar)
    a0, aT = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt -= aT
    alphas_bar_sqrt *= a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = np.concatenate([alphas_bar[0:1], alphas])
    return 1 - alphas


def expected_betas(schedule: str, zsnr: bool):
    base = np_sigmoid if schedule == "sigmoid" else np_scaled_linear
    betas = base(0.00085, 0.012, 1000)
    return np_algorithm1(betas) if zsnr else betas


ARMS = [("scaled_linear", False), ("scaled_linear", True), ("sigmoid", False), ("sigmoid", True)]


@pytest.mark.parametrize("schedule,zsnr", ARMS)
def test_training_schedule_matches_independent_formulas(schedule, zsnr):
    noise = NoiseConfig(beta_schedule=schedule, zero_terminal_snr=zsnr)
    scheduler = build_noise_scheduler(SD_SCHEDULER, noise)
    expected = expected_betas(schedule, zsnr)
    # diffusers rescales in float32: betas, as ratios of cumulative products, carry its rounding.
    np.testing.assert_allclose(scheduler.betas.double().numpy(), expected, rtol=1e-3, atol=1e-7)
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(alphas_cumprod, np.cumprod(1 - expected), rtol=2e-5, atol=1e-7)
    if zsnr:
        assert alphas_cumprod[-1] == 0.0
        # Algorithm 1 keeps the first step's signal level.
        assert math.isclose(alphas_cumprod[0], 1 - expected_betas(schedule, False)[0], rel_tol=1e-5)
    else:
        assert alphas_cumprod[-1] > 0


def test_sigmoid_differs_from_the_model_schedule():
    sig = build_noise_scheduler(SD_SCHEDULER, NoiseConfig(beta_schedule="sigmoid")).betas
    own = build_noise_scheduler(SD_SCHEDULER, NoiseConfig()).betas
    assert not torch.allclose(sig, own)


def test_overrides_keep_model_values_when_null():
    scheduler = build_noise_scheduler(
        dict(SD_SCHEDULER, prediction_type="v_prediction"), NoiseConfig(num_train_timesteps=500)
    )
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 500
    assert scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize(
    "bad", [{"beta_schedule": "cosine"}, {"prediction_type": "x0"}, {"snr_gamma": 0}]
)
def test_noise_config_rejects_unknown_values(bad):
    with pytest.raises(ValueError):
        NoiseConfig.from_dict(bad)


SAMPLERS = [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler]


@pytest.mark.parametrize("schedule,zsnr", ARMS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_sampler_reproduces_the_training_schedule(schedule, zsnr, prediction_type):
    noise = NoiseConfig(
        beta_schedule=schedule, zero_terminal_snr=zsnr, prediction_type=prediction_type
    )
    train = build_noise_scheduler(SD_SCHEDULER, noise)
    with (
        pytest.warns(UserWarning, match="v-prediction is recommended")
        if (zsnr and prediction_type == "epsilon")
        else _no_warning()
    ):
        config = inference_scheduler_config(train, noise)
    assert config["prediction_type"] == prediction_type
    for cls in SAMPLERS:
        sampler = cls.from_config(config)
        ac = sampler.alphas_cumprod.double()
        # Identical to the training schedule except the terminal clamp for epsilon.
        torch.testing.assert_close(
            ac[:-1], train.alphas_cumprod.double()[:-1], rtol=1e-5, atol=1e-8
        )
        if not zsnr:
            torch.testing.assert_close(ac[-1], train.alphas_cumprod.double()[-1], rtol=1e-5, atol=0)
        elif prediction_type == "epsilon":
            assert math.isclose(float(ac[-1]), TERMINAL_ALPHA_CUMPROD_CLAMP, rel_tol=1e-3)
        elif cls is DDIMScheduler or cls is PNDMScheduler:
            assert float(ac[-1]) == 0.0  # exact Algorithm 1 (v-prediction samples fine from it)
        else:
            assert float(ac[-1]) == TERMINAL_ALPHA_CUMPROD_CLAMP  # the sampler's own clamp
    if zsnr:
        assert config["timestep_spacing"] == "trailing"


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def test_ddim_samples_without_nan_from_zero_terminal_snr_epsilon():
    noise = NoiseConfig(beta_schedule="sigmoid", zero_terminal_snr=True)
    train = build_noise_scheduler(SD_SCHEDULER, noise)
    with pytest.warns(UserWarning):
        config = inference_scheduler_config(train, noise)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        sampler = cls.from_config(config)
        sampler.set_timesteps(5)
        sample = torch.randn(1, 4, 8, 8) * sampler.init_noise_sigma
        assert int(sampler.timesteps[0]) == 999  # trailing spacing starts at pure noise
        for t in sampler.timesteps:
            model_in = sampler.scale_model_input(sample, t)
            eps = torch.randn_like(model_in) * 0.5 + 0.1 * model_in
            sample = sampler.step(eps, t, sample).prev_sample
        assert torch.isfinite(sample).all(), cls.__name__


def test_targets_by_prediction_type():
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    eps_sched = build_noise_scheduler(SD_SCHEDULER, NoiseConfig())
    assert torch.equal(training_target(eps_sched, latents, noise, t), noise)
    v_sched = build_noise_scheduler(SD_SCHEDULER, NoiseConfig(prediction_type="v_prediction"))
    ac = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * latents
    torch.testing.assert_close(training_target(v_sched, latents, noise, t), v)


def test_offset_noise_adds_a_per_channel_constant():
    def seeded():
        g = torch.Generator().manual_seed(0)
        return lambda name, shape: torch.randn(shape, generator=g)

    shape = (2, 4, 16, 16)
    plain = sample_noise(seeded(), shape, 0.0)
    offset = sample_noise(seeded(), shape, 0.5)
    diff = offset - plain
    # The difference is constant over H, W and differs between channels.
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff[:, :, 0, 0].std() > 0


def hand_snr(alphas_cumprod, t):
    a = alphas_cumprod[t]
    return a / (1 - a)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_hand_computation(prediction_type):
    noise = NoiseConfig(prediction_type=prediction_type)
    scheduler = build_noise_scheduler(SD_SCHEDULER, noise)
    t = torch.tensor([0, 10, 300, 999])
    gamma = 5.0
    snr = hand_snr(scheduler.alphas_cumprod.double(), t)
    clipped = torch.clamp(snr, max=gamma)
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    torch.testing.assert_close(
        min_snr_weights(scheduler, t, gamma).double(), expected, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_finite_at_zero_terminal_snr(prediction_type):
    noise = NoiseConfig(zero_terminal_snr=True, prediction_type=prediction_type)
    scheduler = build_noise_scheduler(SD_SCHEDULER, noise)
    w = min_snr_weights(scheduler, torch.tensor([998, 999]), 5.0)
    assert torch.isfinite(w).all()
    # epsilon: the limit of min(SNR, g)/SNR as SNR -> 0 is 1; v: min(SNR, g)/(SNR+1) = 0 at SNR 0.
    assert float(w[1]) == (1.0 if prediction_type == "epsilon" else 0.0)


def test_the_resolved_schedule_names_what_stored_betas_are():
    """Exports keep their betas as trained_betas and a stale beta_schedule label; results.json
    names the schedule the betas are."""
    from t2ilab.noise import resolved_beta_schedule

    def config(schedule: str, label: str) -> dict:
        betas = diffusers.DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule=schedule
        ).betas.tolist()
        return {
            "trained_betas": betas,
            "beta_schedule": label,
            "beta_start": 0.00085,
            "beta_end": 0.012,
        }

    assert resolved_beta_schedule(config("scaled_linear", "linear")) == "scaled_linear"
    assert resolved_beta_schedule(config("sigmoid", "linear")) == "sigmoid"
    assert resolved_beta_schedule({"beta_schedule": "linear", "trained_betas": None}) == "linear"
    odd = config("linear", "linear")
    odd["trained_betas"] = [b * 1.5 for b in odd["trained_betas"]]
    assert resolved_beta_schedule(odd) == "trained_betas"


def _ddpm(**keys):
    from t2ilab.objectives import DDPMObjective

    return DDPMObjective(SD_SCHEDULER, NoiseConfig.from_dict(keys).for_objective("ddpm", "toy_sd"))


def test_ddpm_timesteps_stay_sds_uniform_draws_by_default():
    latents = torch.zeros(64, 4, 2, 2)
    drawn = _ddpm().timesteps(SeededDraws(3), latents)
    assert torch.equal(
        drawn, torch.randint(1000, (64,), generator=torch.Generator().manual_seed(3))
    )
    assert "noise.timestep_density" not in _ddpm().factors()


def test_a_logit_normal_density_moves_ddpm_training_towards_high_noise():
    from scipy import stats

    n = 40_000
    objective = _ddpm(timestep_density="logit_normal", logit_mean=1.0, logit_std=1.0)
    t = objective.timesteps(SeededDraws(), torch.zeros(n, 1, 2, 2))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    # P(t >= 800) = P(sigmoid(1 + n) >= 0.8) = 1 - Phi(logit(0.8) - 1), against 0.2 uniform.
    expected = 1 - stats.norm.cdf(math.log(0.8 / 0.2) - 1.0)
    share = float((t >= 800).double().mean())
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert share > 0.3
    assert objective.factors()["noise.timestep_density"] == "logit_normal"
    assert objective.factors()["noise.logit_mean"] == 1.0


def test_only_the_flow_shift_keys_are_refused_on_a_ddpm_model():
    _ddpm(timestep_density="mode", mode_scale=1.29)  # accepted: the density is shared
    for keys in ({"shift": 3.0}, {"dynamic_shift": True}, {"loss_weighting": "cosmap"}):
        with pytest.raises(UserError, match="applies to flow matching") as err:
            _ddpm(**keys)
        assert "\n" not in str(err.value)
