"""Checkpoints a run can trust: written so that a full disk never leaves a truncated file where
`ckpt_path=last` would load it, stamped with what trained them, and checked before a resume
loads any weights.

- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside its target, flushes it
  to disk, then renames it over the target. (Lightning's own save goes through a temporary file
  in the system temp folder and a *copy* when that is another file system: a disk that fills up
  during the copy leaves a truncated checkpoint in place of the last good one.)
- `stamp` (called from the module's on_save_checkpoint) records the run's settings in the
  checkpoint; `inspect_checkpoint` reads them back cheaply (memory-mapped) and refuses, in one
  line, a file that is truncated, not a checkpoint, or from another model or method.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from t2ilab.errors import UserError
from t2ilab.utils.atomic import atomic_file

log = logging.getLogger(__name__)

RECORD_KEY = "t2ilab"
# Settings a resume must keep: the checkpoint's weights mean nothing under other values.
IDENTITY_KEYS = ("model.name", "model.pretrained", "method.name", "method.module._target_")
# Module classes that moved (issue 14.7): checkpoints stamped before the move record the old
# dotted path under method.module._target_; read back as the new path, they resume as before.
RENAMED_TARGETS = {
    # Full training was one module class per backbone family before the backbone became its own
    # config axis (t2ilab.models.backbone); it is one class on every family now.
    "t2ilab.modules.transformers.PixArtModule": "t2ilab.modules.full.FullModule",
    "t2ilab.modules.transformers.DiTModule": "t2ilab.modules.full.FullModule",
    "t2ilab.modules.pixart.PixArtModule": "t2ilab.modules.full.FullModule",
    "t2ilab.modules.dit.DiTModule": "t2ilab.modules.full.FullModule",
}
TARGET_KEY = "method.module._target_"
# Datamodule classes that moved: the toy world's datamodules left t2ilab.data for t2ilab.toy;
# checkpoints stamped before the move record the old dotted path under data._target_.
RENAMED_DATAMODULES = {
    "t2ilab.data.toy_world.ToyWorldDataModule": "t2ilab.toy.datamodules.ToyWorldDataModule",
    "t2ilab.data.toy_world.ToyWorldClassDataModule": (
        "t2ilab.toy.datamodules.ToyWorldClassDataModule"
    ),
}
DATA_TARGET_KEY = "data._target_"
# Each recorded class path, with the classes under it that moved (old path -> new path).
MOVED_CLASSES = {TARGET_KEY: RENAMED_TARGETS, DATA_TARGET_KEY: RENAMED_DATAMODULES}
# Errors that mean "the disk (or the user's quota or file-size limit) is full".
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def disk_full_message(path: Path, err: OSError) -> str:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return (
        f"could not write {path}: {os.strerror(err.errno)} ({free / 2**20:.0f} MiB free): free "
        "disk space or raise the file-size limit, then resume with ckpt_path=last "
        "(the last complete checkpoint is untouched)"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints written whole or not at all, in the target's own folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Streamed into the file: serialising into memory first held a second copy of the
            # checkpoint (weights and optimizer state) at the run's peak (experiments/benchmarks).
            with atomic_file(path, durable=True) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:
            cause = os_error_of(err)
            if cause is not None and cause.errno in DISK_FULL:
                raise UserError(disk_full_message(path, cause)) from None
            raise


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or the one torch's zip writer wraps in a RuntimeError
    when a write into the file fails."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def stamp(checkpoint: dict[str, Any], record: dict[str, Any]) -> None:
    """Record what trained this checkpoint (read back by inspect_checkpoint), beside what
    callbacks recorded there (the run's segments)."""
    checkpoint.setdefault(RECORD_KEY, {}).update(record)


def current_settings(trained: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded settings as this version records them: moved module and
    datamodule classes (MOVED_CLASSES) under their current path, and without the
    `method.module.<key>: ${method.<key>}` copies older configs held (a method key is now
    written once and handed to the module by name)."""
    trained = {
        key: value
        for key, value in trained.items()
        if not (
            key.startswith("method.module.")
            and key.count(".") == 2
            and not key.endswith("._target_")
            and trained.get("method." + key.rsplit(".", 1)[1], object()) == value
        )
    }
    for key, renamed in MOVED_CLASSES.items():
        target = trained.get(key)
        if isinstance(target, str) and target in renamed:
            trained[key] = renamed[target]
    return trained


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped where possible (tensors are not read until
    used); a file that is not a whole torch checkpoint is a UserError naming it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)  # legacy format
    except Exception as err:  # truncated zip, pickle garbage, a text file, ...
        raise UserError(
            f"ckpt_path={path} cannot be read as a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}): it is truncated or not a Lightning checkpoint; "
            f"resume from another file in {path.parent}"
        ) from None


def moved_with_project(trained: Any, current: Any, root: str | None) -> bool:
    """Whether `current` is a path inside the project folder `root` and `trained` names the same
    path inside another folder: '/old/clone/models/toy/toy_clip' against
    '<root>/models/toy/toy_clip'. Configs write bundled models as ${paths.root_dir}/..., so the
    recorded paths change whenever the project moves."""
    if not (root and isinstance(trained, str) and isinstance(current, str)):
        return False
    project = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.abspath(current))
    if not path.startswith(project + os.sep):
        return False
    tail = path[len(project) :]
    return os.path.isabs(trained) and os.path.normpath(trained).endswith(tail)


def inspect_checkpoint(
    path: Path, settings: dict[str, Any], root: str | None = None
) -> dict[str, Any]:
    """Before any weights load: the checkpoint at `path` must be whole and have been trained
    with this run's model and method (`settings`: flat config keys; `root`: the project folder,
    see moved_with_project). Returns its record plus `global_step`."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"ckpt_path={path} is not a Lightning training checkpoint (no state_dict): pass "
            "<run dir>/checkpoints/last.ckpt or a step_*.ckpt beside it"
        )
    record = dict(checkpoint.get(RECORD_KEY) or {})
    if isinstance(record.get("settings"), dict):
        record["settings"] = current_settings(record["settings"])
    trained = record.get("settings", {})
    for key in IDENTITY_KEYS:
        if (
            key in trained
            and key in settings
            and trained[key] != settings[key]
            and not moved_with_project(trained[key], settings[key], root)
        ):
            raise UserError(
                f"ckpt_path={path} was trained with {key}={trained[key]}, this run has "
                f"{key}={settings[key]}: resume with {key}={trained[key]}, or start a new run "
                "without ckpt_path"
            )
    record["global_step"] = int(checkpoint.get("global_step", 0))
    return record


def check_loaded_weights(checkpoint: dict[str, Any], trainable: set[str], path: str) -> None:
    """After Lightning read the checkpoint (loading is partial: checkpoints hold only trainable
    weights): every trainable weight of this run must be in it, or it is another model's."""
    missing = sorted(trainable - set(checkpoint.get("state_dict", {})))
    if missing:
        raise UserError(
            f"ckpt_path={path} lacks {len(missing)} of this run's {len(trainable)} trained "
            f"weights (e.g. {missing[0]}): it is from another model or method; resume with "
            "the settings it was trained with, or start a new run without ckpt_path"
        )
