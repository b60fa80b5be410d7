"""DreamBooth (Ruiz et al. 2023): fine-tune the UNet (and optionally the text encoder) on a few
subject images, with the class-specific prior-preservation loss of the shared step."""

from __future__ import annotations

from t2ilab.modules.text_to_image import TextToImageModule


class DreamBoothModule(TextToImageModule):
    """DreamBooth is the text-to-image step with prior preservation batches; the UNet is trained
    by default (Improved DreamBooth), the text encoder with method.train_text_encoder=true."""
