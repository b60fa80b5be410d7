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

    monkeypatch.setattr(train_module, "load_components", forbidden)


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
    "paper's evaluators on a toy model without torchvision": (
        lambda t: ["eval=dreambooth"],
        r"model=toy_sd draws the toy world: score it with eval=toy",
    ),
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
    "one image per prompt with DIV": (
        lambda t: ["eval.images_per_prompt=1"],
        "DIV compares images of the same prompt.*eval.div_distance=null",
    ),
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
    # Numbers out of range, or not numbers at all.
    "zero lr": (lambda t: ["method.lr=0"], r"method.lr=0.0 must be positive: e.g. method.lr=1e-4"),
    "negative lr": (lambda t: ["method.lr=-1e-4"], "must be positive"),
    "lr not a number": (lambda t: ["method.lr=fast"], "method.lr=fast is not a number"),
    "zero steps": (lambda t: ["trainer.max_steps=0"], "trains nothing: give the number"),
    "steps not whole": (lambda t: ["trainer.max_steps=2.5"], "not a whole number: use 2"),
    "endless run": (lambda t: ["trainer.max_steps=-1"], "would never end"),
    "zero batch": (lambda t: ["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
    "zero lora rank": (
        lambda t: ["method=lora", "method.rank=0"],
        "method.rank=0 must be at least 1",
    ),
    "negative resolution": (lambda t: ["data.resolution=-64"], "must be at least 1"),
    "zero sampling steps": (lambda t: ["sampling.num_inference_steps=0"], "at least 1"),
    "negative clip": (lambda t: ["trainer.gradient_clip_val=-1"], "or null for no clipping"),
    "bad noise": (lambda t: ["noise.snr_gamma=-1"], r"noise.snr_gamma=-1.* must be > 0"),
    "unknown schedule": (lambda t: ["noise.beta_schedule=cosine"], "is not one of linear"),
    "flow on a ddpm model": (lambda t: ["noise=flow"], "model=toy_sd samples with DDPM"),
    "betas on a flow model": (
        lambda t: ["model=tiny_flux", "noise=sigmoid"],
        "noise.beta_schedule=sigmoid makes no sense under flow matching",
    ),
    "ddpm sampler on a flow model": (
        lambda t: ["model=tiny_sd3", "sampling.scheduler=DDIMScheduler"],
        "cannot sample model=tiny_sd3's flow-matching schedule",
    ),
    "flow sampler on a ddpm model": (
        lambda t: ["sampling.scheduler=FlowMatchEulerDiscreteScheduler"],
        "cannot sample model=toy_sd's DDPM schedule",
    ),
    # Devices this machine does not have.
    "gpu without a gpu": (lambda t: ["trainer.accelerator=gpu"], "torch sees no GPU.*trainer=cpu"),
    "more cpu processes than cores": (lambda t: ["trainer.devices=4096"], "use at most"),
    # Settings that would make the run meaningless without failing.
    "prior with no class images": (
        lambda t: ["method.num_class_images=0"],
        "the prior loss would have no class images",
    ),
    "prior weighed out": (lambda t: ["method.prior_loss_weight=0"], "weighs the prior loss out"),
    "nothing trains": (lambda t: ["method.train_unet=false"], "nothing would train"),
    # Prompts that tokenize badly.
    "prompt longer than the text encoder reads": (
        lambda t: [
            "data.instance_prompt_template='" + "a very " * 20 + "{identifier} {class_noun}'"
        ],
        r"data.instance_prompt=.* is \d+ tokens, more than the 32 the text encoder reads",
    ),
    "template with an unknown field": (
        lambda t: ["data.instance_prompt_template='a {identifier} {breed} {class_noun}'"],
        r"cannot be filled \(KeyError: 'breed'\): it may use only \{identifier\}",
    ),
    "identifier with a space": (lambda t: ["data.identifier='my dog'"], "one non-empty word"),
    "sample prompt with a variable the data lacks": (
        lambda t: ["callbacks.samples.prompts=['a {identifier} {breed}']"],
        r"'a \{identifier\} \{breed\}' uses \{breed\}, which this run's data does not define"
        r" \(its variables: \{class_noun\}, \{identifier\}\).*callbacks.samples.prompts=null",
    ),
    # Outputs among the user's own data.
    "class images into the subject folder": (
        lambda t: [f"data.instance_dir={_subject(t)}", f"data.class_dir={_subject(t)}"],
        "data.class_dir=.* is your data .*class images would be written among your files",
    ),
    "class images inside the subject folder": (
        lambda t: [f"data.instance_dir={_subject(t)}", f"data.class_dir={_subject(t) / 'cls'}"],
        "data.class_dir=.* is inside your data",
    ),
    "export into the subject folder": (
        lambda t: [f"data.instance_dir={_subject(t)}", f"export.dir={_subject(t) / 'out'}"],
        "export.dir=.* is inside your data .*the export would be written",
    ),
}


def _subject(tmp_path):
    """A copy of a real subject folder, made once per test."""
    folder = tmp_path / "subject"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_user_error_before_weights(
    case, make_cfg, tmp_path, no_weights, monkeypatch
):
    import huggingface_hub.constants

    # Offline at once instead of ~20 s of connection retries (the env var is read at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    overrides, match = CASES[case]
    if case.endswith("without torchvision"):
        monkeypatch.setattr("t2ilab.validation.lpips_available", lambda: False)
    cfg = make_cfg("experiment=dreambooth", *FAST, *overrides(tmp_path))
    if case == "unknown sampler":
        # Sampler names are checked where they are used; the check runs before any generation.
        from t2ilab.models.pipelines import make_sampler

        with pytest.raises(UserError, match=match):
            make_sampler(cfg.sampling.scheduler, {})
        return
    subject = tmp_path / "subject"
    before = sorted(p.name for p in subject.iterdir()) if subject.is_dir() else None
    with pytest.raises(UserError, match=match) as err:
        train_module.train(cfg)
    assert "\n" not in str(err.value)
    if before is not None:  # nothing was added to the user's folder
        assert sorted(p.name for p in subject.iterdir()) == before


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


def test_corrupt_image_among_good_ones_is_named(tmp_path, make_cfg, no_weights):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    cfg = make_cfg("experiment=dreambooth", *FAST, f"data.instance_dir={folder}")
    with pytest.raises(UserError, match="truncated.jpg"):
        train_module.train(cfg)
