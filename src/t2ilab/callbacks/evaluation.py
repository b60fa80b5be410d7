"""Evaluation during and at the end of training, and reporting evaluation outputs (files, loggers).

The reporting functions are shared with `python evaluate.py`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from t2ilab.metrics.dreambooth import ROW_COLUMNS
from t2ilab.metrics.protocol import DreamBoothProtocol, EvalOutput
from t2ilab.models.pipelines import make_sampler
from t2ilab.utils.atomic import atomic_file, save_image_atomic
from t2ilab.utils.images import make_grid

log = logging.getLogger(__name__)


def save_eval_outputs(out: EvalOutput, folder: str | Path) -> Path:
    """One PNG grid per prompt (plus the prior prompt) and a per-prompt CSV, under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (prompt, images) in enumerate(out.images.items()):
        save_image_atomic(
            make_grid(images, rows=1, captions=[prompt]), folder / f"prompt_{i:02d}.png"
        )
    if out.prior_images:
        save_image_atomic(
            make_grid(out.prior_images, rows=-(-len(out.prior_images) // 8), captions=["prior"]),
            folder / "prior.png",
        )
    with atomic_file(folder / "prompts.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_COLUMNS))
        writer.writeheader()
        writer.writerows({k: row[k] for k in ROW_COLUMNS} for row in out.rows)
    return folder


def log_eval_outputs(out: EvalOutput, loggers: list[Logger], step: int) -> None:
    """`eval/<metric>` to every logger; W&B also gets a per-prompt table with images and the
    summary values, so runs compare on the dashboard by their final metrics."""
    metrics = {f"eval/{k}": v for k, v in out.metrics.items()}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            import wandb

            table = wandb.Table(columns=[*ROW_COLUMNS, "image"])
            for row in out.rows:
                grid = make_grid(out.images[row["prompt"]], rows=1)
                table.add_data(*(row[k] for k in ROW_COLUMNS), wandb.Image(grid))
            grids = [
                wandb.Image(make_grid(imgs, rows=1), caption=p) for p, imgs in out.images.items()
            ]
            logger.experiment.log(
                {"eval/prompts": table, "eval/grids": grids, "trainer/global_step": step}
            )
            logger.experiment.summary.update(metrics)
        logger.save()


class DreamBoothEvalCallback(L.Callback):
    """Runs the protocol on the module's current weights every N steps (0: never) and at the end.
    `last_metrics` holds the latest values for results.json."""

    def __init__(
        self,
        protocol: DreamBoothProtocol,
        output_dir: str | Path,
        every_n_steps: int = 0,
        scheduler: str = "DDIMScheduler",
    ):
        self.protocol = protocol
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.scheduler = scheduler
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)

    @rank_zero_only
    def evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            config = pl_module.objective.inference_config()
            with pl_module.for_inference():  # e.g. the EMA weights when ema.enabled
                out = self.protocol.run(pl_module.pipeline(make_sampler(self.scheduler, config)))
        finally:
            pl_module.train(was_training)
        save_eval_outputs(out, self.output_dir / f"eval_step_{step:06d}")
        log_eval_outputs(out, trainer.loggers, step)
        self.last_metrics = dict(out.metrics)
        log.info(
            "eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in out.metrics.items())
        )
