"""Does a toy Stable Diffusion take its background from the prompt or from the initial noise?

    python experiments/toy_world/dc_leak.py [MODEL] [--out dc_leak.json]

SD's scaled-linear schedule leaves sqrt(alpha_bar) = 0.085 of the image in the latent at the
first sampling step (t = 961 with 25 leading DDIM steps), and at 16x16 latents the per-channel
mean of the noise has a standard deviation of only 1/16. So the latent's per-channel mean, which
is mostly the background colour, is still readable through the noise, and a model can learn to
copy it instead of reading the background word (Lin et al. 2023's leak, at a small resolution
where it is strongest). At sampling time the noise is pure, so such a model draws whatever
background the noise's mean suggests.

The check samples the same 64 prompts of `sd_quality` (a large plain shape on a plain
background) from four kinds of initial noise, with the same seed:
- plain: the pipeline's own Gaussian noise;
- mean removed: the same noise with each channel's spatial mean subtracted;
- target mean: the mean replaced by the one the prompt's own render would leave at the first
  step (its latent's per-channel mean, scaled by sqrt(alpha_bar / (1 - alpha_bar)));
- another's mean: the same with the mean of another prompt's render.
A model that follows the prompt scores the same background in all four; one that reads the
noise follows the planted mean, right or wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def initial_noises(pipe, scenes, seed: int, steps: int) -> dict[str, torch.Tensor]:
    from t2ilab.toy import quality

    with torch.no_grad():
        latents = pipe.vae.encode(quality.render_batch(scenes)).latent_dist.mean
    latents = latents * pipe.vae.config.scaling_factor
    pipe.scheduler.set_timesteps(steps)
    alpha_bar = pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[0])]
    scale = (alpha_bar / (1 - alpha_bar)).sqrt()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    centred = noise - noise.mean((2, 3), keepdim=True)
    means = latents.mean((2, 3), keepdim=True)
    return {
        "plain": noise,
        "mean removed": centred,
        "target mean": centred + scale * means,
        "another's mean": centred + scale * means.roll(1, 0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=ROOT / "models/toy/toy_sd")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--n", type=int, default=64, help="prompts")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)

    from t2ilab.toy import quality
    from t2ilab.toy.world import dense_caption

    pipe = quality.load_scoring_pipeline(args.model)
    scenes = quality.sd_color_scenes(quality.EVAL_SEED, args.n)
    rows = {}
    for name, noise in initial_noises(pipe, scenes, quality.EVAL_SEED, args.steps).items():
        images = quality.batched_images(
            lambda batch, noise=noise: pipe(
                [dense_caption(scenes[i]) for i in batch],
                latents=noise[batch],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
            ),
            list(range(len(scenes))),
        )
        scores = quality.prompt_following(scenes, images)
        rows[name] = {k: v for k, v in scores.items() if not k.startswith("render")}
        print(f"{name:>15}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "n": args.n, **rows}, indent=2))


if __name__ == "__main__":
    main()
