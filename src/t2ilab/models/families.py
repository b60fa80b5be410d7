"""What each backbone family has, known before any weights load: what t2ilab.compat decides
from whether a method runs on a model, and what the refusals say."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    text: bool  # prompts condition the denoiser (else class labels)
    textual_inversion: bool  # its pipeline loads textual-inversion embeddings
    text_lora: bool  # its pipeline's LoRA loader takes text-encoder LoRA
    cross_attention: bool  # its transformer blocks attend to a condition
    resblocks: bool  # its denoiser has ResBlocks (a UNet)
    objective: str = "ddpm"  # what its pipeline samples: ddpm (beta schedules) or flow


FAMILIES = {
    "sd": Family("sd", "a Stable Diffusion UNet with CLIP text", True, True, True, True, True),
    "sdxl": Family(
        "sdxl", "an SDXL UNet with two CLIP text encoders", True, True, True, True, True
    ),
    "pixart": Family(
        "pixart", "a PixArt transformer with T5 text", True, False, False, True, False
    ),
    "dit": Family("dit", "a class-conditional DiT (no text)", False, False, False, False, False),
    "sd3": Family(
        "sd3",
        "an SD3 MM-DiT with CLIP-L, CLIP-G and T5 text",
        text=True,
        textual_inversion=False,  # StableDiffusion3Pipeline has no textual-inversion loader
        text_lora=True,  # the CLIP encoders' (the loader takes no T5 LoRA)
        cross_attention=True,  # joint attention: the image tokens attend to the text
        resblocks=False,
        objective="flow",
    ),
    "flux": Family(
        "flux",
        "a Flux MM-DiT with CLIP-L and T5 text",
        text=True,
        textual_inversion=True,  # FluxPipeline loads embeddings into CLIP-L
        text_lora=True,  # the CLIP encoders' (the loader takes no T5 LoRA)
        cross_attention=True,  # joint attention: the image tokens attend to the text
        resblocks=False,
        objective="flow",
    ),
}


def family_of(model_cfg) -> Family:
    """The family a model config names (model.family; SD when it names none)."""
    from t2ilab.errors import UserError

    name = str(model_cfg.get("family") or "sd")
    if name not in FAMILIES:
        raise UserError(f"model.family={name} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
