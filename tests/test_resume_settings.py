"""A resume with changed settings trains with them and records them: the learning rate a user
lowers on resume is the one the optimizer uses from then on (Lightning would restore the old
one), results.json and the checkpoint list each change with its step, the first segment's Hydra
record stays as it was, and a finished run continued past its end keeps its first export."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _support import FAST, run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

ARGS = [
    "experiment=dreambooth_sigmoid",
    "model=tiny_sd",
    *FAST,
    "eval.enabled=false",
    "callbacks.samples.at_end=false",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def _train(args, run_dir):
    proc = run_train(args, run_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _logged_lr(run_dir) -> dict[int, float]:
    lrs = {}
    for log in run_dir.glob("csv/version_*/metrics.csv"):
        for row in csv.DictReader(open(log)):
            if row.get("train/lr"):
                lrs[int(row["step"])] = float(row["train/lr"])
    return lrs


@pytest.mark.slow
def test_a_lower_lr_on_resume_is_used_and_recorded(tmp_path):
    run = tmp_path / "run"
    _train([*ARGS, "method.lr=1e-3", "trainer.max_steps=4"], run)
    first_export = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")

    _train([*ARGS, "method.lr=1e-4", "trainer.max_steps=6", "ckpt_path=last"], run)

    # The optimizer trained at the new rate from the resume on (constant schedule).
    lrs = _logged_lr(run)
    assert [lrs[s] for s in range(4)] == pytest.approx([1e-3] * 4)
    assert [lrs[s] for s in (4, 5)] == pytest.approx([1e-4] * 2)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert last["lr_schedulers"][0]["base_lrs"] == pytest.approx([1e-4])

    # The record: results.json and the checkpoint name the change and its step.
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok" and results["steps"] == 6
    (resume,) = results["resumes"]
    assert resume["step"] == 4
    assert resume["changed"]["method.lr"] == [1e-3, 1e-4]
    assert resume["changed"]["trainer.max_steps"] == [4, 6]
    assert results["factors"]["method.lr"] == 1e-4  # the value that trained last
    assert last["t2ilab"]["resumes"] == results["resumes"]
    assert last["t2ilab"]["settings"]["method.lr"] == 1e-4

    # Hydra's record of the first segment is untouched; the resume's is beside it.
    assert OmegaConf.load(run / ".hydra" / "config.yaml").method.lr == 1e-3
    assert OmegaConf.load(run / ".hydra" / "resume_1" / "config.yaml").method.lr == 1e-4

    # The finished run's export is kept, the new one is the continued model.
    kept = load_file(
        tmp_path / "run" / "export_step_000004" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    new = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(kept[k], first_export[k]) for k in first_export)
    assert any(not torch.equal(new[k], first_export[k]) for k in first_export)


@pytest.mark.slow
def test_after_a_nan_the_advised_resume_trains_on(tmp_path):
    """The NaN message's advice works: a one-step warm-up to lr 1e20 (step 0 trains at lr 0)
    blows the weights up at step 1, so the step-2 loss is NaN; resuming from the checkpoint the
    message names, at a sane lr, finishes with finite weights."""
    run = tmp_path / "run"
    blow_up = [
        *ARGS,
        "method.lr=1e20",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.keep_last=3",
        "method.module.lr_scheduler.name=constant_with_warmup",
        "method.module.lr_scheduler.num_warmup_steps=1",
    ]
    proc = run_train(blow_up, run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("t2ilab: error:")]
    assert "loss became nan at step 2" in line, line
    advice = line.split("with a lower learning rate: ", 1)[1].split()
    assert f"ckpt_path={run / 'checkpoints' / 'step_000001.ckpt'}" in advice, line
    # The step-2 checkpoint holds the diverged weights: out of ckpt_path=last's way.
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "diverged_step_000002.ckpt").is_file()

    resume = [a for a in advice if a.startswith(("ckpt_path=", "hydra.run.dir="))]
    _train([*blow_up, *resume, "method.lr=1e-4", "method.module.lr_scheduler.name=constant"], run)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok" and results["steps"] == 6
    unet = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in unet.values())


def test_a_schedule_changed_on_resume_sets_the_first_resumed_step_rate():
    """Resumed from a constant schedule at step 30 into a linear decay to step 40 (and a new
    lr): the first resumed step already trains at the new schedule's rate, 2e-3 * (40 - 30) /
    40, not at the restored constant rate, and every later step follows the new schedule."""
    from functools import partial
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler

    from t2ilab.resume import ApplyResumedSettings

    weight = torch.nn.Parameter(torch.zeros(2))
    old_opt = torch.optim.AdamW([weight], lr=1e-3)
    old = get_scheduler("constant", optimizer=old_opt, num_training_steps=30)
    for _ in range(30):
        old_opt.step()
        old.step()
    saved_opt, saved_sched = old_opt.state_dict(), old.state_dict()

    optimizer = torch.optim.AdamW([weight], lr=2e-3)
    schedule = get_scheduler(
        "linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=40
    )
    optimizer.load_state_dict(saved_opt)  # what Lightning restores from the checkpoint
    schedule.load_state_dict(saved_sched)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the stale rate

    module = SimpleNamespace(optimizer_factory=partial(torch.optim.AdamW, lr=2e-3))
    trainer = SimpleNamespace(
        optimizers=[optimizer],
        lr_scheduler_configs=[SimpleNamespace(scheduler=schedule)],
        global_step=30,
    )
    ApplyResumedSettings({"method.lr": [1e-3, 2e-3]}).on_train_start(trainer, module)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([2e-3 * (40 - s) / 40 for s in range(30, 40)])
