"""The real command line, end to end: train, export, load in stock diffusers, sample, resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _support import FAST, ROOT, run_train
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from omegaconf import OmegaConf
from test_noise import expected_betas

EXPERIMENT = "dreambooth_sigmoid_zsnr"  # the paper's best arm, and the one that risks NaNs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_train(
        [
            f"experiment={EXPERIMENT}",
            *FAST,
            "trainer.max_steps=4",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.model_checkpoint.save_top_k=-1",
        ],
        run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_directory_layout(run_dir):
    for path in [
        ".hydra/config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/step_000002.ckpt",
        "export/model_index.json",
        "results.json",
        "csv/version_0/metrics.csv",
    ]:
        assert (run_dir / path).is_file(), path
    assert list((run_dir / "samples").glob("step_*.png"))
    eval_dir = run_dir / "samples" / "eval_step_000004"
    assert {p.name for p in eval_dir.iterdir()} == {
        "prompt_00.png",
        "prompt_01.png",
        "prior.png",
        "prompts.csv",
    }
    # Class images go to <model>/<weights fingerprint>/<prompt>, stamped with their source.
    (stamp,) = (run_dir.parent / "class_images").rglob("generated_by.json")
    made_by = json.loads(stamp.read_text())
    assert stamp.parent.parent.name == made_by["weights"]
    model = OmegaConf.load(run_dir / ".hydra" / "config.yaml").model
    assert stamp.parent.parent.parent.name == made_by["model"] == model.name
    assert made_by["pretrained"] == str(model.pretrained)
    assert len(list(stamp.parent.glob("class_*.png"))) == 2


def test_results_json_contract(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {
        "experiment",
        "status",
        "reason",
        "factors",
        "metrics",
        "steps",
        "wall_time_s",
        "segments",
    }
    assert results["experiment"] == EXPERIMENT and results["status"] == "ok"
    (launch,) = results["segments"]  # one launch, no continuation
    assert (launch["from_step"], launch["to_step"]) == (0, 4)
    assert launch["command"].startswith(f"python train.py experiment={EXPERIMENT}")
    assert results["reason"] is None and results["steps"] == 4
    factors = results["factors"]
    assert factors["experiment"] == EXPERIMENT
    assert factors["trainer.max_steps"] == 4  # every command-line override is a factor
    assert (
        factors["noise.beta_schedule"] == "sigmoid" and factors["noise.zero_terminal_snr"] is True
    )
    assert all(isinstance(v, float) for v in results["metrics"].values())
    # Every DreamBooth protocol metric, from the end-of-fit evaluation.
    assert {"dino", "clip_i", "clip_t", "pres", "div"} <= set(results["metrics"])
    assert results["wall_time_s"] > 0


def test_csv_log_has_loss_and_lr(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv/version_0/metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any(r.get("train/lr") for r in rows)


def test_checkpoint_holds_only_trainable_weights(run_dir):
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    keys = state["state_dict"].keys()
    assert any(k.startswith("unet.") for k in keys)
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in keys)
    assert state["global_step"] == 4


def test_export_schedule_is_the_trained_one(run_dir):
    scheduler = DDIMScheduler.from_pretrained(run_dir / "export", subfolder="scheduler")
    expected = np.cumprod(1 - expected_betas("sigmoid", zsnr=True))
    ac = scheduler.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=2e-5, atol=1e-7)
    assert ac[-1] == pytest.approx(2**-24)  # epsilon + ZTSNR: Euler's clamp, not NaN
    assert scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("sampler", [None, DPMSolverMultistepScheduler])
def test_export_loads_in_stock_diffusers_and_generates(run_dir, sampler):
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "export")
    if sampler is not None:
        pipe.scheduler = sampler.from_config(pipe.scheduler.config)
    out = pipe(
        "a photo of sks toy",
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


@pytest.mark.slow
def test_resume_continues_at_the_right_step(run_dir, tmp_path):
    resumed = tmp_path / "resumed"
    proc = run_train(
        [
            f"experiment={EXPERIMENT}",
            *FAST,
            "trainer.max_steps=4",
            f"ckpt_path={run_dir / 'checkpoints/step_000002.ckpt'}",
        ],
        resumed,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(resumed / "csv/version_0/metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == [2, 3]  # steps 0 and 1 were not trained again
    assert json.loads((resumed / "results.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_resume_last_in_the_same_run(run_dir):
    proc = run_train(
        [f"experiment={EXPERIMENT}", *FAST, "trainer.max_steps=5", "ckpt_path=last"], run_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def logged_steps(version):
        rows = list(csv.DictReader(open(run_dir / f"csv/version_{version}/metrics.csv")))
        return [int(r["step"]) for r in rows if r.get("train/loss")]

    assert logged_steps(0) == [0, 1, 2, 3]  # the first run's log is kept
    assert logged_steps(1) == [4]


@pytest.mark.slow
def test_four_arm_sweep_is_one_multirun(tmp_path):
    from _support import run_sweep

    sweep_dir = tmp_path / "sweep"
    proc = run_sweep("improved_dreambooth_arms", ["trainer.max_steps=1"], sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms, factors = {}, []
    for path in sweep_dir.glob("*/results.json"):
        results = json.loads(path.read_text())
        assert results["status"] == "ok"
        f = results["factors"]
        factors.append(f)
        arms[f["experiment"]] = (f["noise.beta_schedule"], f["noise.zero_terminal_snr"])
    # The model's own schedule is recorded as what it resolved to, never as null: toy_sd stores
    # SD's scaled-linear betas as trained_betas.
    own = json.loads((ROOT / "models/toy/toy_sd/scheduler/scheduler_config.json").read_text())
    assert arms == {
        "dreambooth": ("scaled_linear", False),
        "dreambooth_zsnr": ("scaled_linear", True),
        "dreambooth_sigmoid": ("sigmoid", False),
        "dreambooth_sigmoid_zsnr": ("sigmoid", True),
    }
    assert {f["noise.prediction_type"] for f in factors} == {own["prediction_type"]}
