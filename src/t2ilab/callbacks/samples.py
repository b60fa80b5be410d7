"""Validation samples: the same prompts and seeds every N steps and at the end, as PNG grids."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from t2ilab.models.pipelines import make_sampler, pipeline_call_kwargs
from t2ilab.utils.atomic import save_image_atomic
from t2ilab.utils.images import make_grid
from t2ilab.validation import fill_prompt

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Generates `prompts` (templates over the module's `prompt_vars`, e.g. {identifier}; None:
    the datamodule's `validation_prompts()`) with fixed seeds, one grid row per prompt, saved as
    samples/step_XXXXXX.png and logged to W&B."""

    def __init__(
        self,
        prompts: list[str] | None,
        output_dir: str,
        every_n_steps: int = 0,
        at_end: bool = True,
        images_per_prompt: int = 2,
        seed: int = 0,
        scheduler: str = "DDIMScheduler",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
    ):
        self.prompts = list(prompts) if prompts is not None else None
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        ):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def rows(self, trainer, pl_module) -> list[str] | list[int]:
        """One grid row per prompt, or per class (the first four) on a class-conditional model."""
        if not pl_module.backbone.has_text:
            return sorted(getattr(pl_module.backbone, "id2label", {}) or range(4))[:4]
        templates = self.prompts
        if templates is None:  # the data's own, e.g. the first training captions
            source = getattr(trainer, "datamodule", None)
            templates = source.validation_prompts() if source is not None else []
        return [fill_prompt(p, pl_module.prompt_vars) for p in templates]

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path | None:
        prompts = self.rows(trainer, pl_module)
        if not prompts:
            return None
        self._last_step = trainer.global_step
        with pl_module.for_inference():  # e.g. the EMA weights when ema.enabled
            images = generate_images(
                pl_module,
                prompts,
                self.images_per_prompt,
                self.seed,
                self.scheduler,
                self.num_inference_steps,
                self.guidance_scale,
                self.resolution,
            )
        labels = getattr(pl_module.backbone, "id2label", {}) or {}
        captions = [p if isinstance(p, str) else labels.get(p, f"class {p}") for p in prompts]
        grid = make_grid(images, rows=len(prompts), captions=captions)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"step_{trainer.global_step:06d}.png"
        save_image_atomic(grid, path)
        log.info("samples: %s", path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "samples", [grid], step=trainer.global_step, caption=[" | ".join(captions)]
                )
        return path


@torch.no_grad()
def generate_images(
    module, prompts, images_per_prompt, seed, scheduler_name, steps, guidance_scale, resolution=None
):
    """Images for each prompt (or class id) with seeds seed..seed+k-1, from the module's current
    weights and the schedule it is trained with."""

    was_training = module.training
    module.eval()
    try:
        sampler = make_sampler(scheduler_name, module.objective.inference_config())
        pipe = module.pipeline(sampler)
        images = []
        for prompt in prompts:
            generators = [
                torch.Generator(device="cpu").manual_seed(seed + i)
                for i in range(images_per_prompt)
            ]
            if isinstance(prompt, int):  # a class id: DiT's pipeline samples at its own size
                images += pipe(
                    class_labels=[prompt] * images_per_prompt,
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                ).images
                continue
            images += pipe(
                prompt=[prompt] * images_per_prompt,
                generator=generators,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                **pipeline_call_kwargs(pipe),
            ).images
        return images
    finally:
        module.train(was_training)
