"""Training-throughput benchmark: steps/s, samples/s and peak memory of the shared diffusion step.

    python -m t2ilab.bench --model tiny_sd --method full --steps 20
    python -m t2ilab.bench --model sd15_shape --precision bf16 --grid --batch-sizes 1 4
    python -m t2ilab.bench --model pixart_alpha_512_shape --precision bf16 --cache --batch-size 4

One timed step is exactly what training runs (`DiffusionModule.diffusion_loss`, backward,
optimizer step), without Lightning around it, so the figures are the model's and the step's, not
the loop's. `--cache` feeds precomputed VAE posteriors and prompt embeddings (what a feature cache
gives training), so the step skips the VAE and the text encoder. `sd15_shape` is Stable Diffusion
1.5's architecture with random weights (nothing is downloaded): right for speed and memory, not for
images. `pixart_alpha_512_shape` is PixArt-XL-2-512x512's transformer and VAE with random weights;
PixArt trains on cached T5-XXL features, so its text encoder is a one-layer stand-in of T5-XXL's
width (4096) that only produces cache-shaped features, and it runs with `--cache` only.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated()` over the timed steps; on CPU the
process's peak resident set size (max RSS, which includes building the model and the warm-up
steps), so `--grid` runs every configuration in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = ("tiny_sd", "sd15_shape", "tiny_pixart", "pixart_alpha_512_shape")
METHODS = ("full", "lora")
PRECISIONS = ("32", "bf16", "fp16")
PROMPT = "a photo of sks toy"

# Stable Diffusion 1.5's shapes, in build_tiny_sd's format (random weights, fixed seed).
SD15_SHAPE: dict[str, Any] = {
    "seed": 0,
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {  # CLIP ViT-L/14's text tower
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
}

# PixArt-alpha/PixArt-XL-2-512x512 as t2ilab's tiny-model format builds it: the real transformer
# and VAE configs; T5-XXL's width (4096) in a one-layer stand-in, since training reads cached T5
# features (the real encoder's 4.7B parameters would only fill memory in a timing run).
PIXART_ALPHA_512_SHAPE: dict[str, Any] = {
    "name": "pixart_alpha_512_shape",
    "family": "pixart",
    "pretrained": None,
    "resolution": 512,
    "patch_size": 2,
    "max_length": 120,
    "tiny": {
        "seed": 0,
        "transformer": {
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_head_dim": 72,
            "caption_channels": 4096,
            "cross_attention_dim": 1152,
            "dropout": 0.0,
            "in_channels": 4,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "norm_type": "ada_norm_single",
            "num_attention_heads": 16,
            "num_embeds_ada_norm": 1000,
            "num_layers": 28,
            "out_channels": 8,
            "patch_size": 2,
            "sample_size": 64,
            "use_additional_conditions": False,
        },
        "vae": dict(SD15_SHAPE["vae"]),  # sd-vae-ft-ema: SD's VAE
        "text_encoder": {  # width of T5 v1.1 XXL, depth 1: shapes the cached features only
            "vocab_size": 384,
            "d_model": 4096,
            "d_ff": 64,
            "d_kv": 64,
            "num_heads": 1,
            "num_layers": 1,
            "feed_forward_proj": "gated-gelu",
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
        },
    },
}
# Models whose text encoder is a stand-in: only the cached step is theirs.
CACHE_ONLY = {"pixart_alpha_512_shape"}
DEFAULT_RESOLUTION = {
    "tiny_sd": 64,
    "sd15_shape": 512,
    "tiny_pixart": 64,
    "pixart_alpha_512_shape": 512,
}


def _conf_dir() -> Path:
    root = os.environ.get("T2ILAB_ROOT")
    candidates = [Path(root)] if root else []
    candidates += [Path(__file__).resolve().parents[2], Path.cwd()]
    for candidate in candidates:
        if (candidate / "conf" / "model").is_dir():
            return candidate / "conf"
    raise FileNotFoundError("conf/model not found: run from the repository root or set T2ILAB_ROOT")


def build_components(model: str):
    """The model's backbone (denoiser, VAE, text encoder, tokenizer, scheduler config) on CPU."""
    from omegaconf import OmegaConf

    from t2ilab.models.loading import build_tiny_sd, load_components

    if model in ("tiny_sd", "tiny_pixart"):
        return load_components(OmegaConf.load(_conf_dir() / "model" / f"{model}.yaml"))
    if model == "sd15_shape":
        return build_tiny_sd(SD15_SHAPE)
    if model == "pixart_alpha_512_shape":
        return load_components(PIXART_ALPHA_512_SHAPE)
    raise ValueError(f"model must be one of {MODELS}, not {model!r}")


def build_module(components, method: str, steps: int = 10):
    """The method's module as train.py builds it: from conf/method (full: DreamBooth's
    optimizer on a UNet, PixArt's on a transformer; lora: rank 4), on the given backbone."""
    from omegaconf import OmegaConf

    from t2ilab.compat import method_config
    from t2ilab.modules.base import DiffusionModule

    full = "pixart" if components.family == "pixart" else "dreambooth"
    names = {"full": full, "lora": "lora"}
    if method not in names:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    cfg = OmegaConf.create(
        {"method": method_config(names[method]), "trainer": {"max_steps": steps}}
    )
    return DiffusionModule.from_config(cfg.method, components)


def make_batch(module, batch_size: int, resolution: int, device: torch.device, cache: bool):
    """Random images and a fixed prompt; with `cache`, their VAE posterior and the text
    encoder's condition computed once here, as a feature cache would hand them to training."""
    pixels = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    input_ids = module.tokenizer(
        [PROMPT] * batch_size,
        padding="max_length",
        max_length=module.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    if not cache:
        return {"pixel_values": pixels, "input_ids": input_ids}
    with torch.no_grad():
        posterior = module.vae.encode(pixels).latent_dist
        condition = module.encode_condition({"input_ids": input_ids})
    return {"latent_mean": posterior.mean, "latent_std": posterior.std, "condition": condition}


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' datasheets; MFU
# is the step's counted FLOPs per second over this. --peak-tflops gives any other device's.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0,
                    "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # fmt: skip


def peak_tflops_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def mfu(flops_per_s: float, device: torch.device, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: counted FLOPs per second over the device's dense bf16 peak."""
    peak = peak_tflops or peak_tflops_of(device)
    return flops_per_s / (peak * 1e12) if peak else None


def step_flops(module, batch, device: torch.device, autocast_dtype) -> float:
    """FLOPs of one training step's forward and backward, counted by torch's FlopCounterMode
    (matmuls, convolutions and attention: what the accelerator's peak is quoted for). The
    optimizer's elementwise update is not counted, as MFU conventionally leaves it out."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = module.diffusion_loss(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    import diffusers

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "device": _device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_benchmark(
    model: str = "tiny_sd",
    method: str = "full",
    precision: str = "32",
    resolution: int | None = None,
    batch_size: int = 1,
    steps: int = 10,
    warmup: int = 2,
    gradient_checkpointing: bool = False,
    cache: bool = False,
    device: str | None = None,
    seed: int = 0,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` untimed ones; one row of the results table."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast is benchmarked on CUDA only; use bf16 or 32 on CPU")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("need steps >= 1, warmup >= 0, batch_size >= 1")
    if model in CACHE_ONLY and not cache:
        raise ValueError(f"{model} trains on cached T5 features; run it with cache (--cache)")
    resolution = resolution or DEFAULT_RESOLUTION[model]

    module = build_module(build_components(model), method)
    if gradient_checkpointing:
        module.unet.enable_gradient_checkpointing()
    module.to(device).train()  # trainable parameters stay fp32; autocast lowers the compute
    optimizer = module.configure_optimizers()
    if isinstance(optimizer, dict):  # with its LR schedule, which a timing run leaves alone
        optimizer = optimizer["optimizer"]
    trainable = module.trained_parameter_count()

    torch.manual_seed(seed)
    batch = make_batch(module, batch_size, resolution, device, cache)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> float:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = module.diffusion_loss(batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    flops = step_flops(module, batch, device, autocast_dtype)
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _synchronize(device)
    elapsed = time.perf_counter() - start

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        peak_kind = "cuda max_memory_allocated (timed steps)"
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
        peak_kind = "process max RSS"
    return {
        "model": model,
        "method": method,
        "precision": precision,
        "resolution": resolution,
        "batch_size": batch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "cache": cache,
        "steps": steps,
        "warmup": warmup,
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "samples_per_s": steps * batch_size / elapsed,
        "peak_mem_mib": peak_mib,
        "peak_mem_kind": peak_kind,
        "trainable_params": trainable,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops * steps / elapsed / 1e12,
        "mfu": mfu(flops * steps / elapsed, device, peak_tflops),
        "final_loss": float(loss.detach()),
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
    }


COLUMNS = (
    ("model", "model"),
    ("method", "method"),
    ("precision", "precision"),
    ("resolution", "resolution"),
    ("batch", "batch_size"),
    ("grad ckpt", "gradient_checkpointing"),
    ("cache", "cache"),
    ("steps/s", "steps_per_s"),
    ("samples/s", "samples_per_s"),
    ("peak mem MiB", "peak_mem_mib"),
    ("TFLOP/step", "tflop_per_step"),
    ("MFU", "mfu"),
    ("device", "device"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row[key]) for _, key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def cache_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """steps/s with the cache over steps/s without, per (batch, grad ckpt) pair of the grid."""
    by_key = {(r["batch_size"], r["gradient_checkpointing"], r["cache"]): r for r in rows}
    out = []
    for (batch, ckpt, cached), row in by_key.items():
        base = by_key.get((batch, ckpt, False))
        if cached and base:
            ratio = row["steps_per_s"] / base["steps_per_s"]
            out.append({"batch_size": batch, "gradient_checkpointing": ckpt, "ratio": ratio})
    return out


def _single_args(args, batch_size: int, ckpt: bool, cache: bool, out: str) -> list[str]:
    argv = [
        "--model", args.model, "--method", args.method, "--precision", args.precision,
        "--batch-size", str(batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--seed", str(args.seed), "--out", out,
    ]  # fmt: skip
    if args.resolution:
        argv += ["--resolution", str(args.resolution)]
    if args.device:
        argv += ["--device", args.device]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if ckpt:
        argv.append("--gradient-checkpointing")
    if cache:
        argv.append("--cache")
    return argv


def run_grid(args) -> list[dict[str, Any]]:
    """{cache off, on} x {grad ckpt off, on} x batch sizes, each in a fresh process so that peak
    memory (max RSS on CPU) belongs to that configuration alone."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_sizes:
            for ckpt in (False, True):
                for cache in (True,) if args.model in CACHE_ONLY else (False, True):
                    out = str(Path(tmp) / f"row{len(rows)}.json")
                    argv = _single_args(args, batch_size, ckpt, cache, out)
                    cmd = [sys.executable, "-m", "t2ilab.bench", *argv]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.stderr.write(done.stdout + done.stderr)
                        raise SystemExit(f"benchmark failed: {' '.join(argv)}")
                    row = json.loads(Path(out).read_text())["rows"][0]
                    print(
                        f"batch {batch_size} ckpt {_cell(ckpt)} cache {_cell(cache)}: "
                        f"{row['steps_per_s']:.3g} steps/s",
                        file=sys.stderr,
                    )
                    rows.append(row)
    return rows


def _check_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for key in ("steps_per_s", "samples_per_s", "peak_mem_mib"):
            if not (math.isfinite(row[key]) and row[key] > 0):
                raise SystemExit(f"benchmark produced {key}={row[key]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2ilab.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=MODELS, default="tiny_sd")
    parser.add_argument("--method", choices=METHODS, default="full")
    parser.add_argument("--precision", choices=PRECISIONS, default="32")
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: 64 for tiny models, 512 otherwise"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cache", action="store_true", help="precomputed latents and embeddings")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak for MFU (known GPUs: looked up)",
    )
    parser.add_argument("--out", default=None, help="write rows + environment as JSON here")
    parser.add_argument("--grid", action="store_true", help="cache x grad ckpt x --batch-sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="for --grid")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp16" and not device.startswith("cuda"):
        parser.error("--precision fp16 needs a CUDA device (use bf16 or 32 on CPU)")
    if args.model in CACHE_ONLY and not (args.cache or args.grid):
        parser.error(f"--model {args.model} trains on cached T5 features: add --cache")
    if args.batch_sizes is None:
        args.batch_sizes = [1, 4] if device.startswith("cuda") else [1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.grid:
        rows = run_grid(args)
    else:
        rows = [
            run_benchmark(
                model=args.model,
                method=args.method,
                precision=args.precision,
                resolution=args.resolution,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                gradient_checkpointing=args.gradient_checkpointing,
                cache=args.cache,
                device=args.device,
                seed=args.seed,
                peak_tflops=args.peak_tflops,
            )
        ]
    _check_rows(rows)
    print(markdown_table(rows))
    speedups = cache_speedups(rows)
    for s in speedups:
        print(
            f"cache speed-up (steps/s cache on / off), batch {s['batch_size']}, "
            f"grad ckpt {_cell(s['gradient_checkpointing'])}: {s['ratio']:.2f}x"
        )
    if args.out:
        result = {"environment": environment(args.device), "rows": rows}
        if speedups:
            result["cache_speedup"] = speedups
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
