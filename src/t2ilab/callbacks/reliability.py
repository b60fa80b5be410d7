"""Reliability callbacks: stop on a non-finite loss and say where to resume from, and keep only
the newest N step checkpoints so long runs do not fill the disk."""

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
    """Ends the run when the training loss becomes NaN or inf, before that step's update, with
    one line that says where to resume from and with what.

    The weights at that moment are not good weights: the update before produced them, and that
    is usually where training diverged (weights of 1e10 give a NaN loss one step later). A
    checkpoint of step S holds weights whose loss at step S was computed; if that is the failing
    step, its checkpoint holds the diverged weights: it is renamed `diverged_step_<S>.ckpt`, so
    that `ckpt_path=last` never resumes into the same NaN. Any older checkpoint trained to a
    finite loss: the message names the newest one and a tenth of the learning rate to resume
    with (t2ilab.resume applies a changed method.lr on resume).
    """

    def __init__(self, dirpath: str, monitor: str = "train/loss"):
        self.dirpath = Path(dirpath)
        self.monitor = monitor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._check(trainer, pl_module, _as_float(trainer.callback_metrics.get(self.monitor)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer, pl_module, _as_float(outputs))

    def _check(self, trainer, pl_module, loss: float | None) -> None:
        if loss is None or math.isfinite(loss):
            return
        step = trainer.global_step
        if trainer.is_global_zero:
            self._set_aside_checkpoints_of(step)
        # method.lr, not the scheduled rate of this step: LR schedulers keep the configured
        # rate as initial_lr (a cosine at step 1 of 6 would otherwise advise 9.33e18 for 1e20).
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))
        lower = f" method.lr={lr / 10:.3g}" if lr else ""
        good = self._newest_checkpoint_before(step)
        if good is not None:
            where = f"hydra.run.dir={self.dirpath.parent} ckpt_path=last"
            resume = (where if good.name == "last.ckpt" else f"ckpt_path={good}") + lower
            advice = f"resume from {good} with a lower learning rate: {resume}"
        else:
            advice = f"no checkpoint was saved before step {step}: start again with{lower}"
        if not trainer.gradient_clip_val:
            advice += " and gradient clipping (trainer.gradient_clip_val=1.0)"
        raise UserError(
            f"loss became {loss} at step {step} (largest trained weight "
            f"{largest_weight(pl_module):.3g}); {advice}"
        )

    def _set_aside_checkpoints_of(self, step: int) -> None:
        """Checkpoints of the failing step hold the weights that failed: out of ckpt_path=last's
        way, one file kept for inspection."""
        kept = self.dirpath / f"diverged_step_{step:06d}.ckpt"
        for path in (self.dirpath / "last.ckpt", *self.dirpath.glob(f"*step_{step:06d}.ckpt")):
            if path.is_file() and path != kept and checkpoint_step(path) == step:
                if kept.exists():
                    path.unlink()
                else:
                    path.rename(kept)
                    log.error("non-finite loss: the weights of step %d are in %s", step, kept)

    def _newest_checkpoint_before(self, step: int) -> Path | None:
        found = []
        for path in self.dirpath.glob("*.ckpt"):
            if not path.name.startswith("diverged_"):
                saved = checkpoint_step(path)
                if saved is not None and saved < step:
                    found.append((saved, path.name == "last.ckpt", path))
        return max(found)[2] if found else None


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint file holds (memory-mapped: no tensor is read)."""
    try:
        return int(
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        )
    except Exception:  # unreadable: not a checkpoint to resume from
        return None


def largest_weight(module) -> float:
    values = [p.detach().abs().max() for p in module.parameters() if p.requires_grad]
    return float(torch.stack(values).max()) if values else float("nan")


class KeepLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the `keep_last` newest step checkpoints (plus last.ckpt with
    save_last=True): it ranks checkpoints by global step, newest best. `save_top_k`, when given,
    wins over keep_last (-1 keeps every checkpoint), as in ModelCheckpoint. ModelCheckpoint's
    warning about a non-empty folder is kept for a fresh run, and dropped for a run that resumes
    from a checkpoint in that folder (ckpt_path=last)."""

    DIR_NOT_EMPTY = "exists and is not empty"  # ModelCheckpoint's warning, as it words it

    def __init__(self, keep_last: int = 1, save_top_k: int | None = None, **kwargs: Any):
        kwargs.setdefault("monitor", "step")
        kwargs.setdefault("mode", "max")
        self.keep_last = int(keep_last)
        super().__init__(save_top_k=self.keep_last if save_top_k is None else save_top_k, **kwargs)
        self._held_warnings: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        import warnings  # here, not at the top: this change is confined to this class

        # Lightning warns here when dirpath holds files, before it restores the checkpoint, so
        # before it knows whether the run resumes from that folder: hold its warnings until then.
        with warnings.catch_warnings(record=True) as held:
            super().setup(trainer, pl_module, stage)
        self._held_warnings = held

    def on_train_start(self, trainer, pl_module) -> None:
        import warnings

        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path:
            # A resume that changed the checkpoint interval (part of Lightning's state key)
            # restored none of this callback's state: load_state_dict never ran.
            self._adopt_last_checkpoint()
        resuming_here = self._resumes_from_dirpath(trainer)
        for w in self._held_warnings:
            if resuming_here and self.DIR_NOT_EMPTY in str(w.message):
                continue  # resuming (ckpt_path=last) finds the run's own checkpoints: expected
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._held_warnings = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._adopt_last_checkpoint()

    def _adopt_last_checkpoint(self) -> None:
        # Lightning restores last_model_path only for the folder the checkpoint was written in.
        # After the run folder moved (or was copied), save_last would then write last-v1.ckpt
        # beside the old last.ckpt, and the next ckpt_path=last would resume the old one. The
        # folder is this run's (train.check_continuation): last.ckpt is the file to replace.
        if self.save_last and not self.last_model_path and self.dirpath:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            if last.is_file():
                self.last_model_path = str(last)

    def _resumes_from_dirpath(self, trainer) -> bool:
        ckpt, dirpath = trainer.ckpt_path, self.dirpath
        if not ckpt or not dirpath or "://" in str(ckpt) + str(dirpath):
            return False
        return Path(ckpt).resolve().parent == Path(dirpath).resolve()
