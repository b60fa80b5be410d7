"""Which method runs on which backbone family, decided before any weights load.

A method's LightningModule names the model families whose parts it trains
(`DiffusionModule.backbone_families`). Any other pairing is refused in one line that names the
methods that do run on the chosen model and the models the chosen method runs on, both read
from the config folders, so the advice stays true as configs are added.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError

FAMILY_DESCRIPTIONS = {
    "sd": "a Stable Diffusion UNet with CLIP text",
    "pixart": "a PixArt transformer with T5 text",
    "dit": "a class-conditional DiT (no text)",
}


def model_family_of(model_cfg) -> str:
    return str(model_cfg.get("family", "sd"))


def conf_dir() -> Path | None:
    """The config folder: T2ILAB_ROOT (set by the entry points) or the checkout of this package."""
    roots = [os.environ.get("T2ILAB_ROOT"), Path(__file__).resolve().parents[2]]
    for root in filter(None, roots):
        if (Path(root) / "conf" / "method").is_dir():
            return Path(root) / "conf"
    return None


def _module_target(path: Path) -> str | None:
    """The method's module class, following its defaults to the method it extends."""
    node = OmegaConf.load(path)
    target = OmegaConf.select(node, "module._target_")
    for parent in reversed(list(node.get("defaults") or [])):
        if target is None and isinstance(parent, str) and parent != "_self_":
            target = _module_target(path.with_name(f"{parent}.yaml"))
    return target


def _families_of_method(path: Path) -> tuple[str, ...]:
    target = _module_target(path)
    if target is None:
        return ()
    return tuple(getattr(hydra.utils.get_class(target), "backbone_families", ()))


def methods_for(family: str, folder: Path | None = None) -> list[str]:
    """The method configs whose module trains this family."""
    folder = folder or conf_dir()
    if folder is None:
        return []
    return [
        p.stem
        for p in sorted((folder / "method").glob("*.yaml"))
        if family in _families_of_method(p)
    ]


def models_for(families: tuple[str, ...], folder: Path | None = None) -> list[str]:
    """The model configs of these families."""
    folder = folder or conf_dir()
    if folder is None:
        return []
    return [
        p.stem
        for p in sorted((folder / "model").glob("*.yaml"))
        if model_family_of(OmegaConf.load(p)) in families
    ]


def check_method_fits_model(cfg: DictConfig, module_class) -> None:
    """One line when the method cannot train the model's parts, with what would run."""
    family = model_family_of(cfg.model)
    families = tuple(getattr(module_class, "backbone_families", ()))
    if family in families:
        return
    method = cfg.method.get("name") or module_class.__name__
    wanted = " or ".join(FAMILY_DESCRIPTIONS.get(f, f) for f in families) or "another backbone"
    methods = [m for m in methods_for(family) if m != method]
    models = models_for(families)
    instead = []
    if methods:
        instead.append(f"method={'|'.join(methods)} on this model")
    if models:
        instead.append(f"model={'|'.join(models)} for method={method}")
    raise UserError(
        f"method={method} trains {wanted}; model={cfg.model.name} is "
        f"{FAMILY_DESCRIPTIONS.get(family, family)}: use "
        + (" or ".join(instead) if instead else "a model of the method's family")
    )
