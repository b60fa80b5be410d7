"""The base of the parameter-efficient methods (LoRA, textual inversion, adapters): the
backbone stays frozen and the export holds only what the method trained."""

from __future__ import annotations

from pathlib import Path

from t2ilab.modules.base import DiffusionModule


class ParameterEfficientModule(DiffusionModule):
    """Base of LoRA, textual inversion and adapters: every backbone part stays frozen (the
    subclass adds what trains), and the export is the method's weights plus the trained schedule
    (scheduler/), to be applied to the base model."""

    def __init__(self, backbone, **kw):
        for key in ("train_unet", "train_text_encoder"):  # fixed here, whatever the config says
            kw.pop(key, None)
        super().__init__(backbone, **kw)

    def save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def save_artefact(self, folder: Path, scheduler) -> None:
        self.save_weights(Path(folder))
        scheduler.save_pretrained(Path(folder) / "scheduler")
