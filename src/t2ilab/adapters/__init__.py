"""The adapter design space of Xiang et al. 2023 on an unmodified diffusers denoiser.

    cfg = AdapterConfig(input_position="CA_out", output_position="FFN_in")   # the paper's best
    adapters = attach_adapters(unet, cfg)                  # hooks; adapters start as identity
    freeze_unet_except_adapters(unet, adapters)            # optimizer gets adapters.parameters()
    save_adapters(adapters, "export/")                     # safetensors + JSON sidecar
    load_adapters(pipeline, "export/")                     # fresh UNet / pipeline, for inference

The denoiser may also be a PixArt or DiT transformer (adaLN blocks; `hook_points` per block);
`missing_parts` refuses, before weights load, pairs a denoiser lacks (CA_* on DiT, Res_* on a
transformer).

Positions and their merges: `t2ilab.adapters.positions`; hooks: `t2ilab.adapters.attach`.
"""

from t2ilab.adapters.attach import (
    AdapterSet,
    HookPoints,
    attach_adapters,
    block_key,
    count_adapter_parameters,
    freeze_unet_except_adapters,
    hook_points,
)
from t2ilab.adapters.config import ACTIVATIONS, DEFAULT_RANK, SCALES, AdapterConfig
from t2ilab.adapters.io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_adapters,
    save_adapters,
)
from t2ilab.adapters.modules import ResBlockAdapter, TransformerAdapter
from t2ilab.adapters.positions import (
    INPUT_POSITIONS,
    OUTPUT_MERGES,
    OUTPUT_POSITIONS,
    PAPER_PAIRS,
    InvalidAdapterPair,
    missing_parts,
    valid_pairs,
    validate_pair,
    validity_matrix,
)

__all__ = [
    "ACTIVATIONS",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_RANK",
    "INPUT_POSITIONS",
    "OUTPUT_MERGES",
    "OUTPUT_POSITIONS",
    "PAPER_PAIRS",
    "SCALES",
    "AdapterConfig",
    "AdapterSet",
    "HookPoints",
    "InvalidAdapterPair",
    "ResBlockAdapter",
    "TransformerAdapter",
    "attach_adapters",
    "block_key",
    "count_adapter_parameters",
    "freeze_unet_except_adapters",
    "hook_points",
    "load_adapters",
    "missing_parts",
    "save_adapters",
    "valid_pairs",
    "validate_pair",
    "validity_matrix",
]
