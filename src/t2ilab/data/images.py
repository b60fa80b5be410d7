"""Reading and preparing training images: every user image goes through `load_rgb` (or, for a
header, `opened_image`), which turns any way a file can fail into one UserError naming the file.

What a user's image becomes (8-bit RGB, upright):
- EXIF orientation is applied (phones store portraits sideways with a rotate tag);
- transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour) is composited on
  white: the RGB under a transparent pixel is often black or leftover garbage, and white is the
  background most cut-out product and subject photos are shown on;
- 16-bit grey (PNG/TIFF mode I;16, I) is scaled 0..65535 -> 0..255 and 32-bit float (TIFF mode F)
  0..1 -> 0..255 (PIL's convert("RGB") clips them instead: a 16-bit image comes out white);
  float pixels outside 0..1 (no convention says what they mean) are an error;
- CMYK, grey, bilevel and palette images are converted by PIL.

Folder scans are not recursive (a link loop cannot hang them) and skip hidden files (.DS_Store,
macOS's ._x.png) and non-image files (README.txt, x.json). Written with PIL + torch rather than
torchvision, which this project keeps optional.
"""

from __future__ import annotations

import errno
import math
import os
import random
import re
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from t2ilab.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
# PIL's own DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS), about 13000 x 13000:
# larger images are refused with one line; smaller ones load without PIL's warning.
MAX_PIXELS = 2 * 89_478_485
# An image's short side must be at least 1/8 of the training resolution (64 px at 512): below
# that, resizing blows every pixel up more than 8x and the image only teaches blur.
MIN_SIDE_FRACTION = 8
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Everything PIL (and the OS under it) raises for a file it cannot read or decode.
_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def _is_listed_image(path: Path) -> bool:
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    # A broken link named like an image is listed, so reading it names the problem instead of
    # the image silently missing from training.
    return path.is_file() or (path.is_symlink() and not path.exists())


def list_images(folder: str | Path) -> list[Path]:
    """The images directly in `folder`, sorted (see the module docstring for what is skipped)."""
    folder = Path(folder).expanduser()
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise UserError(
            f"{folder} cannot be listed ({err.strerror or err.__class__.__name__}): "
            "make it a readable folder (chmod a+rx) or point the setting elsewhere"
        ) from None
    return sorted(p for p in entries if _is_listed_image(p))


def _reason(path: Path, err: BaseException) -> tuple[str, str]:
    """(why, fix) for an image that cannot be read."""
    if getattr(err, "errno", None) == errno.ELOOP:
        return "a symbolic link loop", "fix the link or remove it"
    if path.is_symlink() and not path.exists():
        return f"a broken link to {os.readlink(path)}", "fix the link or remove it"
    if isinstance(err, PermissionError):
        return "permission denied", "make it readable (chmod a+r) or remove it from the folder"
    if isinstance(err, IsADirectoryError):
        return "it is a folder", "rename or move it"
    if isinstance(err, FileNotFoundError):
        return "it no longer exists", "put it back or remove it from the list"
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty, 0 bytes", "re-export it as PNG/JPEG or remove it from the folder"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    why = err.__class__.__name__
    if detail and str(path) not in detail and path.name not in detail:
        why = f"{why}: {detail[:120]}"
    return why, "re-export it as PNG/JPEG or remove it from the folder"


def _unreadable(path: Path, err: BaseException) -> UserError:
    if isinstance(err, Image.DecompressionBombError):
        count = re.search(r"\((\d+) pixels\)", str(err))
        return UserError(
            f"{path} is too large to read: {count[1] + ' pixels, ' if count else ''}more than "
            f"{MAX_PIXELS} (PIL refuses it as a possible decompression bomb): downscale it, "
            "e.g. to 4096 px on the long side"
        )
    why, fix = _reason(path, err)
    return UserError(f"{path} cannot be read as an image ({why}): {fix}")


def _check_pixel_count(path: Path, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UserError(
            f"{path} is too large to read: {width}x{height} pixels, more than {MAX_PIXELS}: "
            "downscale it, e.g. to 4096 px on the long side"
        )


@contextmanager
def opened_image(path: str | Path) -> Iterator[Image.Image]:
    """`Image.open` for the project: the lazily opened image, size-checked; every failure of the
    PIL work done on it inside the block (missing file, broken link, no permission, not an
    image, truncated, too large, unsupported mode) becomes one UserError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Sizes up to MAX_PIXELS are accepted, so PIL's bomb warning would only alarm.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixel_count(path, image)
                yield image
    except UserError:
        raise
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None


def _grey_to_8bit(path: Path, image: Image.Image, full_scale: float) -> Image.Image:
    """A 16-bit or float grey image as 8-bit L, 0..full_scale mapped to 0..255."""
    values = np.asarray(image, dtype=np.float32)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > full_scale:
        raise UserError(
            f"{path} has {image.mode} pixels from {lo:g} to {hi:g}, outside 0..{full_scale:g}, "
            "so their brightness is unknown: save it as an 8- or 16-bit PNG"
        )
    scaled = np.round(values * np.float32(255.0 / full_scale)).astype(np.uint8)
    return Image.fromarray(scaled, "L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb8(image: Image.Image, path: str | Path = "image") -> Image.Image:
    """8-bit RGB as the module docstring describes (`path` only names the file in errors)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        image = _grey_to_8bit(Path(path), image, 65535.0)
    elif image.mode == "F":
        image = _grey_to_8bit(Path(path), image, 1.0)
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        return _on_white(image)
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) in 8-bit RGB; UserError if unreadable."""
    with opened_image(path) as image:
        return to_rgb8(ImageOps.exif_transpose(image), path)


def min_image_side(resolution: int) -> int:
    return max(1, math.ceil(int(resolution) / MIN_SIDE_FRACTION))


def check_image_size(path: str | Path, size: tuple[int, int], resolution: int | None) -> None:
    """A UserError when an image is too small to mean anything at `resolution` (None: no rule)."""
    if resolution is None:
        return
    width, height = size
    need = min_image_side(resolution)
    if min(width, height) < need:
        raise UserError(
            f"{path} is {width}x{height} pixels, too small to train on at resolution "
            f"{resolution} (the short side needs {need} px, 1/{MIN_SIDE_FRACTION} of it): "
            "replace it with a larger version or remove it from the folder"
        )


def check_images(paths: Sequence[str | Path], resolution: int | None = None) -> None:
    """Decode every image once, as training will, and check its size (see check_image_size)."""
    for path in paths:
        check_image_size(path, load_rgb(path).size, resolution)


def check_image_folder(
    folder: str | Path | None, key: str, resolution: int | None = None
) -> list[Path]:
    """The images of a user folder, every one fully decoded once; a clear error otherwise."""
    if not folder:
        raise UserError(f"{key} is not set: set {key}=PATH to a folder of subject images")
    path = Path(folder).expanduser()
    if path.is_file():
        raise UserError(f"{key}={folder} is a file, not a folder: set {key}=PATH to a folder")
    if not path.is_dir():
        raise UserError(f"{key}={folder} does not exist: set {key}=PATH to a folder of images")
    images = list_images(path)
    if not images:
        raise UserError(
            f"{key}={folder} has no images: add .jpg/.png/.webp files of the subject to it"
        )
    check_images(images, resolution)
    return images


class ImageTransform:
    """Resize the short side to `resolution`, crop a square (center or random), optionally flip,
    and map to a float tensor in [-1, 1] (what the SD VAE expects)."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    @property
    def is_deterministic(self) -> bool:
        return self.center_crop and not self.random_flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        size = self.resolution
        scale = size / min(image.size)
        new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (image.width - size) // 2, (image.height - size) // 2
        else:
            left, top = rng.randint(0, image.width - size), rng.randint(0, image.height - size)
        image = image.crop((left, top, left + size, top + size))
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
