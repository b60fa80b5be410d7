"""Reliability callbacks: stop on a non-finite loss with the last good weights saved, and keep
only the newest N step checkpoints so long runs do not fill the disk."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from t2ilab.errors import UserError

log = logging.getLogger(__name__)


def _as_float(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("loss")
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class NonFiniteLossStop(L.Callback):
    """Ends the run when the training loss becomes NaN or inf, before that step's update.

    The check runs in `on_before_optimizer_step` (after backward, before the optimizer applies
    the update, gradient clipping included), so the weights are still the last good ones: they
    are saved to `<dirpath>/nonfinite_step_XXXXXX.ckpt` and the run ends with a UserError, which
    train.py turns into one line on stderr, exit code 2 and results.json status "failed".
    `on_train_batch_end` checks the step's output too (micro-batches of gradient accumulation,
    manual optimisation).
    """

    def __init__(self, dirpath: str, monitor: str = "train/loss"):
        self.dirpath = Path(dirpath)
        self.monitor = monitor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._check(trainer, _as_float(trainer.callback_metrics.get(self.monitor)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer, _as_float(outputs))

    def _check(self, trainer, loss: float | None) -> None:
        if loss is None or math.isfinite(loss):
            return
        step = trainer.global_step
        path = self.dirpath / f"nonfinite_step_{step:06d}.ckpt"
        self._save(trainer, path)
        raise UserError(
            f"loss became {loss} at step {step}; saved the last good weights to {path}; "
            "lower method.lr or enable gradient clipping (trainer.gradient_clip_val)"
        )

    @staticmethod
    def _save(trainer, path: Path) -> None:
        # Lightning writes checkpoints atomically (an fsspec transaction): never a partial file.
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.error("non-finite loss: last good weights saved to %s", path)


class KeepLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the `keep_last` newest step checkpoints (plus last.ckpt with
    save_last=True): it ranks checkpoints by global step, newest best. `save_top_k`, when given,
    wins over keep_last (-1 keeps every checkpoint), as in ModelCheckpoint."""

    def __init__(self, keep_last: int = 1, save_top_k: int | None = None, **kwargs: Any):
        kwargs.setdefault("monitor", "step")
        kwargs.setdefault("mode", "max")
        self.keep_last = int(keep_last)
        super().__init__(save_top_k=self.keep_last if save_top_k is None else save_top_k, **kwargs)
