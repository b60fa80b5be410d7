"""Lightning strategies built from YAML: FSDP needs module classes, configs hold their names."""

from __future__ import annotations

import importlib
from typing import Any

from t2ilab.errors import UserError


def import_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(
            f"trainer.strategy: cannot import module class {dotted!r}: give a full dotted path "
            "such as diffusers.models.attention.BasicTransformerBlock"
        ) from None


def fsdp_strategy(
    wrap_classes: list[str],
    activation_checkpointing: list[str] | None = None,
    state_dict_type: str = "full",
    cpu_offload: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    **kwargs: Any,
):
    """An FSDPStrategy wrapping each listed block class (ModuleWrapPolicy) and, optionally,
    checkpointing the activations of the listed classes."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if state_dict_type not in ("full", "sharded"):
        raise UserError(
            f"trainer.strategy.state_dict_type={state_dict_type!r}: use full or sharded"
        )
    wrap = {import_class(name) for name in wrap_classes}
    checkpointing = {import_class(name) for name in activation_checkpointing or []}
    return FSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy(wrap),
        activation_checkpointing_policy=ModuleWrapPolicy(checkpointing) if checkpointing else None,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        sharding_strategy=sharding_strategy,
        **kwargs,
    )
