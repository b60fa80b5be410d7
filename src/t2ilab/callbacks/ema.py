"""EMA of the trainable weights (diffusers' EMAModel), used for samples, evaluation and export.

The module keeps training on its raw weights, and checkpoints hold those raw weights plus the
EMA state (this callback's state_dict), so a resumed run continues both. Everything that looks
at the model from outside training (sample grids, the evaluation protocol, the export) enters
`module.for_inference()`, which swaps the EMA weights in and the raw ones back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from diffusers.training_utils import EMAModel


class EMACallback(L.Callback):
    """Updates the EMA after every optimizer step (not every micro-batch) with diffusers'
    decay schedule: min(decay, (1 + n) / (10 + n)), or with warmup
    1 - (1 + n / inv_gamma) ** -power, n counting updates after `update_after_step`."""

    def __init__(
        self,
        decay: float = 0.9999,
        update_after_step: int = 0,
        warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.kwargs = dict(
            decay=decay,
            update_after_step=update_after_step,
            use_ema_warmup=warmup,
            inv_gamma=inv_gamma,
            power=power,
        )
        self.ema: EMAModel | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.ema is None:
            self.ema = EMAModel(pl_module.trainable_parameters(), **self.kwargs)
            pl_module.ema_callback = self

    def _load_pending(self, pl_module) -> bool:
        """Resumed: the checkpoint's EMA replaces the copy `setup` made."""
        if self._pending_state is None:
            return False
        self.ema.load_state_dict(self._pending_state)
        self._pending_state = None
        self.ema.to(device=pl_module.device)
        return True

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._load_pending(pl_module) and trainer.global_step > 0:
            # Resumed from a checkpoint without EMA: start from the restored weights, not those
            # `setup` copied before the restore (a fresh run's are the same: no second copy).
            # diffusers' first updates take the weights whole, so only what samples the EMA
            # before the first step would see the difference.
            self.ema = EMAModel(pl_module.trainable_parameters(), **self.kwargs)
        self.ema.to(device=pl_module.device)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last_step:  # an optimizer step happened
            self.ema.step(pl_module.trainable_parameters())
            self._last_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict

    @contextmanager
    def swapped_in(self, pl_module) -> Iterator[None]:
        # A resume at trainer.max_steps (an export-only continuation) never starts training.
        self._load_pending(pl_module)
        params = pl_module.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)
