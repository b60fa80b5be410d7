"""Exports are portable: t2ilab.json names paths inside the project relative to its root, so an
export copied to another folder or machine still finds its base model, subject and evaluators;
a base that cannot be found is one line naming model.pretrained= as the fix."""

from __future__ import annotations

import json
import shutil

import pytest
from _support import FAST, ROOT, run_train

from t2ilab.errors import UserError
from t2ilab.models.export import (
    METADATA_FILE,
    export_base_model,
    load_export,
    portable_path,
    read_metadata,
    resolve_recorded_path,
)

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


def test_project_paths_are_recorded_relative_to_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("T2ILAB_ROOT", str(ROOT))
    assert portable_path(str(ROOT / "models" / "toy" / "toy_sd")) == "models/toy/toy_sd"
    assert portable_path(str(tmp_path)) == str(tmp_path)  # elsewhere: absolute
    assert portable_path("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a hub id stays one
    )
    assert portable_path(None) is None


def test_recorded_paths_resolve_against_the_current_root(tmp_path, monkeypatch):
    """Another machine: the same project checked out somewhere else."""
    other_root = tmp_path / "elsewhere" / "t2ilab"
    (other_root / "models" / "toy" / "toy_sd").mkdir(parents=True)
    monkeypatch.setenv("T2ILAB_ROOT", str(other_root))
    assert resolve_recorded_path("models/toy/toy_sd") == str(other_root / "models/toy/toy_sd")
    assert resolve_recorded_path("org/model") == "org/model"  # hub id
    assert resolve_recorded_path("/data/sd15") == "/data/sd15"


def _lora_export(folder, base_model):
    folder.mkdir(parents=True)
    (folder / METADATA_FILE).write_text(
        json.dumps({"artefact": "lora", "base_model": base_model, "instance_dir": "data/x"})
    )
    return folder


def test_a_missing_base_model_is_one_line_naming_model_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("T2ILAB_ROOT", str(tmp_path))  # a checkout without models/toy/toy_sd
    export = _lora_export(tmp_path / "export", "models/toy/toy_sd")
    for call in (export_base_model, load_export):
        with pytest.raises(UserError, match=r"model\.pretrained=<folder or hub id>") as err:
            call(export)
        assert "\n" not in str(err.value) and "models/toy/toy_sd" in str(err.value)
    no_base = _lora_export(tmp_path / "no_base", None)
    with pytest.raises(UserError, match=r"names no base model: set model\.pretrained="):
        export_base_model(no_base)


def test_which_base_model_a_parameter_efficient_export_gets(tmp_path, monkeypatch):
    monkeypatch.setenv("T2ILAB_ROOT", str(ROOT))
    toy_sd = ROOT / "models" / "toy" / "toy_sd"
    export = _lora_export(tmp_path / "export", "models/toy/toy_sd")
    assert export_base_model(export) == str(toy_sd)  # recorded, resolved in this checkout
    assert read_metadata(export)["instance_dir"] == str(ROOT / "data" / "x")
    (export / "base_model").mkdir()
    (export / "base_model" / "model_index.json").write_text("{}")
    assert export_base_model(export) == str(export / "base_model")  # built from config
    assert export_base_model(export, str(toy_sd)) == str(toy_sd)  # the user's model.pretrained


@pytest.fixture(scope="module")
def toy_lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("portable") / "run"
    proc = run_train(["experiment=lora_dreambooth", *FAST], run_dir)  # base: models/toy/toy_sd
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_copied_export_loads_and_evaluates_without_its_run(toy_lora_run, tmp_path):
    text = (toy_lora_run / "export" / METADATA_FILE).read_text()
    assert str(ROOT) not in text  # nothing names this checkout by absolute path
    recorded = json.loads(text)
    assert recorded["base_model"] == "models/toy/toy_sd"
    assert recorded["instance_dir"] == "data/toy_subjects/striped_star"
    during = json.loads((toy_lora_run / "results.json").read_text())["metrics"]

    copy = tmp_path / "shared" / "star_lora"
    shutil.copytree(toy_lora_run / "export", copy, symlinks=True)
    toy_lora_run.rename(toy_lora_run.with_name("run_moved"))  # the original is gone
    try:
        pipe = load_export(copy)
        assert pipe.unet.peft_config  # the LoRA on the toy base
        proc = run_train([f"export_dir={copy}"], tmp_path / "eval", script="evaluate.py")
        assert proc.returncode == 0, proc.stderr[-3000:]
        after = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
        for name in METRICS:
            assert after[name] == pytest.approx(during[name], abs=1e-4), name
    finally:
        toy_lora_run.with_name("run_moved").rename(toy_lora_run)


def test_an_exported_pipeline_keeps_no_folder_it_was_loaded_from(tmp_path):
    """diffusers writes a loaded model's source folder into its config.json as `_name_or_path`;
    the export drops it, and stock diffusers still loads the folder."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from omegaconf import OmegaConf

    from t2ilab.models.loading import load_components

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "toy_sd.yaml")
    model_cfg = OmegaConf.merge({"paths": {"root_dir": str(ROOT)}}, {"model": model_cfg}).model
    backbone = load_components(model_cfg)
    scheduler = DDIMScheduler.from_config(backbone.scheduler_config)
    backbone.pipeline(scheduler).save_pretrained(tmp_path / "stock")
    stock = json.loads((tmp_path / "stock" / "unet" / "config.json").read_text())
    assert "toy_sd" in stock["_name_or_path"]  # what a plain save keeps

    backbone.save_pipeline(tmp_path / "export", scheduler)
    configs = sorted((tmp_path / "export").glob("*/config.json"))
    assert [c.parent.name for c in configs] == ["text_encoder", "unet", "vae"]
    for config_file in configs:
        config = json.loads(config_file.read_text())
        assert "_name_or_path" not in config, config_file
        assert str(ROOT) not in config_file.read_text()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None)
    loaded = pipe.unet.state_dict()
    for name, weight in backbone.pipeline(scheduler).unet.state_dict().items():
        assert torch.equal(weight, loaded[name]), name
