"""Exact resume: a run killed mid-epoch, at an epoch boundary, or extended past its max_steps
trains the same batches in the same order as an uninterrupted run, so its final weights are the
uninterrupted run's.

The in-process tests check the data order itself through Lightning's real checkpoint and resume
path; the slow tests SIGKILL `python train.py` (one process, and two gloo ranks) and compare the
exported UNet with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from _support import FAST, ROOT, run_train
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import Dataset, default_collate

from t2ilab.data.loader import resumable_loader

# --- the data order, in process ---------------------------------------------------------------

ITEMS = 8  # batches of one: an epoch is 8 steps


class Draws(Dataset):
    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, draw: int) -> torch.Tensor:
        return torch.tensor([draw], dtype=torch.float64)


class RecordsDraws(L.LightningModule):
    """Records (global step, draw) of every training batch."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.seen: list[tuple[int, int]] = []
        self.seed = seed

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, int(batch[0, 0])))
        return (self.weight - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return resumable_loader(Draws(), batch_size=1, seed=self.seed, collate_fn=default_collate)


def _fit(tmp_path: Path, max_steps: int, ckpt_path: str | None = None, every: int = 4):
    module = RecordsDraws()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=every, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """28 steps: three and a half epochs, a checkpoint every 4 steps."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, _fit(folder, 28)


def test_every_epoch_is_a_new_permutation_of_all_items(uninterrupted):
    _, seen = uninterrupted
    epochs = [[draw for _, draw in seen[e * ITEMS : (e + 1) * ITEMS]] for e in range(3)]
    for e, draws in enumerate(epochs):
        assert sorted(draws) == [e * ITEMS + i for i in range(ITEMS)]  # draws of epoch e
    orders = [[d % ITEMS for d in draws] for draws in epochs]
    assert len({tuple(o) for o in orders}) == 3  # each epoch shuffled anew


@pytest.mark.parametrize(
    "resume_step",
    [4, 12, 8, 16, 24],  # mid-epoch 0 and 1; the boundaries after epochs 0, 1 and 2
)
def test_resume_from_any_checkpoint_trains_the_uninterrupted_order(
    uninterrupted, tmp_path, resume_step
):
    folder, seen = uninterrupted
    resumed = _fit(tmp_path, 28, str(folder / "ckpt" / f"step={resume_step}.ckpt"))
    assert resumed == seen[resume_step:]


def test_extending_a_finished_run_continues_its_order(uninterrupted, tmp_path):
    _, seen = uninterrupted
    short = _fit(tmp_path / "short", 20, every=20)  # a finished run, mid-epoch 2
    extended = _fit(tmp_path / "long", 28, str(tmp_path / "short" / "ckpt" / "step=20.ckpt"))
    assert short + extended == seen


def test_the_order_does_not_depend_on_the_global_rng(uninterrupted, tmp_path):
    _, seen = uninterrupted
    torch.manual_seed(12345)  # a resumed process's global RNG is in another state
    assert _fit(tmp_path, 28) == seen


# --- the real command line, killed with SIGKILL -------------------------------------------------

STEPS = 14  # 6 instance images, batch 1: epochs of 6 steps, the run ends mid-epoch 2
ARGS = [
    "experiment=dreambooth_sigmoid",
    "model=tiny_sd",
    *FAST,
    "eval.enabled=false",
    "export.enabled=true",
    "callbacks.samples.at_end=false",
    "method.lr=1e-3",  # the weights move visibly in a few steps
    f"trainer.max_steps={STEPS}",
]
# Two gloo ranks with batch 1: epochs of 3 steps.
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _unet(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "unet" / "diffusion_pytorch_model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _train(args: list[str], run_dir: Path) -> None:
    proc = run_train(args, run_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_at_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Run with a checkpoint every `step` steps; SIGKILL the whole process group (every rank)
    right after the first checkpoint lands, while the next steps are under way."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        f"callbacks.model_checkpoint.every_n_train_steps={step}",
        f"hydra.run.dir={run_dir}",
        f"paths.class_images_dir={run_dir.parent / 'class_images'}",
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 600
    try:
        while not last.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == step
    assert not (run_dir / "results.json").exists()  # it died before the end


def _resume(args: list[str], run_dir: Path) -> None:
    _train([*args, "ckpt_path=last"], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["steps"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "mid_epoch", "boundary"),
    [("one process", 8, 6), ("two gloo ranks", 4, 6)],
)
def test_killed_and_extended_runs_end_with_the_uninterrupted_weights(
    tmp_path, ranks, mid_epoch, boundary
):
    args = ARGS + (DDP if ranks == "two gloo ranks" else [])
    _train(args, tmp_path / "uninterrupted")
    _train(args, tmp_path / "repeated")
    reference = _unet(tmp_path / "uninterrupted")
    # The tolerance is what a repeated uninterrupted run needs: on one machine, with the same
    # settings, every operation repeats bit for bit, so it is 0.
    tolerance = _max_difference(_unet(tmp_path / "repeated"), reference)
    assert tolerance == 0.0

    for name, step in (("mid_epoch", mid_epoch), ("boundary", boundary)):
        run_dir = tmp_path / name
        _kill_at_checkpoint(args, run_dir, step)
        _resume(args, run_dir)
        assert _max_difference(_unet(run_dir), reference) <= tolerance, name

    # A finished shorter run, extended to STEPS with a larger max_steps.
    extended = tmp_path / "extended"
    _train(
        [*args, "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=10"],
        extended,
    )
    _resume(args, extended)
    assert _max_difference(_unet(extended), reference) <= tolerance

    # The check can fail: training moved the weights far more than the tolerance.
    base = tmp_path / "base"
    _train([*args, "trainer.max_steps=1"], base)
    assert _max_difference(_unet(base), reference) > 1e-4
