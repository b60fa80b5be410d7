"""Cosine-similarity reductions over embedding matrices (rows are samples).

Inputs are L2-normalised here so callers can pass raw model features. Everything is computed in
float32 on the inputs' device and returned as 0-d tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit_rows(x: Tensor, name: str) -> Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty (N, D) matrix of embeddings, got {tuple(x.shape)}"
        )
    # float32 at least: fp16/bf16 features from autocast would lose precision in the dot products
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def _same_dim(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")


def mean_pairwise_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity over all (row of a, row of b) pairs."""
    a, b = _unit_rows(a, "a"), _unit_rows(b, "b")
    _same_dim(a, b)
    return (a @ b.T).mean()


def mean_pairwise_cosine_within(a: Tensor) -> Tensor:
    """Mean cosine similarity over all ordered pairs of distinct rows of a (diagonal excluded)."""
    a = _unit_rows(a, "a")
    n = a.shape[0]
    if n < 2:
        raise ValueError("need at least 2 embeddings to compare them with each other")
    sim = a @ a.T
    # the diagonal is 1 by construction and would bias the mean upwards
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def mean_matched_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity between row i of a and row i of b."""
    a, b = _unit_rows(a, "a"), _unit_rows(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"matched embeddings need equal shapes, got {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    return (a * b).sum(dim=-1).mean()
