"""DreamBooth and LoRA-DreamBooth through diffusers' example scripts, t2ilab and a bare loop,
side by side: the same weights, images, class images and settings, arms alternating per round.

    python experiments/benchmarks/side_by_side.py \
        --diffusers-examples ~/diffusers/examples/dreambooth --peer-python ~/peer-env/bin/python \
        --rounds 3 --steps 100 --out experiments/benchmarks/cpu_side_by_side.json

Arms (`--arms`, default all six):
    diffusers_full  train_dreambooth.py            (UNet only, prior preservation)
    t2ilab_full     train.py experiment=dreambooth
    floor_full      floor.py: t2ilab's step in a bare PyTorch loop
    diffusers_lora  train_dreambooth_lora.py       (rank 4)
    t2ilab_lora     train.py experiment=lora_dreambooth
    floor_lora      floor.py with the LoRA method

Every arm runs in its own process under step_timer.py, which stamps the end of every optimizer
step. Reported per run: steady s/step (median and min of the intervals between optimizer steps,
the first `--skip` left out), whole-process wall time, peak RSS (through the last training step
and over the whole process) and, on a GPU, `torch.cuda.max_memory_allocated`. Per round, the
ratios t2ilab / diffusers and t2ilab / floor; the summary gives their median and range over the
rounds. Paired ratios within a round are what to read on a shared machine: absolute times swing
with other jobs' load, and the arms of one round run back to back.

The model is SD-1.x-shaped with random weights (UNet 18.2M, CLIP text 15.8M parameters, VAE with
SD's factor 8), saved once as a diffusers folder that both tools load; `--model-dir` points at
another diffusers folder (e.g. a real SD 1.5) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARMS = (
    "diffusers_full",
    "t2ilab_full",
    "floor_full",
    "diffusers_lora",
    "t2ilab_lora",
    "floor_lora",
)
SCRIPTS = {"full": "train_dreambooth.py", "lora": "train_dreambooth_lora.py"}

# An SD-1.x-shaped model small enough for a CPU: SD's layout and VAE factor (8), narrower.
BENCH_MODEL: dict[str, Any] = {
    "seed": 0,
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [64, 128, 256],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 256,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 128, 128],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 128,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 256,
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


# --- the shared inputs ----------------------------------------------------------------------


def write_model(folder: Path, shape: str = "bench") -> None:
    """A random-weight SD-1.x model as a StableDiffusionPipeline folder (what both tools load):
    BENCH_MODEL, or Stable Diffusion 1.5's own shapes (t2ilab.bench.SD15_SHAPE) for a GPU."""
    from diffusers import DDPMScheduler

    from t2ilab.bench import SD15_SHAPE
    from t2ilab.models.loading import build_tiny_sd

    config = {"bench": BENCH_MODEL, "sd15": SD15_SHAPE}[shape]
    backbone = build_tiny_sd(config)
    backbone.save_pipeline(folder, DDPMScheduler(**config["scheduler"], clip_sample=False))


def write_class_images(folder: Path, count: int, resolution: int) -> None:
    """Synthetic class images (the content does not change the cost of a step): shapes on
    gradients, deterministic."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        ramp = np.linspace(0, 255, resolution, dtype=np.float32)
        base = rng.uniform(0.3, 1.0, size=3)
        pixels = (ramp[None, :, None] * base[None, None, :]).repeat(resolution, axis=0)
        image = Image.fromarray(pixels.astype(np.uint8))
        x, y = rng.integers(0, resolution // 2, size=2)
        size = int(rng.integers(resolution // 4, resolution // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        ImageDraw.Draw(image).ellipse([x, y, x + size, y + size], fill=colour)
        image.save(folder / f"{i:04d}.png")


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Model folder, instance images and class images, made once and reused by every arm."""
    inputs = {
        "model": Path(args.model_dir) if args.model_dir else workdir / f"model_{args.shape}",
        "instance": workdir / "instance",
        "class": workdir / "class",
    }
    if not args.model_dir and not (inputs["model"] / "model_index.json").is_file():
        print(f"writing the {args.shape} model to {inputs['model']}", file=sys.stderr)
        write_model(inputs["model"], args.shape)
    if not inputs["instance"].is_dir():
        shutil.copytree(Path(args.instance_dir), inputs["instance"])
    if len(list(inputs["class"].glob("*.png"))) < args.num_class_images:
        write_class_images(inputs["class"], args.num_class_images, args.resolution)
    return inputs


# --- the arms' command lines ----------------------------------------------------------------


def diffusers_command(method: str, inputs: dict[str, Path], out: Path, args) -> list[str]:
    script = Path(args.diffusers_examples).expanduser() / SCRIPTS[method]
    command = [
        str(script),
        f"--pretrained_model_name_or_path={inputs['model']}",
        f"--instance_data_dir={inputs['instance']}",
        f"--class_data_dir={inputs['class']}",
        f"--output_dir={out}",
        "--with_prior_preservation",
        "--prior_loss_weight=1.0",
        f"--instance_prompt=a {args.identifier} {args.class_noun}",
        f"--class_prompt=a {args.class_noun}",
        f"--num_class_images={args.num_class_images}",
        f"--resolution={args.resolution}",
        "--center_crop",
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={args.steps}",
        f"--learning_rate={args.lr[method]}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--seed={args.seed}",
        f"--checkpointing_steps={args.steps + 1}",  # none during the run, as t2ilab's below
        f"--mixed_precision={args.mixed_precision}",
        "--dataloader_num_workers=0",
        "--report_to=tensorboard",
    ]
    if method == "lora":
        command.append("--rank=4")
    return command + args.diffusers_extra


def t2ilab_overrides(method: str, inputs: dict[str, Path], out: Path, args) -> list[str]:
    experiment = {"full": "dreambooth", "lora": "lora_dreambooth"}[method]
    precision = {"no": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.mixed_precision]
    return [
        f"experiment={experiment}",
        "model=sd15",
        "model.name=bench_sd",
        f"model.pretrained={inputs['model']}",
        f"model.resolution={args.resolution}",
        "eval=none",  # diffusers' scripts validate only when given --validation_prompt
        "callbacks.samples.at_end=false",
        "callbacks.samples.every_n_steps=0",
        f"callbacks.model_checkpoint.every_n_train_steps={args.steps + 1}",
        f"data.instance_dir={inputs['instance']}",
        f"data.class_dir={inputs['class']}",
        f"data.identifier={args.identifier}",
        f"data.class_noun={args.class_noun}",
        f"data.batch_size={args.batch_size}",
        f"method.num_class_images={args.num_class_images}",
        f"method.lr={args.lr[method]}",
        f"trainer.max_steps={args.steps}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={args.accelerator}",
        f"seed={args.seed}",
        f"hydra.run.dir={out}",
        *args.t2ilab_extra,
    ]


def arm_command(arm: str, inputs: dict[str, Path], out: Path, args) -> tuple[str, list[str]]:
    """(python executable, argv after it) for one run of an arm, under step_timer.py."""
    tool, method = arm.split("_")
    timer = [str(HERE / "step_timer.py"), "--out", str(out / "timings.json"), "--"]
    run_dir = out / "run"  # the tool's own output folder; the harness's files stay beside it
    if tool == "diffusers":
        return args.peer_python, timer + diffusers_command(method, inputs, run_dir, args)
    overrides = t2ilab_overrides(method, inputs, run_dir, args)
    if tool == "floor":
        return args.python, timer + [str(HERE / "floor.py"), *overrides]
    return args.python, timer + [str(ROOT / "train.py"), *overrides]


# --- timing ---------------------------------------------------------------------------------


def steady_step_times(step_end_s: list[float], skip: int) -> list[float]:
    """Intervals between consecutive optimizer steps, after the first `skip` steps."""
    intervals = [b - a for a, b in zip(step_end_s, step_end_s[1:], strict=False)]
    return intervals[skip:]


def summarize_run(timings: dict[str, Any], wall_s: float, skip: int) -> dict[str, Any]:
    steady = steady_step_times(timings["step_end_s"], skip)
    if not steady:
        raise SystemExit(f"{timings['script']}: fewer than {skip + 2} optimizer steps recorded")
    at_step = timings["peak_rss_mib_at_step"]
    return {
        "steps": len(timings["step_end_s"]),
        "s_per_step_median": statistics.median(steady),
        "s_per_step_min": min(steady),
        "first_step_s": timings["step_end_s"][0],
        "wall_s": wall_s,
        "peak_rss_mib": timings["peak_rss_mib"],
        "peak_rss_mib_training": at_step[-1] if at_step else None,
        "cuda_max_memory_allocated_mib": timings["cuda_max_memory_allocated_mib"],
    }


def run_arm(arm: str, inputs: dict[str, Path], out: Path, args) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)  # the harness's own run folder from an earlier invocation
    out.mkdir(parents=True)
    python, argv = arm_command(arm, inputs, out, args)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        done = subprocess.run([python, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (out / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(f"{arm} failed (exit {done.returncode}):\n" + "\n".join(tail))
    timings = json.loads((out / "timings.json").read_text())
    return {"arm": arm, **summarize_run(timings, wall, args.skip)}


def round_order(arms: list[str], round_index: int) -> list[str]:
    """The arms rotated by one each round, so no arm always runs first or after the same one."""
    shift = round_index % len(arms)
    return arms[shift:] + arms[:shift]


def paired_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and method: t2ilab over diffusers and t2ilab over the floor."""
    rows = []
    by_key = {(r["round"], r["arm"]): r for r in runs}
    for round_index in sorted({r["round"] for r in runs}):
        for method in ("full", "lora"):
            mine = by_key.get((round_index, f"t2ilab_{method}"))
            if mine is None:
                continue
            row: dict[str, Any] = {"round": round_index, "method": method}
            for peer in ("diffusers", "floor"):
                other = by_key.get((round_index, f"{peer}_{method}"))
                if other is None:
                    continue
                for key in ("s_per_step_median", "wall_s", "peak_rss_mib", "peak_rss_mib_training"):
                    if mine.get(key) and other.get(key):
                        row[f"{key}/{peer}"] = mine[key] / other[key]
            rows.append(row)
    return rows


def summary(runs: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | rounds | s/step median | s/step min | wall s | peak RSS MiB (training) |"
        " peak RSS MiB (process) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]

        def med(key: str, mine=mine) -> float:
            return statistics.median(r[key] for r in mine)

        lines.append(
            f"| {arm} | {len(mine)} | {med('s_per_step_median'):.3f} | "
            f"{min(r['s_per_step_min'] for r in mine):.3f} | {med('wall_s'):.1f} | "
            f"{med('peak_rss_mib_training'):.0f} | {med('peak_rss_mib'):.0f} |"
        )
    lines += ["", "Paired ratios per round (t2ilab / other; below 1 is t2ilab faster or lighter):"]
    lines += ["", "| method | ratio | median | range |", "| --- | --- | --- | --- |"]
    for method in ("full", "lora"):
        rows = [r for r in ratios if r["method"] == method]
        keys = sorted({k for r in rows for k in r if "/" in k})
        for key in keys:
            values = [r[key] for r in rows if key in r]
            lines.append(
                f"| {method} | {key} | {statistics.median(values):.3f} | "
                f"{min(values):.3f}-{max(values):.3f} |"
            )
    return "\n".join(lines)


def environment(args) -> dict[str, Any]:
    def versions(python: str) -> str:
        code = (
            "import torch, diffusers, transformers;"
            "print(torch.__version__, diffusers.__version__, transformers.__version__)"
        )
        done = subprocess.run([python, "-c", code], capture_output=True, text=True)
        return done.stdout.strip() or done.stderr.strip()[-200:]

    return {
        "python_t2ilab": versions(args.python),
        "python_peer": versions(args.peer_python),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": str(args.threads) if args.threads else None,
        "load_average_start": os.getloadavg(),
        "platform": platform.platform(),
    }


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--diffusers-examples",
        default=None,
        help="diffusers' examples/dreambooth folder (for the diffusers arms)",
    )
    parser.add_argument(
        "--peer-python",
        default=sys.executable,
        help="python of an environment with accelerate and torchvision",
    )
    parser.add_argument("--python", default=sys.executable, help="python with t2ilab installed")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of s/step")
    parser.add_argument("--batch-size", type=int, default=2, help="instance images a step")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num-class-images", type=int, default=100)
    parser.add_argument("--lr-full", type=float, default=5e-6)
    parser.add_argument("--lr-lora", type=float, default=1e-4)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--accelerator", default="cpu", help="t2ilab's trainer.accelerator")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for all arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape",
        choices=("bench", "sd15"),
        default="bench",
        help="random-weight model: 18M UNet (CPU) or SD 1.5's shapes (GPU)",
    )
    parser.add_argument("--model-dir", default=None, help="a diffusers SD folder instead")
    parser.add_argument("--instance-dir", default=str(ROOT / "data/toy_subjects/striped_star"))
    parser.add_argument("--identifier", default="sks")
    parser.add_argument("--class-noun", default="star")
    parser.add_argument("--workdir", default=str(ROOT / "outputs/side_by_side"))
    parser.add_argument("--out", default=None, help="write runs, ratios and environment here")
    parser.add_argument(
        "--t2ilab-extra",
        action="append",
        default=[],
        help="one more train.py override (repeatable)",
    )
    parser.add_argument(
        "--diffusers-extra",
        action="append",
        default=[],
        help="one more script flag (repeatable), written with '=': "
        "--diffusers-extra=--pre_compute_text_embeddings",
    )
    args = parser.parse_args(argv)  # fmt: skip
    args.lr = {"full": args.lr_full, "lora": args.lr_lora}
    if any(a.startswith("diffusers") for a in args.arms):
        if not args.diffusers_examples:
            parser.error("the diffusers arms need --diffusers-examples (see the README)")
        for method in {a.split("_")[1] for a in args.arms if a.startswith("diffusers")}:
            script = Path(args.diffusers_examples).expanduser() / SCRIPTS[method]
            if not script.is_file():
                parser.error(
                    f"{script} not found: point --diffusers-examples at examples/dreambooth"
                )
    if args.steps < args.skip + 3:
        parser.error("--steps must exceed --skip by at least 3")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = prepare(workdir, args)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for arm in round_order(list(args.arms), round_index):
            run = run_arm(arm, inputs, workdir / "runs" / f"{arm}_r{round_index}", args)
            run["round"] = round_index
            run["load_average"] = os.getloadavg()[0]
            runs.append(run)
            print(
                f"round {round_index} {arm}: {run['s_per_step_median']:.3f} s/step, "
                f"wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
            )
    ratios = paired_ratios(runs)
    print(summary(runs, ratios))
    if args.out:
        result = {"environment": environment(args), "settings": {
            k: v for k, v in vars(args).items() if k not in ("lr",)}, "runs": runs,
            "ratios": ratios}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
