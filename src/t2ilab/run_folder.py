"""What a run may write into: its own folder, never the user's data, never a finished run.

A run folder is new, empty, or one t2ilab made (it has `.hydra/`). Starting a run in one that
holds a finished run would replace its export and results; in one that holds an interrupted run,
its checkpoints. Both are refused unless `ckpt_path` continues that run, and a continuation that
would train no step is refused too (it would rewrite results.json with nothing in it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError

# Config keys that point at the user's own files.
USER_DATA_KEYS = ("data.instance_dir", "data.train_dir", "data.class_dir", "eval.reference_dir")
RESUME_RECORDS = ".hydra/resume_"


class RunFolderTaken(UserError):
    """The run folder holds another run: the failure is not recorded there (results.json would
    replace that run's)."""


def user_data_dirs(cfg: DictConfig) -> dict[str, Path]:
    """{config key: resolved folder} for every user data folder the config names."""
    found = {}
    for key in USER_DATA_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value:
            found[key] = Path(str(value)).expanduser().resolve()
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart_from_data(
    name: str, folder: Path, user_dirs: dict[str, Path], what: str = "the run's files"
) -> None:
    """`folder` (where the run writes `what`) is neither one of the user's data folders, nor
    inside one, nor around one."""
    folder = folder.expanduser().resolve()
    for key, data in user_dirs.items():
        if key == name:
            continue
        if _inside(folder, data) or _inside(data, folder):
            where = "is" if folder == data else ("is inside" if _inside(folder, data) else "holds")
            raise UserError(
                f"{name}={folder} {where} your data ({key}={data}): {what} would be written "
                "among your files; choose a folder of its own"
            )


def finished_run(folder: Path) -> dict[str, Any] | None:
    """The results of the run in `folder` if it finished (results.json ok, or an export)."""
    results = folder / "results.json"
    try:
        record = json.loads(results.read_text()) if results.is_file() else {}
    except (OSError, ValueError):
        record = {}
    if record.get("status") == "ok" or (folder / "export").is_dir():
        return record
    return None


def max_steps_of(cfg: DictConfig) -> int:
    """trainer.max_steps, -1 when unset (Lightning's "no limit")."""
    return int(OmegaConf.select(cfg, "trainer.max_steps", default=-1) or -1)


def nothing_to_train(cfg: DictConfig, step: int) -> bool:
    """A checkpoint at `step` has reached trainer.max_steps."""
    return 0 <= max_steps_of(cfg) <= step


def export_folder(cfg: DictConfig, run_dir: Path) -> Path:
    """export.dir, or <run dir>/export."""
    folder = OmegaConf.select(cfg, "export.dir", default=None)
    return Path(folder).expanduser() if folder else Path(run_dir) / "export"


def export_missing(run_dir: Path, cfg: DictConfig) -> bool:
    """The run should have an export (export.enabled) and has none: it ran with
    export.enabled=false, or stopped between its last step and the export."""
    if not OmegaConf.select(cfg, "export.enabled", default=False):
        return False
    return not (export_folder(cfg, run_dir) / "model_index.json").is_file()


def last_checkpoint(folder: Path) -> Path | None:
    last = folder / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def checkpoint_step(path: Path) -> int:
    from t2ilab.checkpoints import load_checkpoint_file

    return int(load_checkpoint_file(path).get("global_step", 0))


def check_run_folder(
    run_dir: Path,
    user_dirs: dict[str, Path],
    ckpt_path: str | None,
    cfg: DictConfig,
    task: str = "train",
) -> list[str]:
    """Checks of `hydra.run.dir` before Hydra writes into it; returns the overrides that keep a
    continued run's first Hydra record (`.hydra/resume_<n>/` for this one)."""
    run_dir = run_dir.expanduser().resolve()
    check_apart_from_data("hydra.run.dir", run_dir, user_dirs)
    if not run_dir.exists():
        return []
    if not run_dir.is_dir():
        raise UserError(f"hydra.run.dir={run_dir} is a file: choose a folder")
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and ".hydra" not in entries:
        raise UserError(
            f"hydra.run.dir={run_dir} already holds files that no run wrote (e.g. {entries[0]}): "
            "choose a new or empty folder"
        )
    if task == "evaluate":
        record = finished_run(run_dir) or {}
        if (record or last_checkpoint(run_dir)) and record.get("experiment") != "evaluate":
            raise UserError(
                f"hydra.run.dir={run_dir} holds a training run: evaluate it with "
                f"run_dir={run_dir}, and leave hydra.run.dir to evaluate.py (or a new folder)"
            )
        return []
    check_continuation(run_dir, ckpt_path, cfg, "hydra.run.dir")
    if ckpt_path and (run_dir / ".hydra" / "config.yaml").is_file():
        count = len(list(run_dir.glob(RESUME_RECORDS + "*")))
        return [f"hydra.output_subdir={RESUME_RECORDS}{count + 1}"]
    return []


def check_continuation(run_dir: Path, ckpt_path: str | None, cfg: DictConfig, name: str) -> None:
    """A folder with a finished or interrupted run is only trained in again to continue it."""
    finished = finished_run(run_dir)
    last = last_checkpoint(run_dir)
    if not ckpt_path:
        if finished is not None:
            steps = finished.get("steps")
            more = f"N (N > {steps})" if steps else "<more steps>"
            raise RunFolderTaken(
                f"{name}={run_dir} holds a finished run: choose a new folder, or continue this "
                f"one with ckpt_path=last trainer.max_steps={more}"
            )
        if last is not None:
            raise RunFolderTaken(
                f"{name}={run_dir} holds an interrupted run (checkpoints/last.ckpt at step "
                f"{checkpoint_step(last)}): resume it with ckpt_path=last, or choose a new folder"
            )
        return
    path = last if ckpt_path == "last" else Path(str(ckpt_path)).expanduser()
    if path is None or not path.is_file():
        return  # train.py names the missing checkpoint
    step = checkpoint_step(path)
    max_steps = max_steps_of(cfg)
    if nothing_to_train(cfg, step):
        if export_missing(run_dir, cfg):
            return  # an export-only continuation: train.py restores the weights and exports them
        raise RunFolderTaken(
            f"nothing to train: ckpt_path={ckpt_path} is at step {step} and trainer.max_steps="
            f"{max_steps}; raise trainer.max_steps to continue training, or evaluate the run "
            f"with python evaluate.py run_dir={run_dir}"
        )
