"""LPIPS as a pair distance for the `div` metric.

torchmetrics' LPIPS needs torchvision for its backbones (the `gpu` extra), and the backbone weights
are downloaded by torchvision on first use. Without it, pass any `PairDistance` to `div_score`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import Tensor


def lpips_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class LpipsDistance:
    """distance(a, b) -> (N,) LPIPS between float (N, 3, H, W) image batches in [0, 1]."""

    def __init__(
        self,
        net_type: Literal["alex", "vgg", "squeeze"] = "alex",
        device: str | torch.device = "cpu",
    ) -> None:
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "LPIPS for the `div` metric needs torchvision (pip install 't2ilab[gpu]')"
            ) from None
        self.device = torch.device(device)
        try:
            # normalize=True: inputs are in [0, 1] rather than LPIPS' native [-1, 1]
            metric = LearnedPerceptualImagePatchSimilarity(
                net_type=net_type, reduction="none", normalize=True
            )
        except ValueError:  # older torchmetrics without reduction="none"; div_score takes means
            metric = LearnedPerceptualImagePatchSimilarity(
                net_type=net_type, reduction="mean", normalize=True
            )
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "LPIPS for the `div` metric needs torchvision (pip install 't2ilab[gpu]')"
            ) from None
        self.metric = metric.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        # the metric accumulates state; reset so each call scores only its own batch
        self.metric.reset()
        self.metric.update(a.to(self.device), b.to(self.device))
        out = self.metric.compute().float().reshape(-1).cpu()
        self.metric.reset()
        return out
