"""Small-budget trials of toy_sd pretraining recipes: which lever helps the base model learn
the world (shape first), measured before any long run.

    python experiments/toy_world/levers.py OUT --steps 1000 --arms baseline min_snr5 deeper

Each arm is `python train.py experiment=toy_pretrain_sd` with the arm's overrides and the same
steps, seed and data, in OUT/<arm>/ (a stopped trial continues from its last checkpoint when
the command is run again; a finished one is not run twice). Its export is then measured with
`t2ilab.toy.quality.sd_quality` on 64 fresh prompts (object colour, background, shape, read
from the pixels), and OUT/levers.json and OUT/levers.md collect every arm's figures. A
checkpoint on the way (raw weights) is scored the same way, into OUT/checkpoints.json:

    python experiments/toy_world/levers.py OUT --arms ARM --checkpoint CKPT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from t2ilab.callbacks.segments import total_wall_time_s

ROOT = Path(__file__).resolve().parents[2]

# A third UNet level (4x4) with attention at 8x8 and 4x4: a receptive field over the whole
# object at every resolution where shape is decided.
DEEPER = [
    "model.tiny.unet.block_out_channels=[64,96,128]",
    "model.tiny.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D]",
    "model.tiny.unet.up_block_types=[CrossAttnUpBlock2D,CrossAttnUpBlock2D,UpBlock2D]",
]
ARMS: dict[str, list[str]] = {
    "baseline": [],
    "min_snr5": ["noise.snr_gamma=5"],  # Hang et al.'s gamma, epsilon prediction kept
    "deeper": DEEPER,
    "deeper_min_snr5": [*DEEPER, "noise.snr_gamma=5"],
    "curriculum": ["data.curriculum_steps=400"],  # large centred objects first, half the budget
    "no_ema": ["ema.enabled=false"],
    # Is shape learnable at this budget at all? Nearly every draw large and centred (the
    # curriculum never reaches its end), scored on the raw weights.
    "large_centred_no_ema": ["ema.enabled=false", "data.curriculum_steps=1000000"],
    "batch64_lr7e-4": ["data.batch_size=64", "method.lr=7.0e-4"],  # sqrt-scaled lr
    # Is the shape limit the UNet's reach? The same, with a third level and attention at 8x8 / 4x4.
    "deeper_large_centred_no_ema": [*DEEPER, "ema.enabled=false", "data.curriculum_steps=1000000"],
    # toy_sd takes its background from the initial noise's per-channel mean (dc_leak.py): the
    # SD schedule leaves sqrt(alpha_bar) = 0.085 of the image at the first sampling step, while
    # the mean of 16x16 noise has std 1/16. Offset noise (Guttenberg 2023; the SD schedule and
    # epsilon prediction kept) makes that mean uninformative, so the text has to say it.
    "offset_noise0.1": ["noise.offset_noise=0.1", "ema.enabled=false"],
    "offset_noise0.3": ["noise.offset_noise=0.3", "ema.enabled=false"],
    # Shape on top of offset noise, on the test's own distribution: the reference, and every
    # capacity/speed lever at once (the third level with attention at 8x8 and 4x4, twice the lr),
    # to decide the long run's recipe before it starts.
    "offset0.3_large_centred": [
        "noise.offset_noise=0.3",
        "ema.enabled=false",
        "data.curriculum_steps=1000000",
    ],
    # The outline is decided at high noise (an ideal observer that knows the colours tells the
    # 8 shapes apart 0.96 of the time at t = 700, 0.72 at 850, 0.47 at 950), where uniform draws
    # spend a fifth of training (t >= 800) and epsilon's loss weighs an outline error by the
    # SNR (0.04 at t = 800). Logit-normal(1, 1) draws t >= 800 0.35 of the time.
    "offset0.3_large_centred_logitnormal1": [
        "noise.timestep_density=logit_normal",
        "noise.logit_mean=1.0",
        "noise.offset_noise=0.3",
        "ema.enabled=false",
        "data.curriculum_steps=1000000",
    ],
    "offset0.3_large_centred_deeper_lr1e-3": [
        *DEEPER,
        "method.lr=1.0e-3",
        "noise.offset_noise=0.3",
        "ema.enabled=false",
        "data.curriculum_steps=1000000",
    ],
}


def train_arm(out: Path, arm: str, steps: int, threads: str) -> None:
    run = out / arm
    if (run / "results.json").is_file() and json.loads((run / "results.json").read_text()).get(
        "status"
    ) == "ok":
        return
    resume = ["ckpt_path=last"] if (run / "checkpoints" / "last.ckpt").is_file() else []
    cmd = [
        sys.executable,
        "train.py",
        "experiment=toy_pretrain_sd",
        *ARMS[arm],
        f"trainer.max_steps={steps}",
        f"trainer.cpu_threads={threads}",
        "logger=csv",
        "callbacks.samples.every_n_steps=100000",  # the grid at the end only
        f"hydra.run.dir={run}",
        *resume,
    ]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def measure(run: Path, n: int) -> dict:
    from t2ilab.toy import quality

    return quality.sd_quality(quality.load_scoring_pipeline(run / "export"), n=n)


def unet_config(arm: str) -> dict:
    """The arm's UNet config: toy_sd_init's with the arm's `model.tiny.unet.*` overrides."""
    import yaml
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/toy_sd_init.yaml"))
    unet = config["tiny"]["unet"]
    prefix = "model.tiny.unet."
    for override in ARMS[arm]:
        if override.startswith(prefix):
            key, value = override[len(prefix) :].split("=", 1)
            unet[key] = yaml.safe_load(value)
    return unet


def measure_checkpoint(checkpoint: Path, arm: str, n: int) -> dict:
    """A trial's checkpoint on the way (its raw weights; the arms export no EMA), scored as
    `measure` scores an export: its UNet in the shipped toy_sd pipeline."""
    import torch
    from diffusers import UNet2DConditionModel

    from t2ilab.toy import quality

    pipe = quality.load_scoring_pipeline(ROOT / "models/toy/toy_sd")
    unet = UNet2DConditionModel(**unet_config(arm))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    unet.load_state_dict({k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")})
    pipe.unet = unet.eval()
    return quality.sd_quality(pipe, n=n)


def table(rows: list[dict]) -> str:
    head = "| arm | overrides | steps | train min | object colour | background | shape |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['arm']} | `{' '.join(r['overrides']) or '-'}` | {r['steps']} | "
            f"{r['train_wall_time_s'] / 60:.1f} | {m['object_color_acc']:.3f} | "
            f"{m['background_acc']:.3f} | {m['shape_acc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--arms", nargs="+", default=["baseline", "min_snr5", "deeper"])
    parser.add_argument("--n", type=int, default=64, help="prompts measured per arm")
    parser.add_argument("--threads", default="auto", help="trainer.cpu_threads")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="score this checkpoint of the (one) arm instead of training; the figures are "
        "added to OUT/checkpoints.json",
    )
    args = parser.parse_args(argv)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}: choose from {sorted(ARMS)}")
    args.out = args.out.resolve()
    if args.checkpoint is not None:
        if len(args.arms) != 1 or not args.checkpoint.is_file():
            parser.error("--checkpoint takes one --arms ARM and an existing checkpoint file")
        import torch

        step = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["global_step"]
        metrics = measure_checkpoint(args.checkpoint, args.arms[0], args.n)
        path = args.out / "checkpoints.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        rows.append(
            {
                "arm": args.arms[0],
                "step": step,
                "checkpoint": str(args.checkpoint),
                "metrics": metrics,
            }
        )
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows[-1], indent=2))
        return
    rows = []
    for arm in args.arms:
        start = time.time()
        train_arm(args.out, arm, args.steps, args.threads)
        results = json.loads((args.out / arm / "results.json").read_text())
        segments = results.get("segments")
        wall = total_wall_time_s(segments) if segments else results["wall_time_s"]
        rows.append(
            {
                "arm": arm,
                "overrides": ARMS[arm],
                "steps": results["steps"],
                "train_wall_time_s": wall,
                "metrics": measure(args.out / arm, args.n),
                "measured_s": round(time.time() - start, 1),
            }
        )
        (args.out / "levers.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "levers.md").write_text(table(rows))
        print(table(rows), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("T2ILAB_ROOT", str(ROOT))
    main()
