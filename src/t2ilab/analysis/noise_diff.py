"""Noise-prediction difference maps (Xiang et al. 2023, "A Closer Look at Parameter-Efficient
Tuning in Diffusion Models", sec. 5): where in an image does the identifier change the model?

For each image and timestep t the image latents are noised once with FIXED noise (one draw per
image from `seed`, shared by every timestep and both prompts), the model predicts the noise
under prompt A ("a photo of sks dog") and prompt B ("a photo of dog"), and the map is

    |eps_A - eps_B|, averaged over latent channels, bilinearly upsampled to image size.

Only the prompt differs between the two predictions, so the map shows exactly where (and at which
noise level) the fine-tuned concept steers the denoiser. A v- or x0-predicting model's output is
converted to epsilon first, so maps of different parameterisations are comparable.

    python -m t2ilab.analysis.noise_diff --pipeline outputs/run/export --images data/example_subject \\
        --prompt-a "a photo of sks toy" --prompt-b "a photo of toy" [--timesteps 200 500 800] \\
        [--out noise_diff.png] [--wandb-log]

The grid PNG has one row per image: the (centre-cropped) source image, then one grayscale map per
timestep. Grayscale, no colormap: 0 is black and the largest difference anywhere in the grid is
white, one scale per grid, so brightness compares across images and timesteps of one grid but
not across grids (the CLI prints the scale and each timestep's mean difference).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from t2ilab.data.images import ImageTransform, check_image_folder, list_images, load_rgb
from t2ilab.errors import UserError
from t2ilab.utils.atomic import save_image_atomic
from t2ilab.utils.images import make_grid

DEFAULT_TIMESTEPS = (200, 500, 800)
LABEL_STRIP = 14  # px above the grid naming each column, when the timesteps are given


def _default_resolution(unet, vae) -> int:
    """The model's native image size: latent sample size times the VAE's downsampling."""
    sample_size = unet.config.sample_size
    if not isinstance(sample_size, int):
        sample_size = int(sample_size[0])
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def _check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    if not timesteps:
        raise UserError("no timesteps given: pass e.g. --timesteps 200 500 800")
    bad = [t for t in timesteps if int(t) != t or not 0 <= int(t) < num_train_timesteps]
    if bad:
        raise UserError(
            f"timestep {bad[0]} is outside the model's 0..{num_train_timesteps - 1}: "
            "pass whole numbers in that range, e.g. --timesteps 200 500 800"
        )
    return [int(t) for t in timesteps]


def _to_epsilon(output, noisy, t: torch.Tensor, scheduler, alphas_cumprod) -> torch.Tensor:
    """The model output as a noise prediction, whatever its prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return output
    alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0
        return alpha * output + sigma * noisy
    if prediction_type == "sample":  # x_t = alpha * x0 + sigma * eps
        return (noisy - alpha * output) / sigma
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@torch.no_grad()
def _encode_prompt(text_encoder, tokenizer, prompt: str, device) -> torch.Tensor:
    ids = tokenizer(
        prompt,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def noise_difference_maps(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    images: list[Image.Image],
    prompt_a: str,
    prompt_b: str,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    resolution: int | None = None,
) -> torch.Tensor:
    """|eps(x_t, t, A) - eps(x_t, t, B)| per pixel, as a float32 CPU tensor (N, T, H, W).

    Images are resized and centre-cropped to `resolution` (default: the model's native size).
    Latents are the VAE posterior mean (no sampling), and the noise of image i is drawn from
    `torch.Generator().manual_seed(seed + i)` on the CPU, so maps are reproducible across
    devices and do not depend on which other images are in the set. `scheduler` may be any
    diffusers scheduler of the model: its training schedule (betas, prediction type) is used.
    """
    from diffusers import DDPMScheduler

    if not images:
        raise UserError("no images to analyse: pass at least one image")
    # Noising follows the training schedule; an inference sampler's add_noise may not (Euler).
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    timesteps = _check_timesteps(timesteps, noise_scheduler.config.num_train_timesteps)
    resolution = resolution or _default_resolution(unet, vae)
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    device, dtype = unet.device, unet.dtype
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    cond_a = _encode_prompt(text_encoder, tokenizer, prompt_a, device).to(dtype)
    cond_b = _encode_prompt(text_encoder, tokenizer, prompt_b, device).to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    maps = torch.empty(len(images), len(timesteps), resolution, resolution)
    for i, image in enumerate(images):
        pixels = transform(image.convert("RGB"))[None].to(device, vae.dtype)
        latents = (vae.encode(pixels).latent_dist.mode() - shift) * vae.config.scaling_factor
        latents = latents.to(dtype)
        generator = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        for j, step in enumerate(timesteps):
            t = torch.tensor([step], device=device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            # Two separate calls with identical inputs but the prompt: equal prompts give
            # bit-identical predictions, so the map is exactly zero.
            out_a = unet(noisy, t, encoder_hidden_states=cond_a).sample
            out_b = unet(noisy, t, encoder_hidden_states=cond_b).sample
            eps_a = _to_epsilon(out_a.float(), noisy.float(), t, noise_scheduler, alphas_cumprod)
            eps_b = _to_epsilon(out_b.float(), noisy.float(), t, noise_scheduler, alphas_cumprod)
            diff = (eps_a - eps_b).abs().mean(dim=1, keepdim=True)  # (1, 1, h, w)
            diff = F.interpolate(
                diff, size=(resolution, resolution), mode="bilinear", align_corners=False
            )
            maps[i, j] = diff[0, 0].cpu()
    return maps


def _source_cell(image: Image.Image, size: int) -> Image.Image:
    """The image exactly as the model saw it (same resize + centre crop), back as PIL."""
    pixels = ImageTransform(size, center_crop=True, random_flip=False)(image.convert("RGB"))
    array = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


def save_difference_grid(
    maps: torch.Tensor,
    images: list[Image.Image],
    path: str | os.PathLike,
    timesteps: Sequence[int] | None = None,
) -> Path:
    """A PNG grid: one row per image, the source image then one map per timestep.

    Grayscale normalised per grid: black is 0, white the grid's largest difference (an all-zero
    grid stays black). Without `timesteps` the grid is exactly ((T + 1) * W, N * H) pixels;
    with them a 14-px strip on top labels the columns ("image", "t=200", ...).
    """
    if maps.ndim != 4 or maps.shape[0] != len(images):
        raise ValueError(
            f"maps must be (N, T, H, W) with N = len(images) = {len(images)}, got "
            f"{tuple(maps.shape)}"
        )
    n, t, h, w = maps.shape
    if h != w:
        raise ValueError(f"maps must be square, got {h}x{w}")
    peak = float(maps.max())
    scaled = maps / peak if peak > 0 else torch.zeros_like(maps)
    gray = (scaled * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    cells = []
    for i, image in enumerate(images):
        cells.append(_source_cell(image, h))
        cells += [Image.fromarray(gray[i, j], mode="L").convert("RGB") for j in range(t)]
    grid = make_grid(cells, rows=n)
    if timesteps is not None:
        labelled = Image.new("RGB", (grid.width, grid.height + LABEL_STRIP), "white")
        labelled.paste(grid, (0, LABEL_STRIP))
        draw = ImageDraw.Draw(labelled)
        for col, label in enumerate(["image", *(f"t={s}" for s in timesteps)]):
            draw.text((col * w + 2, 1), label, fill="black")
        grid = labelled
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(grid, path)
    return path


# --- command line --------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2ilab.analysis.noise_diff",
        description="Noise-prediction difference maps |eps(prompt A) - eps(prompt B)| of a "
        "trained model (Xiang et al. 2023, sec. 5), as a PNG grid: rows = images, "
        "columns = source image then timesteps.",
    )
    parser.add_argument(
        "--pipeline",
        type=Path,
        required=True,
        help="a diffusers StableDiffusionPipeline folder (a run's export/)",
    )
    parser.add_argument("--images", type=Path, required=True, help="a folder of images")
    parser.add_argument("--prompt-a", required=True, help='e.g. "a photo of sks dog"')
    parser.add_argument("--prompt-b", required=True, help='e.g. "a photo of dog"')
    parser.add_argument(
        "--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS), help="(200 500 800)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise (0)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the model's own)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("noise_diff.png"), help="PNG path (noise_diff.png)"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--wandb-log",
        action="store_true",
        help="also log the grid to a W&B run (offline without an API key)",
    )
    parser.add_argument("--wandb-project", default="t2ilab", help="W&B project (t2ilab)")
    return parser.parse_args(argv)


def _check_inputs(args: argparse.Namespace) -> list[Path]:
    """Everything checkable before weights load."""
    pipeline = args.pipeline.expanduser()
    if not pipeline.is_dir():
        raise UserError(
            f"--pipeline {args.pipeline} does not exist: pass a diffusers pipeline folder "
            "(e.g. a run's export/)"
        )
    folder = args.images.expanduser()
    if not folder.is_dir():
        raise UserError(f"--images {args.images} does not exist: pass a folder of images")
    if not list_images(folder):
        raise UserError(f"--images {args.images} has no images: add .jpg/.png/.webp files to it")
    if args.resolution is not None and args.resolution < 8:
        raise UserError(f"--resolution {args.resolution} is too small: use e.g. 512")
    return check_image_folder(folder, "--images")  # decodes each image once


def _log_to_wandb(args: argparse.Namespace, path: Path, maps: torch.Tensor) -> None:
    import wandb

    from t2ilab.loggers import wandb_has_credentials

    # WANDB_MODE, when set, is wandb's own business; otherwise online only with credentials.
    mode = None
    if not os.environ.get("WANDB_MODE"):
        mode = "online" if wandb_has_credentials() else "offline"
    config = {
        "pipeline": str(args.pipeline.expanduser().resolve()),
        "images": str(args.images.expanduser().resolve()),
        "prompt_a": args.prompt_a,
        "prompt_b": args.prompt_b,
        "timesteps": list(args.timesteps),
        "seed": args.seed,
    }
    run = wandb.init(
        project=args.wandb_project,
        job_type="noise_diff",
        config=config,
        dir=str(path.parent),
        mode=mode,
    )
    caption = f"|eps({args.prompt_a!r}) - eps({args.prompt_b!r})|, white = {float(maps.max()):.4g}"
    row = {"noise_diff/grid": wandb.Image(str(path), caption=caption)}
    for j, t in enumerate(args.timesteps):
        row[f"noise_diff/mean_t{t}"] = float(maps[:, j].mean())
    run.log(row)
    offline, run_dir = run.offline, Path(run.dir).parent
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with: wandb sync {run_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        paths = _check_inputs(args)
        from t2ilab.models.export import load_export

        pipe = load_export(args.pipeline.expanduser())
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe.to(device)
        images = [load_rgb(p) for p in paths]
        maps = noise_difference_maps(
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.scheduler,
            images,
            args.prompt_a,
            args.prompt_b,
            timesteps=args.timesteps,
            seed=args.seed,
            resolution=args.resolution,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = save_difference_grid(maps, images, args.out.expanduser(), timesteps=args.timesteps)
    means = ", ".join(
        f"t={t}: {float(maps[:, j].mean()):.4g}" for j, t in enumerate(args.timesteps)
    )
    print(f"{len(images)} images x {len(args.timesteps)} timesteps -> {out}")
    print(f"mean |eps_A - eps_B|: {means}; white = {float(maps.max()):.4g}")
    if args.wandb_log:
        _log_to_wandb(args, out, maps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
