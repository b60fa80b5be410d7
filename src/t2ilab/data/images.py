"""Reading and preparing training images: jpg/png/webp, EXIF orientation, RGB, resize, crop, flip.

Written with PIL + torch rather than torchvision, which this project keeps optional.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from t2ilab.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) and in RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def check_image_folder(folder: str | Path | None, key: str) -> list[Path]:
    """The images of a user folder, every one fully decoded once; a clear error otherwise."""
    if not folder:
        raise UserError(f"{key} is not set: set {key}=PATH to a folder of subject images")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={folder} does not exist: set {key}=PATH to a folder of images")
    images = list_images(path)
    if not images:
        raise UserError(
            f"{key}={folder} has no images: add .jpg/.png/.webp files of the subject to it"
        )
    for image_path in images:
        try:
            with Image.open(image_path) as image:
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise UserError(
                f"{image_path} cannot be read as an image ({err.__class__.__name__}): "
                "re-export it as PNG/JPEG or remove it from the folder"
            ) from None
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
