"""The class-conditional DiT of PixArt's stage 1 on the shared diffusion step."""

from __future__ import annotations

from typing import Any

import torch

from t2ilab.modules.base import DiffusionModule


def mean_prediction(output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """DiT and PixArt predict noise and a learned variance (2C channels); the simple MSE loss
    trains the noise half, as both papers' L_simple does."""
    return output[:, :latent_channels] if output.shape[1] == 2 * latent_channels else output


class DiTModule(DiffusionModule):
    """Class-conditional DiT (adaLN-Zero): PixArt's stage 1, pixel dependency. Its label
    embedding drops labels to the null class during training (class_dropout_prob 0.1)."""

    backbone_families = ("dit",)

    def __init__(self, transformer, vae, scheduler_config, **base_kwargs):
        for key in ("train_unet", "train_text_encoder"):
            base_kwargs.pop(key, None)
        super().__init__(vae=vae, scheduler_config=scheduler_config, **base_kwargs)
        self.transformer = transformer
        self.id2label: dict[int, str] = {}

    @property
    def backbone(self):
        return self.transformer

    def encode_condition(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["class_labels"]

    def predict(self, noisy_latents, timesteps, condition) -> torch.Tensor:
        out = self.transformer(noisy_latents, timestep=timesteps, class_labels=condition).sample
        return mean_prediction(out, noisy_latents.shape[1])

    def pipeline(self, scheduler):
        from t2ilab.models.pixart_dit import build_dit_pipeline

        return build_dit_pipeline(self.transformer, self.vae, scheduler, self.id2label)

    def save_artefact(self, folder, scheduler) -> None:
        import json
        from pathlib import Path

        from t2ilab.models.pixart_dit import LABELS_FILE

        # The pipeline folder carries the labels in model_index.json (build_dit_pipeline), where
        # stock DiTPipeline.from_pretrained reads them; the side file serves readers of older
        # exports' layout (class id -> name).
        super().save_artefact(folder, scheduler)
        (Path(folder) / LABELS_FILE).write_text(json.dumps(self.id2label, indent=2))
