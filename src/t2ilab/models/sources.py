"""Where a backbone's components come from: a hub id, a local diffusers folder
(`model.pretrained`), or local folders holding single parts (`model.components.NAME`).
Shared by every model family (`loading` for Stable Diffusion, `transformers` for PixArt / DiT);
imports neither."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from t2ilab.errors import UserError

log = logging.getLogger(__name__)


def plain(cfg: Any) -> Any:
    """A model config as plain containers (a resolved DictConfig, or `cfg` as it is)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def is_local_reference(pretrained: str) -> bool:
    """A path the user meant as a folder (rather than a hub id like `org/name`)."""
    p = Path(pretrained).expanduser()
    return (
        p.exists() or pretrained.startswith(("/", "./", "../", "~")) or pretrained.count("/") != 1
    )


def pretrained_source(model_cfg: dict[str, Any]) -> str:
    """model.pretrained as `from_pretrained` takes it: a hub id, or an expanded local path."""
    pretrained = model_cfg["pretrained"]
    return str(Path(pretrained).expanduser()) if is_local_reference(pretrained) else pretrained


def component_folder(model_cfg: dict[str, Any], name: str) -> Path:
    """model.components.NAME: a local folder holding one pretrained part (e.g. a VAE)."""
    folder = Path(model_cfg["components"][name]).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(
            f"model.components.{name}={folder} is not a saved model folder (no config.json): "
            "point it at a folder written by save_pretrained()"
        )
    return folder


def pretrained_parts(
    model_cfg: dict[str, Any], classes: dict[str, Any], scheduler_class: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each part `name` as `classes[name].from_pretrained(<model.pretrained>, subfolder=name)`
    (revision and variant as the config says), and the scheduler's config. A text encoder loads
    as the class its config names (the toy Flux keeps a CLIP tower in T5's slot), `classes`
    giving the class for a config that names none."""
    source, kw = pretrained_source(model_cfg), {"revision": model_cfg.get("revision")}
    weights = dict(kw, variant=model_cfg.get("variant"))
    log.info("loading %s", source)
    parts = {
        name: load_text_encoder(source, default=cls, subfolder=name, **weights)
        if name.startswith("text_encoder")
        else cls.from_pretrained(source, subfolder=name, **weights)
        for name, cls in classes.items()
    }
    return parts, dict(scheduler_class.load_config(source, subfolder="scheduler", **kw))


def load_text_encoder(source, default=None, **kwargs):
    """A text encoder as the class its config names, as diffusers loads a pipeline's parts:
    T5EncoderModel for PixArt-alpha or Flux (AutoModel would build a T5 with a decoder),
    CLIPTextModel for the toy models' text tower in T5's place. `default` (T5EncoderModel when
    None) is the class for a config that names none."""
    config = AutoConfig.from_pretrained(
        source, subfolder=kwargs.get("subfolder", ""), revision=kwargs.get("revision")
    )
    names = getattr(config, "architectures", None)
    cls = getattr(transformers, names[0]) if names else (default or transformers.T5EncoderModel)
    return cls.from_pretrained(source, **kwargs)


def load_component(model_cfg: dict[str, Any], name: str):
    """The part `name` from its model.components folder: a VAE, or a text encoder."""
    folder = component_folder(model_cfg, name)
    if name == "vae":
        return AutoencoderKL.from_pretrained(folder)
    return load_text_encoder(folder)


def tiny_parts(model_cfg: dict[str, Any], builders: dict[str, Any]) -> dict[str, Any]:
    """Each part `name` built by `builders[name](model.tiny[name])` in this order under the
    config's seed (the same weights on any machine), or loaded from model.components.NAME when
    the config names a folder for it (a new denoiser over pretrained parts, as the toy models are
    pretrained); in eval mode as from_pretrained returns them."""
    tiny, components = model_cfg["tiny"], model_cfg.get("components") or {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", 0)))
        parts = {
            name: load_component(model_cfg, name) if components.get(name) else build(tiny[name])
            for name, build in builders.items()
        }
    for part in parts.values():
        part.eval()
    return parts
