"""Optimizers: those that need optional packages, as Hydra `_partial_` targets, and the fused
Adam(W) step where the run allows it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from t2ilab.errors import UserError


def adamw_8bit(params, **kwargs):
    """bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~75% less optimizer memory).
    Use with method.module.optimizer._target_=t2ilab.optim.adamw_8bit."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            "8-bit AdamW needs bitsandbytes: pip install bitsandbytes (CUDA), or use the default "
            "optimizer (method.module.optimizer._target_=torch.optim.AdamW)"
        ) from None
    kwargs.pop("fused", None)  # a torch AdamW option (method.module.optimizer.fused)
    return bnb.optim.AdamW8bit(params, **kwargs)


def fused_where_possible(factory: Callable, precision_plugin: Any = None) -> Callable:
    """`factory` (a Hydra partial) with `fused=True` added for torch's Adam and AdamW when the
    run's precision lets the fused kernel take the step; as it was otherwise, or when the config
    sets `fused` itself (+method.module.optimizer.fused=false turns it off).

    The fused kernel updates every parameter in one call: 3.5x faster than torch's CPU default
    (the per-tensor loop) on an 18M-parameter UNet, ~7% of a whole step (experiments/benchmarks),
    and the fastest on CUDA. It is kept off where a gradient scaler (16-mixed) must unscale the
    gradients before clipping, and under FSDP and DeepSpeed, whose precision plugins and
    optimizers are their own."""
    func = getattr(factory, "func", None)
    keywords = getattr(factory, "keywords", {})
    if func not in (torch.optim.Adam, torch.optim.AdamW) or "fused" in keywords:
        return factory
    if precision_plugin is not None and not fused_step_allowed(precision_plugin):
        return factory
    return functools.partial(factory, fused=True)


def fused_step_allowed(precision_plugin: Any) -> bool:
    """Plain, half-true and bf16-mixed precision: nothing scales the gradients."""
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

    if isinstance(precision_plugin, MixedPrecision):
        return precision_plugin.scaler is None
    return type(precision_plugin) in (Precision, HalfPrecision)
