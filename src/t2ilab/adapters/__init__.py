"""The adapter design space of Xiang et al. 2023 on an unmodified diffusers UNet.

    cfg = AdapterConfig(input_position="CA_out", output_position="FFN_in")   # the paper's best
    adapters = attach_adapters(unet, cfg)                  # hooks; adapters start as identity
    freeze_unet_except_adapters(unet, adapters)            # optimizer gets adapters.parameters()
    save_adapters(adapters, "export/")                     # safetensors + JSON sidecar
    load_adapters(pipeline, "export/")                     # fresh UNet / pipeline, for inference

Positions and their merges: `t2ilab.adapters.positions`; hooks: `t2ilab.adapters.attach`.
"""

from t2ilab.adapters.attach import (
    AdapterSet,
    attach_adapters,
    block_key,
    count_adapter_parameters,
    freeze_unet_except_adapters,
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
    "InvalidAdapterPair",
    "ResBlockAdapter",
    "TransformerAdapter",
    "attach_adapters",
    "block_key",
    "count_adapter_parameters",
    "freeze_unet_except_adapters",
    "load_adapters",
    "save_adapters",
    "valid_pairs",
    "validate_pair",
    "validity_matrix",
]
