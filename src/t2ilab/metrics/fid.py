"""FID and KID between a reference image set and generated images, via torchmetrics.

`feature` is either an int (torchmetrics' Inception features; needs torch-fidelity, the `gpu` extra)
or any `nn.Module` mapping float images in [0, 1] of shape (N, 3, H, W) to (N, D) features, which
runs on CPU without torchvision. FID is biased and noisy on the few dozen images of a DreamBooth
run; KID is unbiased on small sets, so both are reported.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from t2ilab.metrics.images import (
    Images,
    check_image_tensor,
    list_image_files,
    load_image_folder,
    resize_center_crop,
    to_image_tensor,
    to_pil_list,
)

__all__ = ["fid_kid", "fid_kid_from_folder", "load_image_folder"]

Feature = int | nn.Module


def _check_set(images: Tensor, name: str) -> Tensor:
    images = check_image_tensor(images)
    if images.shape[0] < 2:
        raise ValueError(f"{name} has {images.shape[0]} image(s); FID/KID need at least 2")
    return images


def _build_metrics(feature: Feature, subsets: int, subset_size: int) -> tuple[nn.Module, nn.Module]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    # normalize=True: we always feed float [0, 1]. torchmetrics turns that into the uint8 that its
    # Inception expects, and passes it unchanged to a custom module.
    try:
        with warnings.catch_warnings():
            # KID warns that it keeps all features in memory; a few hundred images is nothing
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            fid = FrechetInceptionDistance(feature=feature, normalize=True)
            kid = KernelInceptionDistance(
                feature=feature, subsets=subsets, subset_size=subset_size, normalize=True
            )
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "FID/KID with Inception features need torch-fidelity (pip install 't2ilab[gpu]'); "
            "on CPU pass an nn.Module feature extractor instead"
        ) from None
    return fid, kid


@torch.no_grad()
def fid_kid(
    real: Tensor,
    fake: Tensor,
    feature: Feature = 2048,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    seed: int = 0,
    real_name: str = "reference image set",
    fake_name: str = "generated image set",
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) of `fake` against `real`, float (N, 3, H, W) in [0, 1].

    Returns {"fid", "kid", "kid_std"}. KID's subset size is clamped to the smaller set, since
    torchmetrics refuses a subset larger than the number of images.
    """
    real, fake = _check_set(real, real_name), _check_set(fake, fake_name)
    subset_size = min(kid_subset_size, real.shape[0], fake.shape[0])
    fid, kid = _build_metrics(feature, kid_subsets, subset_size)
    fid, kid = fid.to(device), kid.to(device)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    # KID draws its subsets with the global RNG; fork it so results are reproducible and the
    # caller's RNG stream (e.g. the training run's) is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid_from_folder(
    reference_dir: str | Path,
    generated: Images,
    size: int = 299,
    feature: Feature = 2048,
    **kwargs: Any,
) -> dict[str, float]:
    """FID/KID of generated images against every jpg/png/webp image in `reference_dir`.

    Both sets get the same resize + centre crop to `size` (299 is Inception's input size), since
    FID is sensitive to the resampling filter and real and fake must be treated alike.
    """
    n_files = len(list_image_files(reference_dir))
    if n_files < 2:
        raise ValueError(
            f"reference folder '{reference_dir}' has {n_files} jpg/png/webp image(s); "
            "FID/KID need at least 2"
        )
    real = load_image_folder(reference_dir, size=size)
    pil = to_pil_list(generated)
    # an empty list cannot be stacked; an empty tensor lets fid_kid report the count
    fake = to_image_tensor([resize_center_crop(img, size) for img in pil]) if pil else real[:0]
    return fid_kid(
        real, fake, feature=feature, real_name=f"reference folder '{reference_dir}'", **kwargs
    )
