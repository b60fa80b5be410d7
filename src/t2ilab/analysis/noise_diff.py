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

The figure (PNG) has one row per image: the (centre-cropped) source image, then one map per
timestep, titled with t and that timestep's mean difference. One colour scale for the whole
figure, from 0 (black) to the largest difference anywhere in it, shown by a labelled colourbar,
so colours compare across images and timesteps of one figure (the colourbar says how to compare
figures); the title names the two prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2ilab.cli import ArgumentParser, check_png_output, one_line_errors
from t2ilab.data.images import ImageTransform, check_image_folder, list_images, load_rgb
from t2ilab.errors import UserError

DEFAULT_TIMESTEPS = (200, 500, 800)
# t2ilab.models.export.METADATA_FILE (not imported: that module loads diffusers)
EXPORT_METADATA = "t2ilab.json"


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


def difference_figure(
    maps: torch.Tensor,
    images: list[Image.Image],
    timesteps: Sequence[int],
    prompts: tuple[str, str] = ("prompt A", "prompt B"),
):
    """A figure that reads without the terminal: one row per image, the source image then
    one map per timestep (titled t=..., with its mean), one colour scale from 0 to the largest
    difference, a colourbar saying what the values are, the two prompts in the title."""
    from t2ilab.analysis.plots import new_figure, plain_numbers

    if maps.ndim != 4 or maps.shape[0] != len(images) or maps.shape[1] != len(timesteps):
        raise ValueError(
            f"maps must be (N, T, H, W) with N = len(images) = {len(images)} and T = "
            f"len(timesteps) = {len(timesteps)}, got {tuple(maps.shape)}"
        )
    n, t, h, _ = maps.shape
    peak = float(maps.max())
    cell = 1.7  # inches per image
    figure = new_figure(cell * (t + 1) + 1.2, cell * n + 1.0)
    axes = figure.subplots(n, t + 1, squeeze=False)
    shown = None
    for i, image in enumerate(images):
        axes[i, 0].imshow(_source_cell(image, h))
        for j in range(t):
            shown = axes[i, j + 1].imshow(
                maps[i, j].numpy(), cmap="magma", vmin=0.0, vmax=peak if peak > 0 else 1.0
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    for j, step in enumerate(timesteps):
        mean = float(maps[:, j].mean())
        axes[0, j + 1].set_title(f"t={step}\nmean {mean:.3g}", fontsize=9)
    figure.suptitle(
        f"noise-prediction difference |eps_A - eps_B| per pixel\n"
        f"A: {prompts[0]!r}   B: {prompts[1]!r}",
        fontsize=9,
    )
    colorbar = figure.colorbar(shown, ax=axes[:, 1:], shrink=0.9)
    colorbar.set_label("mean |eps_A - eps_B| over latent channels", fontsize=8)
    plain_numbers(colorbar.ax.yaxis)
    return figure


def save_difference_figure(
    maps: torch.Tensor,
    images: list[Image.Image],
    path: str | os.PathLike,
    timesteps: Sequence[int],
    prompts: tuple[str, str] = ("prompt A", "prompt B"),
) -> Path:
    """`difference_figure` as the PNG `path`."""
    from t2ilab.analysis.plots import save_png

    figure = difference_figure(maps, images, timesteps, prompts)
    return save_png(figure, Path(path), tool="t2ilab.analysis.noise_diff")


# --- command line --------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m t2ilab.analysis.noise_diff",
        description="Noise-prediction difference maps |eps(prompt A) - eps(prompt B)| of a "
        "trained model (Xiang et al. 2023, sec. 5), as a PNG figure: rows = images, "
        "columns = source image then timesteps, with a colourbar.",
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
        help="also log the figure to a W&B run (offline without an API key)",
    )
    parser.add_argument("--wandb-project", default="t2ilab", help="W&B project (t2ilab)")
    return parser.parse_args(argv)


# What load_export can load into a UNet pipeline: a Stable Diffusion pipeline folder.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _read_json(path: Path, option: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{option}: {path} cannot be read ({type(e).__name__}): re-export the pipeline"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{option}: {path} is not a JSON object: re-export the pipeline")
    return data


def _check_pipeline(pipeline: Path, option: str = "--pipeline") -> int | None:
    """A Stable Diffusion pipeline folder or a t2ilab export, judged by its JSON files alone
    (no weights). Returns the schedule's number of training timesteps when it says."""
    if not pipeline.exists():
        raise UserError(
            f"{option} {pipeline} does not exist: pass a diffusers pipeline folder "
            "(e.g. a run's export/)"
        )
    if not pipeline.is_dir():
        raise UserError(
            f"{option} {pipeline} is a file: pass the folder that holds model_index.json "
            "(e.g. a run's export/)"
        )
    index = pipeline / "model_index.json"
    if index.is_file():
        components = _read_json(index, option)
        missing = [c for c in SD_COMPONENTS if c not in components]
        if missing:
            kind = components.get("_class_name", "pipeline")
            raise UserError(
                f"{option} {pipeline} is a {kind} without {', '.join(missing)}: noise_diff "
                "needs a Stable Diffusion pipeline (UNet and CLIP text encoder)"
            )
    elif not (pipeline / EXPORT_METADATA).is_file():
        raise UserError(
            f"{option} {pipeline} is not a diffusers pipeline folder (no model_index.json) nor "
            f"a t2ilab export (no {EXPORT_METADATA}): pass a run's export/ folder"
        )
    scheduler = pipeline / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return int(_read_json(scheduler, option).get("num_train_timesteps", 1000))
    return None


def _check_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device: use --device cpu")
    return name


def _check_inputs(args: argparse.Namespace) -> list[Path]:
    """Everything checkable before weights load; returns the image paths."""
    num_train_timesteps = _check_pipeline(args.pipeline.expanduser())
    folder = args.images.expanduser()
    if not folder.exists():
        raise UserError(f"--images {args.images} does not exist: pass a folder of images")
    if not folder.is_dir():
        raise UserError(f"--images {args.images} is a file: pass the folder that holds images")
    if not list_images(folder):
        raise UserError(f"--images {args.images} has no images: add .jpg/.png/.webp files to it")
    check_png_output(args.out.expanduser())
    if args.prompt_a == args.prompt_b:
        raise UserError(
            "--prompt-a and --prompt-b are the same, so every map would be 0: drop the "
            'identifier from one, e.g. --prompt-a "a photo of sks dog" --prompt-b "a photo of dog"'
        )
    if num_train_timesteps is not None:
        _check_timesteps(args.timesteps, num_train_timesteps)
    if args.resolution is not None and args.resolution < 8:
        raise UserError(f"--resolution {args.resolution} is too small: use e.g. 512")
    args.device = _check_device(args.device)
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
    caption = (
        f"|eps({args.prompt_a!r}) - eps({args.prompt_b!r})|, colour scale 0 to "
        f"{float(maps.max()):.4g}"
    )
    row = {"noise_diff/grid": wandb.Image(str(path), caption=caption)}
    for j, t in enumerate(args.timesteps):
        row[f"noise_diff/mean_t{t}"] = float(maps[:, j].mean())
    run.log(row)
    offline, run_dir = run.offline, Path(run.dir).parent
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with: wandb sync {run_dir}", file=sys.stderr)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    paths = _check_inputs(args)
    from t2ilab.models.export import load_export

    pipe = load_export(args.pipeline.expanduser())
    pipe.to(args.device)
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
    try:
        out = save_difference_figure(
            maps, images, args.out.expanduser(), args.timesteps, (args.prompt_a, args.prompt_b)
        )
    except OSError as e:
        raise UserError(
            f"cannot write {args.out} ({e.strerror or e}): choose a writable --out"
        ) from e
    means = ", ".join(
        f"t={t}: {float(maps[:, j].mean()):.4g}" for j, t in enumerate(args.timesteps)
    )
    print(f"{len(images)} images x {len(args.timesteps)} timesteps -> {out}")
    print(f"mean |eps_A - eps_B|: {means}; colour scale 0 to {float(maps.max()):.4g}")
    if args.wandb_log:
        _log_to_wandb(args, out, maps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
