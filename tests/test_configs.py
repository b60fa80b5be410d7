"""Every experiment composes and instantiates; the CLI's help and config printing work."""

from __future__ import annotations

import subprocess
import sys

import hydra
import lightning as L
import pytest
from _support import CONF, FAST, ROOT
from omegaconf import OmegaConf

from t2ilab.build import build_module, build_trainer
from t2ilab.loggers import build_loggers
from t2ilab.models.loading import load_components
from t2ilab.modules.base import DiffusionModule

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_the_four_improved_dreambooth_arms_exist():
    assert {
        "dreambooth",
        "dreambooth_zsnr",
        "dreambooth_sigmoid",
        "dreambooth_sigmoid_zsnr",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, make_cfg):
    cfg = make_cfg(f"experiment={experiment}", *FAST)
    components = load_components(cfg.model)
    module_class = hydra.utils.get_class(cfg.method.module._target_)
    module_class.prepare_tokenizer(components.tokenizer, cfg.method)  # as train.py does
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, components, datamodule)
    assert isinstance(module, DiffusionModule)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == cfg.method.lr  # before any warmup
    assert isinstance(datamodule, L.LightningDataModule)
    datamodule.check()  # the bundled example data passes the checks
    trainer = build_trainer(cfg, build_loggers(cfg), callbacks=[])
    assert isinstance(trainer, L.Trainer)
    for callback in cfg.callbacks.values():
        hydra.utils.instantiate(callback)


@pytest.mark.parametrize(
    "experiment,schedule,zsnr",
    [
        ("dreambooth", None, False),
        ("dreambooth_zsnr", None, True),
        ("dreambooth_sigmoid", "sigmoid", False),
        ("dreambooth_sigmoid_zsnr", "sigmoid", True),
    ],
)
def test_arms_follow_the_paper(experiment, schedule, zsnr, make_cfg):
    cfg = make_cfg(f"experiment={experiment}", "model=sd15")
    assert cfg.noise.beta_schedule == schedule and cfg.noise.zero_terminal_snr is zsnr
    # Paper defaults on a real model: UNet only, lr 5e-6, 1000 steps T, 200 class images, sks.
    assert cfg.method.train_unet and not cfg.method.train_text_encoder
    assert cfg.method.lr == 5e-6 and cfg.method.num_class_images == 200
    assert cfg.noise.num_train_timesteps == 1000 and cfg.data.identifier == "sks"
    assert cfg.method.prior_preservation


def test_tiny_model_gets_a_cpu_budget_and_real_models_do_not(make_cfg):
    toy = make_cfg("experiment=dreambooth_sigmoid")  # the default: toy_sd
    tiny = make_cfg("experiment=dreambooth_sigmoid", "model=tiny_sd")
    real = make_cfg("experiment=dreambooth_sigmoid", "model=sd15", "eval=dreambooth")
    assert tiny.trainer.max_steps < real.trainer.max_steps
    assert tiny.method.num_class_images < real.method.num_class_images == 200
    # toy_sd: 500 steps of 4 subject images at a small model's lr, fewer class images; the
    # real model keeps the paper's 800 steps of one
    assert toy.model.name == "toy_sd" and (toy.trainer.max_steps, real.trainer.max_steps) == (
        500,
        800,
    )
    assert (toy.method.lr, real.method.lr) == (6e-4, 5e-6)
    assert toy.method.num_class_images == 100
    # The command line still wins over the tiny budget.
    assert make_cfg("experiment=dreambooth_sigmoid", "trainer.max_steps=7").trainer.max_steps == 7


def test_sd21_keeps_its_v_prediction(make_cfg):
    cfg = make_cfg("experiment=dreambooth", "model=sd21")
    assert cfg.noise.prediction_type is None  # null: the model's scheduler config decides
    assert cfg.model.resolution == 768


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_help_lists_the_config_groups():
    proc = _cli("--help")
    assert proc.returncode == 0
    for group in ("experiment:", "model:", "noise:", "method:", "trainer:", "logger:"):
        assert group in proc.stdout
    assert "dreambooth_sigmoid_zsnr" in proc.stdout


def test_cfg_job_prints_the_composed_config():
    proc = _cli("experiment=dreambooth_zsnr", "--cfg", "job")
    assert proc.returncode == 0
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.noise.zero_terminal_snr is True
    assert cfg.model.name == "toy_sd" and cfg.trainer.max_steps > 0


@pytest.mark.slow  # composes 30 configs
def test_the_30_dreambooth_subjects(make_cfg):
    every = sorted(p.stem for p in (CONF / "subject").glob("*.yaml"))
    toy = [s for s in every if s.startswith("toy_")]  # the toy world's three bundled subjects
    assert toy == ["toy_candy_heart", "toy_spotted_hexagon", "toy_striped_star"]
    subjects = [s for s in every if s not in toy]
    assert len(subjects) == 30
    dog = make_cfg("experiment=dreambooth", "subject=dog5")
    assert dog.data.class_noun == "dog" and dog.eval.subject_type == "live"
    assert dog.data.instance_dir.endswith("dreambooth/dataset/dog5")
    sloth = make_cfg("experiment=dreambooth", "subject=grey_sloth_plushie")
    assert sloth.data.class_noun == "stuffed animal" and sloth.eval.subject_type == "object"
    live = [s for s in subjects if make_cfg(f"subject={s}").eval.subject_type == "live"]
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
