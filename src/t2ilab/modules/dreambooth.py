"""DreamBooth (Ruiz et al. 2023): fine-tune the denoiser (and optionally the text encoder) on a
few subject images, with the class-specific prior-preservation loss of the shared step."""

from __future__ import annotations

from t2ilab.models.families import Family
from t2ilab.modules.full import FullModule


class DreamBoothModule(FullModule):
    """Full fine-tuning with prior-preservation batches: the denoiser trains by default (Improved
    DreamBooth), the text encoder with method.train_text_encoder=true."""

    @classmethod
    def refusal(cls, family: Family, method_cfg) -> str | None:
        if not family.text:
            return (
                f"DreamBooth binds a subject to a text identifier; {family.description} has no "
                "text: train it on class labels with method=full data=class_folder"
            )
        return super().refusal(family, method_cfg)
