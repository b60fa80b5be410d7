"""Image reading and the DreamBooth batch layout."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from t2ilab.data.class_images import class_image_name, plan_class_images
from t2ilab.data.dreambooth import DreamBoothDataset, collate_dreambooth, resolve_prompts
from t2ilab.data.images import ImageTransform, check_image_folder, list_images, load_rgb
from t2ilab.errors import UserError
from t2ilab.models.clip_tokenizer import build_clip_tokenizer


def _two_tone(width=40, height=20):
    """Left half red, right half blue: orientation is visible in the pixels."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _two_tone().save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_rgb(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)  # upright: taller than wide
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and bottom[2] > 200  # red on top after a 90° clockwise turn


def test_webp_and_rgba_are_read_as_rgb(tmp_path):
    Image.new("RGBA", (8, 8), (0, 255, 0, 128)).save(tmp_path / "a.webp")
    Image.new("L", (8, 8), 7).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.webp", "b.png"]
    assert all(load_rgb(p).mode == "RGB" for p in paths)


def test_transform_center_crop_and_range():
    tensor = ImageTransform(16, center_crop=True)(_two_tone(64, 32))
    assert tensor.shape == (3, 16, 16)
    assert tensor.min() >= -1 and tensor.max() <= 1
    # Center crop of a red|blue image keeps both halves.
    assert tensor[0, :, 0].mean() > 0.9 and tensor[2, :, -1].mean() > 0.9


def test_random_crop_and_flip_are_seeded():
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    image = Image.effect_noise((48, 32), 64).convert("RGB")
    a = transform(image, random.Random(3))
    b = transform(image, random.Random(3))
    assert torch.equal(a, b)
    outs = {transform(image, random.Random(s)).sum().item() for s in range(8)}
    assert len(outs) > 1
    assert not transform.is_deterministic and ImageTransform(16).is_deterministic


def test_check_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_image_folder(tmp_path / "missing", "data.instance_dir")
    with pytest.raises(UserError, match="has no images"):
        check_image_folder(tmp_path, "data.instance_dir")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    with pytest.raises(UserError, match="broken.png cannot be read"):
        check_image_folder(tmp_path, "data.instance_dir")


def test_batches_put_instance_examples_first(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path / "tok")
    for i in range(3):
        _two_tone().save(tmp_path / f"i{i}.png")
        Image.new("RGB", (20, 20), (0, 0, 0)).save(tmp_path / f"c{i}.png")
    dataset = DreamBoothDataset(
        [tmp_path / f"i{i}.png" for i in range(3)],
        "a photo of sks dog",
        tokenizer,
        ImageTransform(16),
        [tmp_path / f"c{i}.png" for i in range(3)],
        "a photo of dog",
    )
    batch = collate_dreambooth([dataset[0], dataset[1]])
    assert batch["num_instance"] == 2
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert (batch["pixel_values"][2:] == -1).all()  # class images (black) come second
    sks = 48136
    assert (batch["input_ids"][:2] == sks).any(dim=1).all()
    assert not (batch["input_ids"][2:] == sks).any()


def test_prompts_from_template_and_rare_token(tmp_path):
    p = resolve_prompts(
        identifier="sks",
        class_noun="dog",
        instance_prompt=None,
        instance_prompt_template="a photo of {identifier} {class_noun}",
        class_prompt=None,
        with_prior_preservation=True,
    )
    # the class prompt defaults to the paper's "a [class noun]", whatever the template
    assert (p.instance_prompt, p.class_prompt) == ("a photo of sks dog", "a dog")
    tokenizer = build_clip_tokenizer(tmp_path / "tok")
    kwargs = dict(
        identifier=None,
        class_noun="dog",
        instance_prompt=None,
        instance_prompt_template="a {identifier} {class_noun}",
        class_prompt=None,
        with_prior_preservation=False,
        tokenizer=tokenizer,
    )
    a, b = resolve_prompts(seed=1, **kwargs), resolve_prompts(seed=1, **kwargs)
    assert a.identifier == b.identifier and a.instance_prompt == f"a {a.identifier} dog"
    assert a.class_prompt is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(instance_prompt="a photo of a dog"), "not a whole word"),
        (dict(class_noun=None), "prior preservation needs a class"),
        (dict(instance_prompt_template="a photo of a dog"), "has no {identifier}"),
    ],
)
def test_prompt_errors(kwargs, match):
    base = dict(
        identifier="sks",
        class_noun="dog",
        instance_prompt=None,
        instance_prompt_template="a photo of {identifier} {class_noun}",
        class_prompt=None,
        with_prior_preservation=True,
    )
    with pytest.raises(UserError, match=match):
        resolve_prompts(**{**base, **kwargs})


def test_class_image_plan_resumes_without_overwriting(tmp_path):
    assert plan_class_images(tmp_path / "none", 3) == [0, 1, 2]
    Image.new("RGB", (4, 4)).save(tmp_path / "users_own.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / class_image_name(1))
    # 2 of 5 exist: 3 more, skipping the taken name class_00001.png.
    assert plan_class_images(tmp_path, 5) == [0, 2, 3]
    assert plan_class_images(tmp_path, 2) == []
