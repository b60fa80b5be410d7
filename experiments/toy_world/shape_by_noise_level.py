"""At which noise levels is a toy object's shape decided? An ideal observer's answer.

    python experiments/toy_world/shape_by_noise_level.py [--out shape_by_noise_level.json]

For a large centred object of known colours on a known background (the scenes `sd_quality`
scores), the noised latent x_t = sqrt(a_t) z + sqrt(1 - a_t) e of one of the 8 shapes is given
to the Bayes-optimal classifier that knows all 8 clean latents z_k: it picks the k nearest to
x_t / sqrt(a_t) in the Gaussian's metric, i.e. argmin_k |x_t - sqrt(a_t) z_k|. Its accuracy at
t is an upper bound on what any denoiser can know of the shape from x_t alone, so the band of t
where it falls from near 1 to chance (1/8) is where a diffusion model has to decide the outline,
and the share of training draws that land there is how much of training teaches it.

Latents come from the shipped toy VAE (posterior mean x scaling_factor); the schedules are SD's
scaled-linear betas (toy_sd) and PixArt's linear ones (toy_pixart, DiT). One CPU thread, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TIMESTEPS = (300, 500, 600, 700, 800, 850, 900, 950, 980, 999)
SCHEDULES = {
    "sd_scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "pixart_linear": dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
}


def ideal_observer_accuracy(latents: torch.Tensor, alpha_bar: float, draws: int, gen) -> float:
    """Share of noised latents classified as their own shape; `latents` [8, C, H, W], one per
    shape, same colours."""
    a = torch.tensor(alpha_bar)
    right = 0
    for _ in range(draws):
        noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=gen)
        distance = ((noisy[:, None] - a.sqrt() * latents[None]) ** 2).flatten(2).sum(-1)
        right += int((distance.argmin(1) == torch.arange(len(latents))).sum())
    return right / (draws * len(latents))


def logit_normal_share(low: float, mean: float, std: float = 1.0) -> float:
    """P(t/T >= low) when t/T = sigmoid(mean + std n)."""
    z = (math.log(low / (1 - low)) - mean) / std
    return 0.5 * math.erfc(z / math.sqrt(2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--pairs", type=int, default=8, help="colour/background pairs")
    parser.add_argument("--draws", type=int, default=25, help="noise draws per pair and t")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL, DDPMScheduler

    from t2ilab.toy import quality
    from t2ilab.toy.world import SHAPES, Scene

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(ROOT / "models/toy/toy_vae").eval()
    pairs = [(s.color, s.background) for s in quality.sd_color_scenes(n=args.pairs)]
    with torch.no_grad():
        latents = [
            vae.encode(
                quality.render_batch(
                    [Scene(shape=k, color=c, background=b, size="large") for k in SHAPES]
                )
            ).latent_dist.mean
            * vae.config.scaling_factor
            for c, b in pairs
        ]
    table = {}
    for name, betas in SCHEDULES.items():
        alpha_bar = DDPMScheduler(num_train_timesteps=1000, **betas).alphas_cumprod
        gen = torch.Generator().manual_seed(0)
        table[name] = {
            t: sum(
                ideal_observer_accuracy(z, float(alpha_bar[t]), args.draws, gen) for z in latents
            )
            / len(latents)
            for t in TIMESTEPS
        }
        print(f"{name:>17}: " + "  ".join(f"t{t} {v:.2f}" for t, v in table[name].items()))
    shares = {
        "uniform": {f"t>={t}": round(1 - t / 1000, 3) for t in (700, 800, 900)},
        "logit_normal(1,1)": {
            f"t>={t}": round(logit_normal_share(t / 1000, 1.0), 3) for t in (700, 800, 900)
        },
    }
    print("share of training draws:", shares)
    if args.out:
        args.out.write_text(
            json.dumps({"pairs": pairs, "accuracy": table, "draw_shares": shares}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
