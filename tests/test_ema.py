"""EMA of the trainable weights: the export holds the EMA (checked against an independent
computation from the per-step raw weights), checkpoints keep the raw weights, and a resumed run
ends with the same EMA as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from _support import CONF, FAST, run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from t2ilab.models.loading import load_sd_components

DECAY = 0.2  # diffusers' schedule: 0 at the first update, then min(DECAY, (1 + n) / (10 + n))
ARGS = [
    "experiment=dreambooth_sigmoid",
    "model=tiny_sd",  # compared with the tiny base built from its config below
    *FAST,
    "eval=none",
    "callbacks.samples.at_end=false",
    "ema.enabled=true",
    f"ema.decay={DECAY}",
    "method.lr=1e-3",  # big enough steps that raw and EMA weights differ clearly
]


def _unet_from_ckpt(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}


def _ema_of_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """The EMA callback's shadow weights in a loaded checkpoint, by UNet parameter name."""
    names = [k.removeprefix("unet.") for k in state["state_dict"] if k.startswith("unet.")]
    (ema_state,) = [v for k, v in state["callbacks"].items() if k.startswith("EMACallback")]
    return dict(zip(names, ema_state["shadow_params"], strict=True))


def _exported_unet(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_export_holds_the_ema_of_the_raw_weights(tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        [
            *ARGS,
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.keep_last=-1",
        ],
        run,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = [_unet_from_ckpt(run / "checkpoints" / f"step_{s:06d}.ckpt") for s in (1, 2, 3)]
    base = load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml")).unet.state_dict()
    ema = {k: v.clone() for k, v in base.items()}
    for n, weights in enumerate(raw, start=1):  # independent of diffusers' EMAModel code
        decay = _ema_decay(n)
        ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    exported = _exported_unet(run)
    assert set(exported) == set(ema)
    for k in ema:
        torch.testing.assert_close(exported[k], ema[k], rtol=1e-5, atol=1e-7)
    # The checkpoint keeps the raw weights: resuming trains them, not the average.
    moved = max((raw[2][k] - exported[k]).abs().max().item() for k in exported)
    assert moved > 1e-5
    last = _unet_from_ckpt(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(last[k], raw[2][k]) for k in last)


def _ema_decay(optimization_step: int) -> float:
    step = optimization_step - 1
    return 0.0 if step <= 0 else min(DECAY, (1 + step) / (10 + step))


@pytest.mark.slow
def test_a_resumed_run_continues_the_checkpointed_ema(tmp_path):
    """After resuming at step 2, the EMA goes on from the checkpoint's EMA (not from the current
    weights, which a fresh EMA would start from)."""
    every_step = [
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.keep_last=-1",
    ]
    run = tmp_path / "run"
    first = run_train([*ARGS, *every_step, "trainer.max_steps=2"], run)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (ema_state,) = [v for k, v in state["callbacks"].items() if k.startswith("EMACallback")]
    assert ema_state["optimization_step"] == 2
    resumed = run_train([*ARGS, *every_step, "trainer.max_steps=4", "ckpt_path=last"], run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ema = _ema_of_checkpoint(state)
    for n in (3, 4):
        raw = _unet_from_ckpt(run / "checkpoints" / f"step_{n:06d}.ckpt")
        decay = _ema_decay(n)
        ema = {k: decay * ema[k] + (1 - decay) * raw[k] for k in ema}
    exported = _exported_unet(run)
    for k in ema:
        torch.testing.assert_close(exported[k], ema[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_finished_run_without_export_is_exported_from_its_checkpoint(tmp_path):
    """A run trained with export.enabled=false is exported later by the same command with
    ckpt_path=last: no step is trained, the export holds the checkpoint's EMA (not its raw
    weights) and the run's scores stay in results.json."""
    run = tmp_path / "run"
    first = run_train([*ARGS, "export.enabled=false"], run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run / "export").exists()
    before = json.loads((run / "results.json").read_text())
    assert before["steps"] == 3 and "train_loss" in before["metrics"]

    told = run_train([f"run_dir={run}"], tmp_path / "eval", script="evaluate.py")
    assert told.returncode == 2
    assert f"hydra.run.dir={run} ckpt_path=last export.enabled=true" in told.stderr.splitlines()[-1]

    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    exported = run_train([*ARGS, "ckpt_path=last"], run)
    assert exported.returncode == 0, exported.stderr[-3000:]
    after = json.loads((run / "results.json").read_text())
    assert after["status"] == "ok" and after["steps"] == 3
    assert after["metrics"] == before["metrics"]
    unet, raw = _exported_unet(run), _unet_from_ckpt(run / "checkpoints" / "last.ckpt")
    assert raw.keys() == unet.keys()
    ema = _ema_of_checkpoint(state)
    for k in ema:
        torch.testing.assert_close(unet[k], ema[k])
    assert max((raw[k] - unet[k]).abs().max().item() for k in unet) > 1e-5
    # Loads in stock diffusers.
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(run / "export", safety_checker=None)
    # Exported once: the same command again has nothing to do.
    again = run_train([*ARGS, "ckpt_path=last"], run)
    assert again.returncode == 2
    assert "nothing to train: ckpt_path=last is at step 3" in again.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["ema.decay=1.5"], "ema.decay=1.5: must be between 0 and 1"),
        (["trainer=fsdp"], "not with sharded parameters"),
    ],
)
@pytest.mark.slow
def test_bad_ema_settings_fail_before_training(overrides, match, tmp_path):
    proc = run_train([*ARGS, *overrides], tmp_path / "run")
    assert proc.returncode == 2
    assert match in proc.stderr.strip().splitlines()[-1]


def test_an_ema_turned_on_at_a_resume_starts_from_the_restored_weights():
    """ema.enabled=true on a resume from a checkpoint without EMA: `setup` runs before Lightning
    restores the weights, so the EMA that samples see before the first step, and that training
    updates, must be the restored weights, not the ones before the restore."""
    from types import SimpleNamespace

    from t2ilab.callbacks.ema import EMACallback

    weight = torch.nn.Parameter(torch.zeros(3))
    module = SimpleNamespace(trainable_parameters=lambda: [weight], device=torch.device("cpu"))
    callback = EMACallback(decay=0.9)
    callback.setup(None, module, "fit")
    restored = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        weight.copy_(restored)  # the checkpoint's weights
    callback.on_train_start(SimpleNamespace(global_step=100), module)
    with torch.no_grad():
        weight.add_(1.0)  # the raw weights move on; the EMA has not been updated yet
    with callback.swapped_in(module):
        torch.testing.assert_close(weight.detach(), restored)
    torch.testing.assert_close(weight.detach(), restored + 1.0)  # raw weights back
