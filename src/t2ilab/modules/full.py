"""Full fine-tuning (or training from scratch) of the denoiser, and optionally the text
encoders, on any backbone: the shared step with nothing added."""

from __future__ import annotations

from t2ilab.modules.base import DiffusionModule


class FullModule(DiffusionModule):
    """Every weight of the denoiser trains (`train_unet`: the UNet or the transformer), and the
    text encoders' with `train_text_encoder`. The export is the whole pipeline folder."""

    def __init__(self, backbone, train_unet: bool = True, train_text_encoder: bool = False, **kw):
        super().__init__(backbone, **kw)
        self.train_unet = train_unet
        self.train_text_encoder = train_text_encoder
        self.denoiser.requires_grad_(train_unet)
        for encoder in self.backbone.text_encoders:
            encoder.requires_grad_(train_text_encoder)
