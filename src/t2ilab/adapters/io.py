"""Adapters on disk, apart from the base weights: a safetensors file + a JSON sidecar.

    export/t2ilab_adapters.safetensors   {block_key.down.weight: ..., ...}  (float32)
    export/t2ilab_adapters.json          {"config": AdapterConfig, "blocks": [module names], ...}

`path` is either a folder (the two standard names inside) or a `.safetensors` file (the sidecar
is the same path with `.json`). Loading re-attaches the adapters by config to a fresh diffusers
denoiser (UNet, PixArt / DiT transformer, or a pipeline's) of the same architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from t2ilab.adapters.attach import AdapterSet, _denoiser_name, _resolve_denoiser, attach_adapters
from t2ilab.adapters.config import AdapterConfig
from t2ilab.errors import UserError
from t2ilab.utils.atomic import atomic_file, write_json_atomic

ADAPTER_WEIGHTS_NAME = "t2ilab_adapters.safetensors"
ADAPTER_CONFIG_NAME = "t2ilab_adapters.json"
FORMAT = "t2ilab.adapters"
VERSION = 1


def adapter_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, JSON sidecar) for a folder, a `.safetensors` file or its `.json` sidecar."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    return path / ADAPTER_WEIGHTS_NAME, path / ADAPTER_CONFIG_NAME


def save_adapters(
    adapter_set: AdapterSet, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the adapters' weights and config; returns the weights file. Each file is written to a
    temp name and renamed, so a crash never leaves a half-written one. Existing files are kept
    (FileExistsError) unless `overwrite`."""
    weights, sidecar = adapter_paths(path)
    if not overwrite:
        for p in (weights, sidecar):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it.")
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu").contiguous() for k, v in adapter_set.adapters.state_dict().items()
    }
    with atomic_file(weights) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "t2ilab": FORMAT})
    write_json_atomic(
        sidecar,
        {
            "format": FORMAT,
            "version": VERSION,
            "weights": weights.name,
            "config": adapter_set.config.to_dict(),
            "blocks": adapter_set.block_names,
            "num_parameters": adapter_set.num_parameters(),
        },
    )
    return weights


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """(AdapterConfig, the whole sidecar) of saved adapters, without touching any weights."""
    weights, sidecar = adapter_paths(path)
    for p in (weights, sidecar):
        if not p.is_file():
            raise UserError(f"No saved adapters at {path}: {p} is missing.")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{sidecar} is not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{sidecar} is not a t2ilab adapter sidecar (format != {FORMAT!r}).")
    return AdapterConfig.from_dict(meta["config"]), meta


def load_adapters(
    unet_or_pipeline: Any, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> AdapterSet:
    """Attach the adapters saved at `path` to a (fresh) denoiser (a UNet, a PixArt / DiT
    transformer, or a pipeline's `.unet` / `.transformer`) and load their weights. It must have
    the blocks they were trained on; otherwise nothing stays attached and a UserError says what
    differs."""
    unet = _resolve_denoiser(unet_or_pipeline)
    what = _denoiser_name(unet)
    config, meta = read_adapter_config(path)
    weights, _ = adapter_paths(path)
    adapter_set = attach_adapters(unet, config, dtype=dtype)
    try:
        if adapter_set.block_names != list(meta.get("blocks", adapter_set.block_names)):
            missing = sorted(set(meta["blocks"]) - set(adapter_set.block_names))
            extra = sorted(set(adapter_set.block_names) - set(meta["blocks"]))
            raise UserError(
                f"Adapters at {path} were trained on other {what} blocks: missing here "
                f"{missing[:3]}, not in the file {extra[:3]}."
            )
        state = load_file(str(weights))
        try:
            adapter_set.adapters.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(
                f"Adapters at {path} do not fit this {what} (a different architecture?): "
                f"{' '.join(str(e).split())[:400]}"
            ) from None
    except BaseException:
        adapter_set.remove()
        raise
    return adapter_set
