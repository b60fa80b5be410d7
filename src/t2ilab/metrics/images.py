"""Image conversions shared by the embedders, the diversity metric and FID.

The metrics take images either as a list of PIL images or as a float tensor in [0, 1] of shape
(N, 3, H, W); these helpers move between the two and read reference folders from disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from t2ilab.data.images import list_images
from t2ilab.data.images import load_rgb as open_rgb

Images = Sequence[Image.Image] | Tensor


def num_images(images: Images) -> int:
    return int(images.shape[0]) if isinstance(images, Tensor) else len(images)


def check_image_tensor(images: Tensor) -> Tensor:
    """Validate an (N, 3, H, W) batch and return it as float in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1] or uint8, got dtype {images.dtype}")
    # small overshoots come from VAE decoding; clamp rather than reject them
    return images.float().clamp(0.0, 1.0)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> float (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(image: Tensor) -> Image.Image:
    """Float (3, H, W) in [0, 1] -> PIL RGB image (rounded to 8 bits, as when saved to PNG)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    # (H, W, 3) uint8 is read as RGB; the `mode=` argument is deprecated in Pillow 11+
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def to_pil_list(images: Images) -> list[Image.Image]:
    if isinstance(images, Tensor):
        return [tensor_to_pil(img) for img in check_image_tensor(images)]
    return [img.convert("RGB") for img in images]


def to_image_tensor(images: Images) -> Tensor:
    """Stack images into a float (N, 3, H, W) tensor in [0, 1]; PIL images must share one size."""
    if isinstance(images, Tensor):
        return check_image_tensor(images)
    if len(images) == 0:
        raise ValueError("got an empty list of images")
    sizes = {img.size for img in images}
    if len(sizes) != 1:
        raise ValueError(
            f"images have different sizes {sorted(sizes)}; resize them to one size first"
        )
    return torch.stack([pil_to_tensor(img) for img in images])


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic) and crop the centre square, keeping aspect."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_image_files(path: str | Path) -> list[Path]:
    """Sorted jpg/png/webp files directly inside a folder (not recursive)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"image folder '{path}' does not exist or is not a folder")
    return list_images(folder)


def load_image_folder(path: str | Path, size: int | None = None) -> Tensor:
    """Read every jpg/png/webp image in a folder as a float (N, 3, size, size) tensor in [0, 1].

    With `size`, each image is resized (shorter side) and centre-cropped to a square; without it,
    all images must already share one size.
    """
    files = list_image_files(path)
    if not files:
        raise ValueError(f"image folder '{path}' contains no jpg/png/webp images")
    pil_images = [open_rgb(f) for f in files]
    if size is not None:
        pil_images = [resize_center_crop(img, size) for img in pil_images]
    elif len({img.size for img in pil_images}) != 1:
        raise ValueError(f"images in '{path}' have different sizes; pass size= to resize them")
    return torch.stack([pil_to_tensor(img) for img in pil_images])
