"""The base of the parameter-efficient methods (LoRA, textual inversion, adapters) on the SD
family: the base model stays frozen and the export holds only what the method trained."""

from __future__ import annotations

from pathlib import Path

from t2ilab.modules.text_to_image import TextToImageModule


class ParameterEfficientModule(TextToImageModule):
    """Base of LoRA, textual inversion and adapters: the UNet and text encoder stay frozen (the
    subclass adds what trains), and the export is the method's weights plus the trained schedule
    (scheduler/), to be applied to the base model."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, **base_kwargs):
        for key in ("train_unet", "train_text_encoder"):  # fixed here, whatever the config says
            base_kwargs.pop(key, None)
        super().__init__(
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler_config,
            train_unet=False,
            train_text_encoder=False,
            **base_kwargs,
        )

    def save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def save_artefact(self, folder: Path, scheduler) -> None:
        self.save_weights(Path(folder))
        scheduler.save_pretrained(Path(folder) / "scheduler")
