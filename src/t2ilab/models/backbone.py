"""The `model` axis: a backbone family's components and what only the family knows.

A `Backbone` holds a denoiser, a VAE, its text encoders and tokenizers (none for a
class-conditional DiT) and the training schedule, and it knows how to turn a batch into the
denoiser's condition, run the denoiser, build and save its pipeline, where LoRA goes and how a
LoRA file is written in the family's standard format. The methods (t2ilab.modules) train any
backbone through this interface alone, so a method is written once for every family.

The parts are `nn.Module`s that a LightningModule registers under their pipeline names (`unet`,
`transformer`, `vae`, `text_encoder`, `text_encoder_2`); once `bind(owner)` has run, the backbone
reads them from the owner, so a strategy that wraps or moves them (FSDP, device moves) is seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

PEFT_CONFIG_FILE = "adapter_config.json"  # peft's own names: PeftModel.from_pretrained reads them
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


class Backbone:
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    denoiser_name: ClassVar[str] = "unet"
    # Latent pixels per token side (transformers patchify): an image's token count for the
    # resolution-dependent flow shift.
    patch_size: ClassVar[int] = 1
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    tokenizer_names: ClassVar[tuple[str, ...]] = ()
    # peft target modules for LoRA on the denoiser (diffusers' attention projections).
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    text_lora_target_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # The text encoders LoRA may train: those the pipeline's LoRA loader takes (None: all).
    lora_text_encoder_names: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, scheduler_config: dict[str, Any], **parts: Any):
        object.__setattr__(self, "_parts", dict(parts))
        object.__setattr__(self, "_owner", None)
        self.scheduler_config = dict(scheduler_config)

    # --- the parts ---------------------------------------------------------------------------

    def part_names(self) -> tuple[str, ...]:
        return (self.denoiser_name, "vae", *self.text_encoder_names)

    def modules(self) -> dict[str, nn.Module]:
        """The nn.Modules a LightningModule registers, under their pipeline names."""
        return {name: getattr(self, name) for name in self.part_names()}

    def bind(self, owner: nn.Module) -> None:
        """Read the modules from `owner` (which registered them) from now on."""
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("_parts", {})
        if name not in parts:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        owner = self.__dict__.get("_owner")
        if owner is not None and name in self.part_names():
            return getattr(owner, name)
        return parts[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_parts", {}):
            self._parts[name] = value
            owner = self.__dict__.get("_owner")
            if owner is not None and name in self.part_names():
                setattr(owner, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.text_encoder_names]

    def takes_text_lora(self, name: str) -> bool:
        """Whether the pipeline's LoRA loader takes LoRA on the text encoder `name`."""
        return self.lora_text_encoder_names is None or name in self.lora_text_encoder_names

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, n) for n in self.tokenizer_names]

    @property
    def embedding_encoders(self) -> list[tuple[nn.Module, Any]]:
        """(text encoder, tokenizer) pairs whose token embeddings textual inversion trains: those
        over CLIP's vocabulary (all here; Flux's T5 reads the placeholder as text)."""
        return list(zip(self.text_encoders, self.tokenizers, strict=True))

    @property
    def has_text(self) -> bool:
        return bool(self.text_encoder_names)

    def module_kwargs(self) -> dict[str, Any]:
        """What a method's LightningModule is built from."""
        return {"backbone": self}

    # --- what each family provides -----------------------------------------------------------

    def encode_condition(self, batch: dict[str, Any], text_grad: bool = False) -> Any:
        """The denoiser's condition for a batch (prompt states, masks, pooled embeddings, labels);
        `text_grad`: gradients flow into the text encoders (some of them train)."""
        raise NotImplementedError

    def cached_condition(self, condition: Any) -> dict[str, torch.Tensor]:
        """The condition as the named tensors a feature cache stores and `encode_condition`
        reads back from a batch (SD: prompt_embeds)."""
        return {"prompt_embeds": condition}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: Any):
        """The denoiser's prediction (epsilon, v or sample, as the schedule says)."""
        raise NotImplementedError

    def pipeline(self, scheduler):
        """A diffusers pipeline over the current weights, sampling with `scheduler`."""
        raise NotImplementedError

    def save_pipeline(self, folder: str | Path, scheduler) -> None:
        self.pipeline(scheduler).save_pretrained(folder, safe_serialization=True)
        forget_load_paths(folder)

    def save_lora(
        self,
        folder: Path,
        denoiser_layers: dict[str, torch.Tensor],
        denoiser_config: dict[str, Any],
        text_layers: list[dict[str, torch.Tensor] | None],
        text_configs: list[dict[str, Any] | None],
    ) -> None:
        """LoRA weights in the family's standard format. Families whose pipelines have no LoRA
        loader (PixArt, DiT in diffusers 0.42) write peft's format for the denoiser, which
        `PeftModel.from_pretrained(pipe.transformer, folder)` loads."""
        if any(layers for layers in text_layers):
            raise ValueError(f"{type(self).__name__} saves no text-encoder LoRA")
        save_peft_adapter(folder, denoiser_layers, denoiser_config)


def forget_load_paths(folder: str | Path) -> None:
    """Drop `_name_or_path` from the config.json of a saved model or of each component of a
    saved pipeline: diffusers records where a model was loaded from and writes it back on save,
    so an export would carry this machine's folders (model_index.json already drops it)."""
    folder = Path(folder)
    for config_file in [*folder.glob("config.json"), *folder.glob("*/config.json")]:
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_peft_adapter(
    folder: Path, layers: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """peft's on-disk layout of a model's one adapter: keys under base_model.model. as
    PeftModel.save_pretrained writes them, and the LoraConfig as adapter_config.json."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        f"base_model.model.{key}": value.detach().cpu().contiguous()
        for key, value in layers.items()
    }
    save_file(state, folder / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
