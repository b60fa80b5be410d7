"""Test support: configs composed exactly as train.py composes them, and a runner for the real
command line. Everything is offline and CPU-sized. (Not conftest.py: tests/metrics has its own.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("T2ILAB_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Overrides that make any DreamBooth experiment a seconds-long CPU run.
FAST = [
    "trainer.max_steps=3",
    "method.num_class_images=2",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.images_per_prompt=1",
    "logger=csv",
    "trainer.log_every_n_steps=1",  # every step of these short runs reaches the logger
    # torch's own thread count whatever the load: repeated runs compare bit for bit
    # (cpu_threads=auto may choose differently for two runs on a machine whose load changes),
    # and a run inside the test process leaves that process's threads as they were.
    "trainer.cpu_threads=null",
    # Two prompts, two images each (DIV needs pairs), two sampling steps.
    "eval.prompts=['a {identifier} {class_noun}','a {identifier} {class_noun} in the snow']",
    "eval.images_per_prompt=2",
    "eval.num_inference_steps=2",
]


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train"):
    """The config train.py (or evaluate.py) would run with, hydra.* interpolations resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # train.py's cfg has no hydra node either
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.class_images_dir = str(output_dir / "class_images")
    return cfg


def run_train(
    args: list[str],
    run_dir: Path,
    timeout: int = 300,
    env: dict | None = None,
    script: str = "train.py",
):
    """`python train.py ARGS hydra.run.dir=RUN_DIR` (or evaluate.py), as a user types it."""
    cmd = [
        sys.executable,
        str(ROOT / script),
        *args,
        f"hydra.run.dir={run_dir}",
        f"paths.class_images_dir={run_dir.parent / 'class_images'}",
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_sweep(config_name: str, args: list[str], sweep_dir: Path, timeout: int = 900):
    """`python train.py --config-dir sweeps --config-name NAME ARGS`, a whole multirun, with
    the fast overrides, no exports or end-of-run grids, and its folders under `sweep_dir`."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config-dir",
        "sweeps",
        "--config-name",
        config_name,
        *FAST,
        "export.enabled=false",
        "callbacks.samples.at_end=false",
        *args,
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.class_images_dir={sweep_dir.parent / 'class_images'}",
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


# A two-step DreamBooth run on a real-config folder at 64 px: what the flow backbones' folder
# tests train (tests/test_sd3.py, tests/test_flux.py).
FOLDER_RUN = [
    "model.resolution=64",
    "data=dreambooth",
    "method=dreambooth",
    "method.prior_preservation=false",
    "trainer.max_steps=2",
    "method.lr=1e-3",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "callbacks.model_checkpoint.every_n_train_steps=null",
    "logger=csv",
    "eval=none",
]


def assert_only_transformer_trained(export, base, frozen: tuple[str, ...]) -> None:
    """The exported pipeline's transformer moved from the base's; its `frozen` parts did not."""
    import torch

    def pairs(name):
        a, b = getattr(export, name).state_dict(), getattr(base, name).state_dict()
        assert list(a) == list(b), name
        return [(a[k], b[k]) for k in a]

    assert max((a - b).abs().max().item() for a, b in pairs("transformer")) > 0
    for name in frozen:
        assert all(torch.equal(a, b) for a, b in pairs(name)), name


class SeededDraws:
    """The shared step's keyed draws (`GroupedDraws`) from one seeded generator: many rows
    fast, for checking the densities of timestep draws (the keys do not matter here)."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, stream, shape):
        return torch.randn(shape, generator=self.gen)

    def rand(self, stream, shape):
        return torch.rand(shape, generator=self.gen)

    def randint(self, stream, shape, high):
        return torch.randint(high, shape, generator=self.gen)
