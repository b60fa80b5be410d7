"""A short name for a set of weights, so that files a model made can say which model made them.

Class images are generated once and reused: when the weights behind a model name change (a
new shipped toy model, another fine-tune in the same folder), images from the old weights must
not pass as the new model's prior."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from torch import nn

# Fine-tuning moves every weight, so a few values per tensor tell two sets of weights apart.
VALUES_PER_TENSOR = 16


def weights_fingerprint(parts: Mapping[str, nn.Module]) -> str:
    """12 hex digits from every tensor's name, shape and first values (as float32). Weights are
    loaded in float32 here; the same weights cast to fp16 count as others (so do their images)."""
    digest = hashlib.sha256()
    for part, module in sorted(parts.items()):
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{part}.{key}:{tuple(tensor.shape)};".encode())
            if tensor.is_floating_point():
                head = tensor.detach().flatten()[:VALUES_PER_TENSOR].float()
            else:
                head = tensor.detach().flatten()[:VALUES_PER_TENSOR].long()
            digest.update(head.cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
