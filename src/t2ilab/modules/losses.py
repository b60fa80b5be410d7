"""Reducing per-sample diffusion losses to the objective, with prior preservation."""

from __future__ import annotations

import torch


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32 whatever the autocast dtype."""
    error = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    return error.mean(dim=tuple(range(1, error.ndim)))


def prior_preservation_loss(
    per_sample: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DreamBooth's objective: instance MSE + prior_loss_weight * prior MSE.

    `per_sample` and `weights` (e.g. Min-SNR weights) cover the whole batch, instance samples
    first. Each sample keeps its own weight: the instance half is never multiplied by the weights
    of the whole 2B batch (the shape bug of diffusers' train_dreambooth.py, issue #6481).
    """
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights {tuple(weights.shape)} != losses {tuple(per_sample.shape)}")
        per_sample = per_sample * weights
    instance = per_sample[:num_instance].mean()
    parts = {"instance_loss": instance}
    if per_sample.shape[0] == num_instance:
        return instance, parts
    prior = per_sample[num_instance:].mean()
    parts["prior_loss"] = prior
    return instance + prior_loss_weight * prior, parts
