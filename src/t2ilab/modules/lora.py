"""LoRA (Hu et al. 2021) through peft on the UNet's attention projections, optionally on the text
encoder, saved in diffusers' format (pytorch_lora_weights.safetensors) that stock
`pipe.load_lora_weights(export)` loads."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from t2ilab.modules.parameter_efficient import ParameterEfficientModule


class LoRAModule(ParameterEfficientModule):
    """Only the LoRA matrices train; the base UNet and text encoder stay frozen."""

    artefact = "lora"

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
        train_text_encoder: bool = False,
        text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj"),
        **base_kwargs,
    ):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config, **base_kwargs)
        self.lora_train_text_encoder = train_text_encoder
        # alpha = rank gives scale 1, diffusers' examples' default.
        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha or rank,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=list(target_modules),
            )
        )
        if train_text_encoder:
            text_encoder.add_adapter(
                LoraConfig(
                    r=rank,
                    lora_alpha=alpha or rank,
                    lora_dropout=dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(text_encoder_target_modules),
                )
            )

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen base modules stay in eval mode; LoRA dropout needs train mode.
        self.unet.train(mode)
        if self.lora_train_text_encoder:
            self.text_encoder.train(mode)
        return self

    def save_weights(self, folder: Path) -> None:
        text_layers, text_metadata = None, None
        if self.lora_train_text_encoder:
            text_layers = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(self.text_encoder)
            )
            text_metadata = self.text_encoder.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            save_directory=folder,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)),
            text_encoder_lora_layers=text_layers,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_metadata,
            safe_serialization=True,
        )
