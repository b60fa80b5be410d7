"""Adapters of the Xiang et al. 2023 design space on a frozen denoiser (t2ilab.adapters): the
BasicTransformerBlocks of SD, SDXL and PixArt (and DiT's, without cross-attention), the
joint-attention blocks of SD3 and Flux, or a UNet's ResBlocks."""

from __future__ import annotations

from pathlib import Path

from t2ilab.adapters import (
    AdapterConfig,
    InvalidAdapterPair,
    attach_adapters,
    missing_parts,
    save_adapters,
)
from t2ilab.errors import SkipRun
from t2ilab.models.families import Family
from t2ilab.modules.parameter_efficient import ParameterEfficientModule

ADAPTERS_FILE = "adapters.safetensors"  # + adapters.json, beside it in the export


class AdapterModule(ParameterEfficientModule):
    """One adapter per transformer block (or ResBlock); only the adapters train."""

    artefact = "adapters"

    @classmethod
    def check_method(cls, method_cfg) -> None:
        """Before any weights load: an impossible position pair skips the run (not an error)."""
        try:
            adapter_config(method_cfg)
        except InvalidAdapterPair as err:
            raise SkipRun(str(err)) from None

    @classmethod
    def refusal(cls, family: Family, method_cfg) -> str | None:
        reason = missing_parts(
            str(method_cfg.input_position),
            str(method_cfg.output_position),
            has_cross_attention=family.cross_attention,
            has_resblocks=family.resblocks,
        )
        if reason:
            return reason
        return super().refusal(family, method_cfg)

    def __init__(
        self,
        backbone,
        input_position: str = "CA_out",
        output_position: str = "FFN_in",
        rank: int | None = None,
        activation: str = "relu",
        scale: float = 1.0,
        block_filter: str | None = None,
        **kw,
    ):
        super().__init__(backbone, **kw)
        config = AdapterConfig(
            input_position=input_position,
            output_position=output_position,
            rank=rank,
            activation=activation,
            scale=scale,
            block_filter=block_filter,
        )
        # A submodule of this LightningModule (not of the denoiser): it trains, checkpoints and
        # moves with the module, while the denoiser's own state dict stays the base model's.
        self.adapters = attach_adapters(self.denoiser, config)
        self.adapters.requires_grad_(True)

    def save_weights(self, folder: Path) -> None:
        save_adapters(self.adapters, Path(folder) / ADAPTERS_FILE)


def adapter_config(method_cfg) -> AdapterConfig:
    return AdapterConfig(
        input_position=method_cfg.input_position,
        output_position=method_cfg.output_position,
        rank=method_cfg.get("rank"),
        activation=method_cfg.get("activation", "relu"),
        scale=float(method_cfg.get("scale", 1.0)),
        block_filter=method_cfg.get("block_filter"),
    )
