"""Every user mistake: one clear line that names the fix, before any weights load."""

from __future__ import annotations

import pytest
from _support import FAST, run_train
from PIL import Image

import t2ilab.train as train_module
from t2ilab.errors import UserError


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load model weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(train_module, "load_sd_components", forbidden)


def _folder_with(tmp_path, name, data: bytes | None = None):
    folder = tmp_path / name
    folder.mkdir()
    if data is not None:
        (folder / "img.png").write_bytes(data)
    return folder


def _diffusers_less_folder(tmp_path):
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    (folder / "unet.safetensors").write_bytes(b"")
    return folder


CASES = {
    "toy evaluators on a real model": (lambda t: ["model=sd15"], "add eval=dreambooth"),
    "missing instance folder": (lambda t: [f"data.instance_dir={t / 'nope'}"], "does not exist"),
    "empty instance folder": (
        lambda t: [f"data.instance_dir={_folder_with(t, 'empty')}"],
        "has no images",
    ),
    "corrupt image": (
        lambda t: [f"data.instance_dir={_folder_with(t, 'bad', b'not really a png')}"],
        r"img.png cannot be read as an image .* re-export it",
    ),
    "prompt without identifier": (
        lambda t: ["data.instance_prompt='a photo of a toy'"],
        "not a whole word of the instance prompt",
    ),
    "template without identifier": (
        lambda t: ["data.instance_prompt_template='a photo of a {class_noun}'"],
        "has no {identifier}",
    ),
    "prior without class": (lambda t: ["data.class_noun=null"], "set data.class_noun=NOUN"),
    "resolution not divisible": (
        lambda t: ["data.resolution=63"],
        "not a multiple of the VAE factor 4.*use 60 or 64",
    ),
    "pretrained not diffusers": (
        lambda t: [
            "model=sd15",
            "eval=dreambooth",
            f"model.pretrained={_diffusers_less_folder(t)}",
            "data.resolution=64",
        ],
        "is not a diffusers folder",
    ),
    "hub id unreachable": (
        lambda t: ["model=sd15", "eval=dreambooth", "model.pretrained=nobody/no-such-model"],
        "could not be fetched from the Hugging Face hub.*--local-dir DIR",
    ),
    "missing checkpoint": (lambda t: [f"ckpt_path={t / 'x.ckpt'}"], "no checkpoint at"),
    "unknown sampler": (lambda t: ["sampling.scheduler=FooScheduler"], "not a diffusers scheduler"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_user_error_before_weights(
    case, make_cfg, tmp_path, no_weights, monkeypatch
):
    import huggingface_hub.constants

    # Offline at once instead of ~20 s of connection retries (the env var is read at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    overrides, match = CASES[case]
    cfg = make_cfg("experiment=dreambooth", *FAST, *overrides(tmp_path))
    if case == "unknown sampler":
        # Sampler names are checked where they are used; the check runs before any generation.
        from t2ilab.models.pipelines import make_sampler

        with pytest.raises(UserError, match=match):
            make_sampler(cfg.sampling.scheduler, {})
        return
    with pytest.raises(UserError, match=match) as err:
        train_module.train(cfg)
    assert "\n" not in str(err.value)


def test_user_error_prints_one_line_and_exits_2(tmp_path):
    proc = run_train(
        ["experiment=dreambooth", *FAST, f"data.instance_dir={tmp_path / 'missing'}"],
        tmp_path / "run",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2ilab: error:")]
    assert len(errors) == 1 and "data.instance_dir=" in errors[0] and "does not exist" in errors[0]
    results = (tmp_path / "run" / "results.json").read_text()
    assert '"status": "failed"' in results and "does not exist" in results
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_preset_lists_the_options(tmp_path):
    proc = run_train(["model=sd9"], tmp_path / "run")
    assert proc.returncode != 0
    assert "Could not find 'model/sd9'" in proc.stderr
    assert "sd15" in proc.stderr and "tiny_sd" in proc.stderr  # Hydra lists what exists
    assert "Traceback" not in proc.stderr


def test_unknown_key_fails_with_hydras_message(tmp_path):
    proc = run_train(["trainer.max_stepz=3"], tmp_path / "run")
    assert proc.returncode != 0
    assert "Could not override 'trainer.max_stepz'" in proc.stderr


def test_corrupt_image_among_good_ones_is_named(tmp_path, make_cfg, no_weights):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    cfg = make_cfg("experiment=dreambooth", *FAST, f"data.instance_dir={folder}")
    with pytest.raises(UserError, match="truncated.jpg"):
        train_module.train(cfg)
