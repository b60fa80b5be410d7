"""Optimizers that need optional packages, as Hydra `_partial_` targets."""

from __future__ import annotations

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
    return bnb.optim.AdamW8bit(params, **kwargs)
