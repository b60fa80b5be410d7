"""What real users' images look like, on every data path: odd colour modes are read correctly,
everything that cannot be trained on is one UserError naming the file, before weights load."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import FAST
from PIL import Image

import t2ilab.train as train_module
from t2ilab.data import captioning
from t2ilab.data.buckets import BucketedCaptionDataset, bucket_table, image_size
from t2ilab.data.captioned import CaptionedDataModule, CaptionedDataset
from t2ilab.data.class_folder import ClassFolderDataModule, ClassFolderDataset
from t2ilab.data.dreambooth import DreamBoothDataModule, DreamBoothDataset
from t2ilab.data.images import ImageTransform, list_images, load_rgb, opened_image
from t2ilab.data.pixart_captions import PixArtCaptionDataModule
from t2ilab.errors import UserError
from t2ilab.models.clip_tokenizer import build_clip_tokenizer

RESOLUTION = 64  # the tiny models' resolution: images need a short side of 64 / 8 = 8 px


# --- making odd files --------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` RGB pixels but holds almost none: what PIL's
    decompression-bomb check sees, in a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _truncated(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _float_tiff(path: Path, value: float) -> Path:
    return _save(Image.fromarray(np.full((16, 16), value, np.float32)), path)


def _two_tone_rotated(path: Path) -> Path:
    """Stored landscape, left red | right blue, with EXIF "rotate 90 CW": upright it is a
    portrait, red on top, blue at the bottom."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, path, exif=exif, quality=95)


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    image.paste(0, (0, 0, 8, 16))  # left half index 0
    if transparent:
        image.info["transparency"] = 0
    return image


# --- every colour mode, read correctly ---------------------------------------------------------

# name -> (write it into a folder, expected RGB at the left and at the right of the image)
MODES = {
    "grey L": (lambda d: _save(Image.new("L", (16, 16), 100), d / "x.png"), (100,) * 3, (100,) * 3),
    "bilevel 1": (
        lambda d: _save(Image.new("1", (16, 16), 1), d / "x.png"),
        (255,) * 3,
        (255,) * 3,
    ),
    "LA on white": (
        lambda d: _save(Image.new("LA", (16, 16), (0, 0)), d / "x.png"),
        (255,) * 3,
        (255,) * 3,
    ),
    "palette": (lambda d: _save(_palette(False), d / "x.png"), (0, 0, 0), (255, 0, 0)),
    "palette with transparency": (
        lambda d: _save(_palette(True), d / "x.png", transparency=0),
        (255, 255, 255),
        (255, 0, 0),
    ),
    "RGBA transparent on white": (
        lambda d: _save(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), d / "x.png"),
        (255,) * 3,
        (255,) * 3,
    ),
    "RGBA half transparent": (
        lambda d: _save(Image.new("RGBA", (16, 16), (0, 0, 0, 128)), d / "x.png"),
        (127,) * 3,
        (127,) * 3,
    ),
    "grey with a transparent colour": (
        lambda d: _save(Image.new("L", (16, 16), 0), d / "x.png", transparency=0),
        (255,) * 3,
        (255,) * 3,
    ),
    "CMYK JPEG": (
        lambda d: _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), d / "x.jpg", quality=95),
        (255, 0, 0),
        (255, 0, 0),
    ),
    "16-bit PNG": (
        lambda d: _save(Image.fromarray(np.full((16, 16), 32768, np.uint16)), d / "x.png"),
        (128,) * 3,
        (128,) * 3,
    ),
    "16-bit TIFF": (
        lambda d: _save(Image.fromarray(np.full((16, 16), 49344, np.uint16)), d / "x.tif"),
        (192,) * 3,
        (192,) * 3,
    ),
    "32-bit int TIFF (mode I)": (
        lambda d: _save(Image.fromarray(np.full((16, 16), 16448, np.int32)), d / "x.tif"),
        (64,) * 3,
        (64,) * 3,
    ),
    "float TIFF (mode F)": (lambda d: _float_tiff(d / "x.tif", 0.25), (64,) * 3, (64,) * 3),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_colour_modes_are_read_as_what_a_viewer_shows(tmp_path, mode):
    write, left, right = MODES[mode]
    image = load_rgb(write(tmp_path))
    assert image.mode == "RGB" and image.size == (16, 16)
    assert np.abs(np.subtract(image.getpixel((2, 8)), left)).max() <= 2
    assert np.abs(np.subtract(image.getpixel((13, 8)), right)).max() <= 2


def test_sixteen_bit_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    pixels = np.asarray(load_rgb(_save(Image.fromarray(ramp), tmp_path / "ramp.png")))[0, :, 0]
    assert pixels[0] == 0 and pixels[-1] == 255 and len(np.unique(pixels)) == 256


def test_exif_rotated_sixteen_bit_png_is_upright(tmp_path):
    array = np.zeros((20, 40), np.uint16)
    array[:, :20] = 32768  # stored: left mid grey, right black
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_rgb(_save(Image.fromarray(array), tmp_path / "x.png", exif=exif))
    assert image.size == (20, 40)
    assert image.getpixel((10, 2)) == (128, 128, 128) and image.getpixel((10, 37)) == (0, 0, 0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def _dreambooth_pixels(path, tokenizer):
    dataset = DreamBoothDataset([path], "a sks toy", tokenizer, ImageTransform(16))
    return dataset[0]["instance"]["pixel_values"]


def _captioned_pixels(path, tokenizer):
    return CaptionedDataset([(path, "a toy")], tokenizer, ImageTransform(16))[0]["pixel_values"]


def _bucketed_pixels(path, tokenizer):
    dataset = BucketedCaptionDataset([(path, "a toy")], bucket_table(64, 16), lambda c: {})
    return dataset[0]["pixel_values"]


def _class_folder_pixels(path, tokenizer):
    return ClassFolderDataset([(path, 0)], ImageTransform(16))[0]["pixel_values"]


LOADERS = {
    "dreambooth": _dreambooth_pixels,
    "captioned": _captioned_pixels,
    "buckets": _bucketed_pixels,
    "class folder": _class_folder_pixels,
}
# name -> (write it, expected [-1, 1] RGB at the top and at the bottom of the training crop)
WHITE, MID_GREY, RED, BLUE = (1, 1, 1), (0.0039,) * 3, (1, -1, -1), (-1, -1, 1)
DATA_PATH_CASES = {
    "RGBA transparent": (MODES["RGBA transparent on white"][0], WHITE, WHITE),
    "palette transparent": (
        lambda d: _save(Image.new("P", (16, 16), 0), d / "x.png", transparency=0),
        WHITE,
        WHITE,
    ),
    "16-bit PNG": (MODES["16-bit PNG"][0], MID_GREY, MID_GREY),
    "float TIFF": (lambda d: _float_tiff(d / "x.tif", 32768 / 65535), MID_GREY, MID_GREY),
    "EXIF rotated": (lambda d: _two_tone_rotated(d / "x.jpg"), RED, BLUE),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("case", list(DATA_PATH_CASES))
def test_every_dataset_reads_odd_images_correctly(tmp_path, tokenizer, loader, case):
    write, top, bottom = DATA_PATH_CASES[case]
    pixels = LOADERS[loader](write(tmp_path), tokenizer)  # (3, H, W) in [-1, 1]
    if loader == "buckets" and case == "EXIF rotated":
        assert pixels.shape[1] > pixels.shape[2]  # a portrait bucket for the upright portrait
    top_row, bottom_row = pixels[:, 1].mean(dim=1), pixels[:, -2].mean(dim=1)  # mean RGB
    assert torch.allclose(top_row, torch.tensor(top, dtype=torch.float32), atol=0.05)
    assert torch.allclose(bottom_row, torch.tensor(bottom, dtype=torch.float32), atol=0.05)


# --- large images ------------------------------------------------------------------------------


def test_100_megapixel_header_opens_without_pils_bomb_warning(tmp_path):
    path = _png_header(tmp_path / "gfx100.png", 10000, 10000)  # above PIL's warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opened_image(path) as image:
            assert image.size == (10000, 10000)
        assert image_size(path) == (10000, 10000)


# --- unreadable and unusable files, on every data path ----------------------------------------

# name -> (write the bad entry into a folder, what the error says)
BAD = {
    "truncated": (lambda d: _truncated(d / "bad.png"), r"bad.png cannot be read as an image"),
    "not an image": (
        lambda d: (d / "bad.png").write_text("<html>404</html>"),
        r"bad.png cannot be read as an image \(UnidentifiedImageError\): re-export it",
    ),
    "zero bytes": (
        lambda d: (d / "bad.png").write_bytes(b""),
        r"bad.png cannot be read as an image \(the file is empty, 0 bytes\)",
    ),
    "broken link": (
        lambda d: os.symlink(d / "gone.png", d / "bad.png"),
        r"bad.png cannot be read as an image \(a broken link to .*gone.png\): fix the link",
    ),
    "link loop": (
        lambda d: os.symlink("bad.png", d / "bad.png"),
        r"bad.png cannot be read as an image \(a symbolic link loop\): fix the link",
    ),
    "1x1": (
        lambda d: _save(Image.new("RGB", (1, 1)), d / "bad.png"),
        r"bad.png is 1x1 pixels, too small to train on at resolution 64 \(the short side needs "
        r"8 px, 1/8 of it\): replace it with a larger version or remove it",
    ),
    "below 1/8 of the resolution": (
        lambda d: _save(Image.new("RGB", (300, 7)), d / "bad.png"),
        r"bad.png is 300x7 pixels, too small",
    ),
    "decompression bomb": (
        lambda d: _png_header(d / "bad.png", 30000, 30000),
        r"bad.png is too large to read: 900000000 pixels, more than 178956970 .*: downscale it",
    ),
    "float outside 0..1": (
        lambda d: _float_tiff(d / "bad.tif", 200.0),
        r"bad.tif has F pixels from 200 to 200, outside 0..1.*: save it as an 8- or 16-bit PNG",
    ),
}
# Cases a header cannot reveal (the captioning CLI and bucketing only open headers; the CLI then
# stops at the image, with the same one line, when it decodes it) or that depend on resolution.
DECODE_ONLY = {"truncated", "1x1", "below 1/8 of the resolution", "float outside 0..1"}


def _good_folder(folder: Path) -> Path:
    _save(Image.new("RGB", (64, 48), (200, 30, 30)), folder / "good.png")
    return folder


def _image_entries(folder: Path) -> list[Path]:
    """What a user would call the folder's images (written here without the code under test)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".png", ".tif")
        and not p.name.startswith(".")
        and (p.is_file() or p.is_symlink())
    )


def _check_instance_dir(folder: Path) -> None:
    DreamBoothDataModule(
        instance_dir=str(folder),
        class_noun="toy",
        with_prior_preservation=False,
        resolution=RESOLUTION,
    ).check()


def _check_class_dir(folder: Path) -> None:
    instance = _good_folder(folder.parent / "instance")
    DreamBoothDataModule(
        instance_dir=str(instance),
        class_dir=str(folder),
        class_noun="toy",
        with_prior_preservation=True,
        num_class_images=10,
        resolution=RESOLUTION,
    ).check()


def _check_sidecar(folder: Path) -> None:
    for image in _image_entries(folder):
        image.with_suffix(".txt").write_text(f"a photo of {image.stem}")
    CaptionedDataModule(str(folder), resolution=RESOLUTION).check()


def _check_metadata(folder: Path) -> None:
    rows = [{"file_name": p.name, "text": f"a photo of {p.stem}"} for p in _image_entries(folder)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    PixArtCaptionDataModule(str(folder), resolution=RESOLUTION, multi_aspect=True).check()


def _check_class_folder(folder: Path) -> None:
    ClassFolderDataModule(str(folder.parent), resolution=RESOLUTION).check()


def _check_bucket_sizes(folder: Path) -> None:
    for path in list_images(folder):
        image_size(path)


class _ModelWouldLoad(Exception):
    pass


def _check_captioning_cli(folder: Path) -> None:
    """The captioning CLI up to the model load (which the test replaces with an exception)."""

    def model_would_load(*args, **kwargs):
        raise _ModelWouldLoad

    original = captioning.load_captioner
    captioning.load_captioner = model_would_load
    try:
        captioning.caption_folder(folder)
    except _ModelWouldLoad:
        pass
    finally:
        captioning.load_captioner = original


PATHS = {
    "instance_dir": _check_instance_dir,
    "class_dir": _check_class_dir,
    "captioned x.txt": _check_sidecar,
    "captioned metadata.jsonl (pixart)": _check_metadata,
    "class folders": _check_class_folder,
    "bucket sizes": _check_bucket_sizes,
    "captioning CLI": _check_captioning_cli,
}
HEADER_ONLY = {"bucket sizes", "captioning CLI"}


def _user_folder(tmp_path: Path, path: str) -> Path:
    # Class folders: the images sit in a class sub-folder of data.train_dir.
    folder = tmp_path / "data" / ("cls" if path == "class folders" else "")
    folder.mkdir(parents=True, exist_ok=True)
    return _good_folder(folder)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_is_one_line_naming_the_file(tmp_path, path, case):
    if path in HEADER_ONLY and case in DECODE_ONLY:
        pytest.skip("only decoding (or a resolution) reveals it; the decoding paths test it")
    folder = _user_folder(tmp_path, path)
    write, match = BAD[case]
    write(folder)
    with pytest.raises(UserError, match=match) as err:
        PATHS[path](folder)
    assert "\n" not in str(err.value)


# What a user's folder also holds that is not an image to train on: ignored, never an error.
CLUTTER = {
    ".DS_Store": lambda d: (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1"),  # macOS Finder
    "._good.png": lambda d: (d / "._good.png").write_bytes(b"\0\5\26\7"),  # macOS AppleDouble
    ".good.png.swp": lambda d: (d / ".good.png.swp").write_bytes(b"swap"),  # an editor's temp
    "x.json": lambda d: (d / "x.json").write_text("{}"),
    "folder named x.png": lambda d: (d / "x.png").mkdir(),
    "folder link loop": lambda d: os.symlink(".", d / "loop"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_hidden_and_non_image_files_are_ignored(tmp_path, path):
    folder = _user_folder(tmp_path, path)
    for write in CLUTTER.values():
        write(folder)
    PATHS[path](folder)  # no error
    assert list_images(folder) == [folder / "good.png"]


def test_readme_is_ignored_in_an_instance_folder(tmp_path):
    folder = _good_folder(tmp_path / "subject")
    (folder / "README.txt").write_text("photos of my dog")
    _check_instance_dir(folder)
    assert list_images(folder) == [folder / "good.png"]


def test_class_folders_skip_what_zip_tools_and_oses_leave(tmp_path):
    root = tmp_path / "classes"
    _good_folder(root / "cat")
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._good.png").write_bytes(b"\0\5\26\7")
    (root / ".Trash").mkdir()
    (root / ".DS_Store").write_bytes(b"\0")
    dm = ClassFolderDataModule(str(root), resolution=RESOLUTION)
    dm.check()
    assert dm.classes == ["cat"] and [p.name for p, _ in dm.items] == ["good.png"]


def test_a_large_photo_passes_the_folder_check_without_a_warning(tmp_path):
    folder = tmp_path / "subject"
    photo = _save(Image.new("RGB", (6000, 4000), (10, 20, 30)), folder / "photo.jpg", quality=80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_instance_dir(folder)
        assert load_rgb(photo).size == (6000, 4000)


# --- permission denied -------------------------------------------------------------------------


def _as_another_user(action) -> str:
    """The UserError message of `action()` run without root's power to read any file: in a
    forked child that drops to the `nobody` user when the tests run as root (a plain chmod 000
    stops everyone else), so the OS really refuses the read."""
    if os.geteuid() != 0:
        try:
            action()
        except UserError as err:
            return str(err)
        return "no error"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, run, report, exit without pytest's cleanup
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            action()
            message = "no error"
        except UserError as err:
            message = str(err)
        except BaseException as err:  # noqa: BLE001 - reported to the parent as the result
            message = f"child failed: {err!r}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared_folder():
    """A folder the `nobody` user can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="t2ilab-perm-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def test_unreadable_image_is_named(shared_folder):
    folder = _good_folder(shared_folder / "subject")
    folder.chmod(0o755)
    secret = _save(Image.new("RGB", (64, 64)), folder / "secret.png")
    (folder / "good.png").chmod(0o644)
    secret.chmod(0o000)
    load_rgb(folder / "good.png")  # PIL's plugins load here, while the files are readable
    message = _as_another_user(lambda: _check_instance_dir(folder))
    assert message == (
        f"{secret} cannot be read as an image (permission denied): make it readable "
        "(chmod a+r) or remove it from the folder"
    )


def test_unreadable_caption_is_named(shared_folder):
    folder = _good_folder(shared_folder / "captioned")
    folder.chmod(0o755)
    (folder / "good.png").chmod(0o644)
    caption = folder / "good.txt"
    caption.write_text("a red square")
    caption.chmod(0o000)
    message = _as_another_user(lambda: CaptionedDataModule(str(folder), resolution=16).check())
    assert message == (
        f"{caption} cannot be read (Permission denied): make it a readable text file (chmod a+r)"
    )


# --- through train.py: before any weights load -------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything reaches the tokenizer or the weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    for name in ("load_tokenizer", "load_components"):
        monkeypatch.setattr(train_module, name, forbidden)


TRAIN_PATHS = {
    "dreambooth instance_dir": (["experiment=dreambooth", *FAST], "data.instance_dir", "subject"),
    "dreambooth class_dir": (["experiment=dreambooth", *FAST], "data.class_dir", "class"),
    "captioned": (["experiment=lora_finetune", "logger=csv"], "data.train_dir", "captioned"),
    "pixart captions": (["experiment=pixart_stage2", "logger=csv"], "data.train_dir", "pixart"),
    "class folders": (["experiment=pixart_stage1", "logger=csv"], "data.train_dir", "classes"),
}


@pytest.mark.parametrize("path", list(TRAIN_PATHS))
def test_train_names_the_bad_image_before_loading_the_model(
    tmp_path_factory, make_cfg, no_model, path
):
    overrides, key, name = TRAIN_PATHS[path]
    data = tmp_path_factory.mktemp("data")  # apart from the run folder (make_cfg's tmp_path)
    folder = _good_folder(data / name / ("cat" if name == "classes" else ""))
    _save(Image.new("RGB", (3, 3)), folder / "tiny.png")
    if name in ("captioned", "pixart"):
        for image in ("good", "tiny"):
            (folder / f"{image}.txt").write_text(f"a photo of {image}")
    train_dir = folder.parent if name == "classes" else folder
    cfg = make_cfg(*overrides, f"{key}={train_dir}")
    with pytest.raises(UserError, match=r"tiny.png is 3x3 pixels, too small") as err:
        train_module.train(cfg)
    assert "\n" not in str(err.value)
