"""Resuming with changed settings, so that the record shows what actually trained.

A checkpoint carries the flat settings of the run that wrote it (t2ilab.checkpoints.stamp).
On resume, `settings_changes` compares them with this run's:
- settings that define what the weights are (the model, the method's structure, the noise
  objective, the data) cannot change: one line names them, before any weights load;
- the others (learning rate and optimizer, max_steps, devices, evaluation, sampling, logging, ...)
  may change; each change is logged, kept in the checkpoint's history and in results.json
  ("resumes"), and applied: Lightning restores the optimizer's and LR schedule's own state, which
  would otherwise keep the old learning rate whatever the command line says.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from t2ilab.checkpoints import moved_with_project
from t2ilab.errors import UserError
from t2ilab.loggers import flat_config

log = logging.getLogger(__name__)

# Keys that never describe training (where files go, how this process was started).
_NOT_SETTINGS = ("ckpt_path", "paths.", "hydra.", "task_name")
# Keys a resume may change. Everything else under model., method., noise. and data. is fixed.
_MAY_CHANGE = (
    "method.lr",
    "method.module.optimizer.",
    "method.module.lr_scheduler.",  # e.g. num_training_steps follows trainer.max_steps
    "method.gradient_checkpointing",
    "method.compile",
    "method.channels_last",
    "method.vae_bf16_encode",
    "data.num_workers",
)
_FIXED = ("model.", "method.", "noise.", "data.", "subject.")
# Keys added to the configs after checkpoints were written, with the value that keeps the old
# behaviour: a checkpoint without the key trained with that value.
ADDED_SETTINGS: dict[str, Any] = {
    "data.curriculum_steps": 0,
    "data.curriculum_floor": 0.0,
    "method.vae_bf16_encode": False,
}


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    """The run's resolved settings as flat dotted keys (what a checkpoint records)."""
    return {k: v for k, v in flat_config(cfg).items() if not k.startswith(_NOT_SETTINGS)}


def settings_changes(
    trained: dict[str, Any], current: dict[str, Any], ckpt_path: str, root: str | None = None
) -> dict[str, list[Any]]:
    """{key: [checkpoint's value, this run's value]} for every changed setting; raises a
    UserError when one of them may not change on resume. `root` is this run's project folder:
    a path inside it that the checkpoint recorded under another folder with the same tail
    (the project was moved or cloned elsewhere) is the same file, and may differ."""
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in current and k not in trained}
    trained = {**trained, **added}
    changes = {
        key: [trained.get(key), current.get(key)]
        for key in sorted(set(trained) | set(current))
        if trained.get(key) != current.get(key)
    }
    fixed = [
        k
        for k in changes
        if k.startswith(_FIXED)
        and not k.startswith(_MAY_CHANGE)
        and not moved_with_project(*changes[k], root)
    ]
    if fixed:
        shown = ", ".join(f"{k}={changes[k][0]!r} (now {changes[k][1]!r})" for k in fixed[:3])
        more = f" and {len(fixed) - 3} more" if len(fixed) > 3 else ""
        raise UserError(
            f"ckpt_path={ckpt_path} was trained with {shown}{more}: a resume keeps the model, "
            "method, noise and data settings; use the checkpoint's values, or start a new run "
            "without ckpt_path"
        )
    return changes


class ApplyResumedSettings(L.Callback):
    """At the start of a resumed fit: the optimizer's hyperparameters (lr, betas, weight decay,
    ...) as configured now, not as the checkpoint's optimizer state had them. The LR schedule's
    base rates scale with the learning rate, so the schedule continues from its position at the
    new rate (diffusers' schedules are LambdaLR: lr = base_lr * f(step))."""

    def __init__(self, changes: dict[str, list[Any]]):
        self.changes = changes

    def on_train_start(self, trainer, pl_module) -> None:
        factory = getattr(pl_module, "optimizer_factory", None)
        configured = dict(getattr(factory, "keywords", {}) or {})
        if not configured or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        for group_index, group in enumerate(optimizer.param_groups):
            for key, value in configured.items():
                if key == "lr" or key not in group or group[key] == _as_group_value(value):
                    continue
                group[key] = _as_group_value(value)
            new_lr = float(configured.get("lr", group.get("initial_lr", group["lr"])))
            old_lr = float(group.get("initial_lr", group["lr"]))
            if new_lr != old_lr and old_lr > 0:
                self._scale_learning_rate(trainer, group_index, group, new_lr / old_lr)
                group["initial_lr"] = new_lr
        self._rate_from_schedule(trainer, optimizer)
        if self.changes:
            log.info(
                "resume at step %d with changed settings: %s",
                trainer.global_step,
                ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()),
            )

    @staticmethod
    def _rate_from_schedule(trainer, optimizer) -> None:
        """The first resumed step's rate from the schedule as configured now: the optimizer's
        restored rate came from the checkpoint's schedule, which a resume may have changed
        (e.g. constant -> linear decay). Without this the first step trains at the old rate."""
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            rates = [
                base * rule(scheduler.last_epoch)
                for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            ]
            for group, rate in zip(optimizer.param_groups, rates, strict=False):
                group["lr"] = rate
            scheduler._last_lr = rates

    @staticmethod
    def _scale_learning_rate(trainer, group_index: int, group: dict, ratio: float) -> None:
        group["lr"] *= ratio
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs") and group_index < len(scheduler.base_lrs):
                scheduler.base_lrs[group_index] *= ratio
            if hasattr(scheduler, "_last_lr") and group_index < len(scheduler._last_lr):
                scheduler._last_lr[group_index] = group["lr"]


def _as_group_value(value: Any) -> Any:
    """Optimizer groups hold tuples where configs hold lists (betas)."""
    return tuple(value) if isinstance(value, list) else value
