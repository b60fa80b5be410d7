"""LoRA (Hu et al. 2021) through peft on the denoiser's attention projections, optionally on the
text encoders, saved in the backbone's standard format: diffusers' pytorch_lora_weights
.safetensors for SD and SDXL (stock `pipe.load_lora_weights(export)`), peft's adapter folder for
PixArt and DiT, whose pipelines have no LoRA loader (`PeftModel.from_pretrained`)."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from t2ilab.models.families import Family
from t2ilab.modules.parameter_efficient import ParameterEfficientModule


def add_lora(model, config: LoraConfig) -> None:
    """The adapter as diffusers' `add_adapter` adds it, also on models without that method."""
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
        return
    inject_adapter_in_model(config, model, adapter_name="default")
    model.peft_config = {"default": config}


class LoRAModule(ParameterEfficientModule):
    """Only the LoRA matrices train; the base denoiser and text encoders stay frozen."""

    artefact = "lora"

    @classmethod
    def refusal(cls, family: Family, method_cfg) -> str | None:
        if method_cfg.get("train_text_encoder") and family.text and not family.text_lora:
            return (
                f"LoRA on the text encoder: {family.description} has no stock loader for it; "
                "set method.train_text_encoder=false (LoRA on the transformer)"
            )
        return super().refusal(family, method_cfg)

    def __init__(
        self,
        backbone,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: tuple[str, ...] | None = None,
        train_text_encoder: bool = False,
        text_encoder_target_modules: tuple[str, ...] | None = None,
        **kw,
    ):
        super().__init__(backbone, **kw)
        self.lora_train_text_encoder = train_text_encoder

        def config(targets) -> LoraConfig:
            # alpha = rank gives scale 1, diffusers' examples' default.
            return LoraConfig(
                r=rank,
                lora_alpha=alpha or rank,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=list(targets),
            )

        add_lora(self.denoiser, config(target_modules or backbone.lora_target_modules))
        if train_text_encoder:
            targets = text_encoder_target_modules or backbone.text_lora_target_modules
            for name in self.text_lora_names:
                add_lora(getattr(backbone, name), config(targets))

    @property
    def text_lora_names(self) -> list[str]:
        """The text encoders with LoRA: those the pipeline's loader takes (SD3: the two CLIPs;
        Flux: CLIP-L; T5 stays frozen), when text-encoder LoRA is on."""
        if not self.lora_train_text_encoder:
            return []
        names = self.backbone.text_encoder_names
        return [n for n in names if self.backbone.takes_text_lora(n)]

    def save_weights(self, folder: Path) -> None:
        text_layers, text_configs = [], []
        for name in self.backbone.text_encoder_names:
            encoder = getattr(self.backbone, name)
            trained = name in self.text_lora_names
            text_layers.append(
                convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
                if trained
                else None
            )
            text_configs.append(encoder.peft_config["default"].to_dict() if trained else None)
        layers = get_peft_model_state_dict(self.denoiser)
        if self.backbone.family in ("sd", "sdxl"):
            layers = convert_state_dict_to_diffusers(layers)
        self.backbone.save_lora(
            folder,
            layers,
            self.denoiser.peft_config["default"].to_dict(),
            text_layers,
            text_configs,
        )
