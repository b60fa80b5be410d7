"""Pretrain one toy model: `python pretrain_toy.py toy_component=vae|clip|dino`.

Orchestration only: the recipe (architecture, steps, batch, lr, seed) is
`conf/toy_component/<name>.yaml`, the model and its loss are a LightningModule in
`t2ilab.toy.modules`. The run trains on renders of the toy world, exports the model folder
atomically (a crash leaves the old folder or the new one, never half of one), measures it on
fresh renders (`t2ilab.toy.quality`), and writes `training.json` and a sample grid into both
the model folder and the run folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from t2ilab.callbacks.segments import SegmentRecorder, earlier_segments, total_wall_time_s
from t2ilab.checkpoints import RECORD_KEY, AtomicCheckpointIO, load_checkpoint_file
from t2ilab.data.loader import resumable_loader
from t2ilab.errors import UserError
from t2ilab.loggers import build_loggers, instantiate_dict
from t2ilab.runner import command_line, run_task
from t2ilab.threads import lightning_trainer_config
from t2ilab.utils.atomic import atomic_directory, save_image_atomic, write_json_atomic

log = logging.getLogger("t2ilab.toy")

GRID_NAME = "samples.png"


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: <run dir>/checkpoints/last.ckpt (with hydra.run.dir=<the run>)."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    run_dir = Path(cfg.paths.output_dir)
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt).expanduser()
    if not path.is_file():
        hint = " (ckpt_path=last needs hydra.run.dir=<the run to resume>)" if ckpt == "last" else ""
        raise UserError(f"ckpt_path={ckpt}: no checkpoint at {path}{hint}")
    return str(path)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before training rather than after: a folder someone made is never replaced
    unless asked to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir={out_dir} is a file: choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"out_dir={out_dir} is not empty, refusing to overwrite it: "
            "pass overwrite=true to replace it, or choose another out_dir="
        )


def resumed_segments(ckpt_path: str | None) -> tuple[list[dict[str, Any]], int]:
    """The launches recorded in the checkpoint a run continues from, and its step."""
    if ckpt_path is None:
        return [], 0
    checkpoint = load_checkpoint_file(Path(ckpt_path))
    step = int(checkpoint.get("global_step", 0))
    return earlier_segments(checkpoint.get(RECORD_KEY) or {}, step), step


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def versions() -> dict[str, str]:
    names = ("torch", "lightning", "diffusers", "transformers", "tokenizers")
    return {name: importlib.metadata.version(name) for name in names}


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    recipe = cfg.toy_component
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    check_out_dir(out_dir, bool(cfg.overwrite))
    resume_from = resolve_ckpt_path(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))

    L.seed_everything(int(recipe.seed), workers=True)
    module = hydra.utils.instantiate(recipe.module, max_steps=int(recipe.steps))
    dataset = module.train_dataset(int(recipe.steps) * int(recipe.batch_size), int(recipe.seed))
    # Item i is already a random scene, so the order is the seed's; the loader's position is in
    # every checkpoint, so a continued run goes on with the next batch, not the first again.
    loader = resumable_loader(
        dataset,
        collate_fn=module.collate,
        batch_size=int(recipe.batch_size),
        shuffle=False,
        seed=int(recipe.seed),
        num_workers=int(recipe.num_workers),
    )
    segments = SegmentRecorder(command_line("pretrain_toy.py"), *resumed_segments(resume_from))
    trainer: L.Trainer = hydra.utils.instantiate(
        lightning_trainer_config(cfg.trainer),  # threads: num_threads above
        logger=build_loggers(cfg),
        callbacks=[*instantiate_dict(cfg.get("callbacks")), segments],
        plugins=[AtomicCheckpointIO()],  # a checkpoint is written whole or not at all
    )
    parameters = sum(p.numel() for p in module.model.parameters())
    log.info("%s: %s parameters", recipe.name, f"{parameters:,}")
    fit_start = time.time()
    # The recipe's own checkpoint holds its config (OmegaConf hyperparameters), which torch's
    # weights-only loader refuses; it is this run's file, so it is read whole.
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_from, weights_only=False)
    train_time = time.time() - fit_start
    launches = segments.segments(trainer.global_step)

    run_dir = Path(cfg.paths.output_dir)
    eval_seed = int(recipe.eval_seed)
    with atomic_directory(out_dir) as folder:
        module.export(folder)
        metrics, grid = module.evaluate(folder, eval_seed)
        summary = {
            "component": recipe.name,
            "command": command_line("pretrain_toy.py"),
            "seed": int(recipe.seed),
            "eval_seed": eval_seed,
            "steps": int(trainer.global_step),
            # every launch together (first run and continuations); the last launch's own below
            "train_wall_time_s": total_wall_time_s(launches),
            "segments": launches,
            "last_segment_train_wall_time_s": round(train_time, 1),
            "total_wall_time_s": round(time.time() - start, 1),
            "num_threads": torch.get_num_threads(),
            "parameters": parameters,
            "model_bytes": folder_size(folder),  # weights, configs, tokenizer
            "metrics": {k: round(v, 4) for k, v in metrics.items()},
            "recipe": OmegaConf.to_container(recipe, resolve=True),
            "versions": versions(),
        }
        for target in (folder, run_dir):
            write_json_atomic(target / "training.json", summary)
            save_image_atomic(grid, target / GRID_NAME)
    log.info("%s -> %s: %s", recipe.name, out_dir, summary["metrics"])
    return {"metrics": metrics, "steps": int(trainer.global_step)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain and always write results.json; a user error is one line and exit code 2."""
    return run_task(cfg, pretrain, name=f"pretrain_{cfg.toy_component.name}")
