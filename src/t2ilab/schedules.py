"""Learning-rate schedules: diffusers' (`get_scheduler`'s names) plus warmup-stable-decay, as one
Hydra `_partial_` target (method.module.lr_scheduler).

warmup_stable_decay holds the rate constant after warm-up and decays it linearly to zero over
the last `num_decay_steps`: the long constant stretch is what a continued run resumes, and the
short decay at the end sharpens the weights (the toy stage-1 DiT: shape 0.69 -> 0.77 at
guidance 4 over a final 3000-step decay, experiments/toy_world/README.md).
"""

from __future__ import annotations

from typing import Any

from diffusers.optimization import get_scheduler as diffusers_scheduler
from torch.optim.lr_scheduler import LambdaLR

from t2ilab.errors import UserError

WARMUP_STABLE_DECAY = "warmup_stable_decay"


def warmup_stable_decay(
    optimizer, num_warmup_steps: int, num_training_steps: int, num_decay_steps: int
) -> LambdaLR:
    """Rate factor: step / warmup during warm-up (diffusers' warm-up), then 1, then
    (num_training_steps - step) / num_decay_steps over the last num_decay_steps. A run shorter
    than warm-up + decay decays over every step after warm-up."""
    if num_decay_steps is None or int(num_decay_steps) < 1:
        raise UserError(
            f"lr_scheduler.name={WARMUP_STABLE_DECAY} needs num_decay_steps >= 1 (the steps of "
            f"the final decay), got {num_decay_steps}"
        )
    warmup = int(num_warmup_steps or 0)
    total = int(num_training_steps)
    decay = min(int(num_decay_steps), max(total - warmup, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, min(1.0, (total - step) / decay))

    return LambdaLR(optimizer, factor)


def get_scheduler(
    name: str,
    optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    num_decay_steps: int | None = None,
    **kwargs: Any,
) -> LambdaLR:
    """diffusers.optimization.get_scheduler, and `warmup_stable_decay` (num_decay_steps)."""
    if name == WARMUP_STABLE_DECAY:
        return warmup_stable_decay(optimizer, num_warmup_steps, num_training_steps, num_decay_steps)
    return diffusers_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        **kwargs,
    )
