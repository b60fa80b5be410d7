"""Which method, model and data run together, decided before any weights load.

Each method's LightningModule says why it cannot run on a backbone family
(`DiffusionModule.refusal`, from `t2ilab.models.families`); the data says whether it gives
prompts or class labels. Any pairing that cannot work is refused in one line that says why and
what to use instead. The composition matrix (methods x tiny backbones) is read from the same
rules: the README's table and the matrix test both come from `matrix()`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError
from t2ilab.models.families import FAMILIES, Family, family_of

# The composition matrix: rows are the methods, columns the tiny backbones of every family.
MATRIX_METHODS = ("dreambooth", "lora", "textual_inversion", "adapter")
MATRIX_MODELS = (
    "tiny_sd",
    "tiny_sdxl",
    "tiny_pixart",
    "tiny_pixart_sigma",
    "tiny_dit",
    "tiny_sd3",
    "tiny_flux",
)


def conf_dir() -> Path | None:
    """The config folder: T2ILAB_ROOT (set by the entry points) or the checkout of this package."""
    roots = [os.environ.get("T2ILAB_ROOT"), Path(__file__).resolve().parents[2]]
    for root in filter(None, roots):
        if (Path(root) / "conf" / "method").is_dir():
            return Path(root) / "conf"
    return None


def method_config(name: str, folder: Path | None = None) -> DictConfig:
    """conf/method/<name>.yaml merged over the methods it extends (its defaults list)."""
    path = (folder or conf_dir()) / "method" / f"{name}.yaml"
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for parent in node.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            merged = OmegaConf.merge(merged, method_config(parent, path.parent.parent))
    node = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    return OmegaConf.merge(merged, node)


def module_class_of(method_cfg) -> type:
    return hydra.utils.get_class(method_cfg.module._target_)


def data_gives_labels(data_cfg) -> bool:
    target = str(data_cfg.get("_target_", ""))
    return target.endswith(("ClassFolderDataModule", "ClassDataModule"))


def refusal(family: Family, method_cfg, data_cfg=None, module_class=None) -> str | None:
    """Why this method (with this data) cannot run on a backbone of `family`, or None."""
    module_class = module_class or module_class_of(method_cfg)
    reason = module_class.refusal(family, method_cfg)
    if reason or data_cfg is None:
        return reason
    if data_gives_labels(data_cfg) and family.text:
        return (
            f"the data gives class labels; {family.description} is conditioned on prompts: use "
            "data=dreambooth or data=captioned"
        )
    if not data_gives_labels(data_cfg) and not family.text:
        return (
            f"the data gives prompts; {family.description} takes class labels: use "
            "data=class_folder or data=toy_world_classes"
        )
    if method_cfg.get("prior_preservation") and not family.text:
        return (
            f"prior preservation generates class images from a prompt; {family.description} "
            "has none: set method.prior_preservation=false"
        )
    return None


def methods_for(family: str, folder: Path | None = None) -> list[str]:
    """The method configs that run on this family (with data that fits it)."""
    folder = folder or conf_dir()
    if folder is None:
        return []
    return [
        p.stem
        for p in sorted((folder / "method").glob("*.yaml"))
        if refusal(FAMILIES[family], method_config(p.stem, folder)) is None
    ]


def check_method_fits_model(cfg: DictConfig, module_class) -> None:
    """One line when the method, model and data cannot work together, with what would run."""
    family = family_of(cfg.model)
    reason = refusal(family, cfg.method, cfg.data, module_class)
    if reason:
        method = cfg.method.get("name") or module_class.__name__
        raise UserError(f"method={method} on model={cfg.model.name}: {reason}")


def check_data_fits_model(cfg: DictConfig, datamodule) -> None:
    """What only the data knows (its classes) against the model, before weights load; and
    model.init_from, which only PixArt's stages take."""
    from t2ilab.models.stages import init_from_source

    family = family_of(cfg.model)
    if init_from_source(cfg) is not None and family.name != "pixart":
        raise UserError(
            f"model.init_from is for PixArt stages; model {cfg.model.name} is {family.description}"
        )
    classes = datamodule.classes
    if family.name == "dit" and classes is not None and not cfg.model.pretrained:
        limit = int(cfg.model.tiny.transformer.num_embeds_ada_norm)
        if len(classes) > limit:
            raise UserError(
                f"{len(classes)} classes in data.train_dir but the DiT has {limit} class "
                f"embeddings: set model.tiny.transformer.num_embeds_ada_norm={len(classes)}"
            )


def matrix_data(model: str) -> str:
    """The data a matrix cell trains on: the subject with prompts, or class labels."""
    model_cfg = OmegaConf.load(conf_dir() / "model" / f"{model}.yaml")
    return "dreambooth" if family_of(model_cfg).text else "toy_world_classes"


def matrix_method(method: str, model: str) -> str:
    """The row's method on this column: the full-training row is DreamBooth where there is
    text, and class-conditional full training on a DiT."""
    if method == "dreambooth" and matrix_data(model) == "toy_world_classes":
        return "full"
    return method


def matrix_overrides(method: str, model: str) -> list[str]:
    """The command line of a matrix cell: the method on the model with the data it takes, prior
    preservation wherever there is text."""
    data = matrix_data(model)
    overrides = [f"model={model}", f"method={matrix_method(method, model)}", f"data={data}"]
    if data == "dreambooth":
        overrides.append("method.prior_preservation=true")
        if method == "textual_inversion":  # the prompts name the word it learns
            overrides.append("data.identifier=${method.placeholder_token}")
        return overrides
    return overrides + ["method.prior_preservation=false", "data.batch_size=2"]


def matrix() -> dict[tuple[str, str], str | None]:
    """(method, model) -> the refusal, or None where the cell runs."""
    cells = {}
    folder = conf_dir()
    for model in MATRIX_MODELS:
        model_cfg = OmegaConf.load(folder / "model" / f"{model}.yaml")
        data_cfg = OmegaConf.load(folder / "data" / f"{matrix_data(model)}.yaml")
        for method in MATRIX_METHODS:
            method_cfg = method_config(matrix_method(method, model), folder)
            if matrix_data(model) == "toy_world_classes":
                method_cfg.prior_preservation = False
            cells[method, model] = refusal(family_of(model_cfg), method_cfg, data_cfg)
    return cells


MATRIX_BEGIN = "<!-- composition matrix: python -m t2ilab.compat --markdown -->"
MATRIX_END = "<!-- end of composition matrix -->"


def matrix_markdown() -> str:
    """The README's table of what runs where, generated from `matrix()`."""
    cells = matrix()
    lines = [
        "| method | " + " | ".join(f"`{m}`" for m in MATRIX_MODELS) + " |",
        "| --- |" + " --- |" * len(MATRIX_MODELS),
    ]
    for method in MATRIX_METHODS:
        row = []
        for model in MATRIX_MODELS:
            reason = cells[method, model]
            shown = matrix_method(method, model)
            if reason is None:
                row.append("runs" if shown == method else f"runs as `method={shown}`")
            else:
                row.append(f"refused: {reason}")
        lines.append(f"| `{method}` | " + " | ".join(row) + " |")
    return "\n".join([MATRIX_BEGIN, *lines, MATRIX_END])


def main() -> None:
    parser = argparse.ArgumentParser(description="What runs on which backbone.")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    args = parser.parse_args()
    if args.markdown:
        print(matrix_markdown())
    else:
        for (method, model), reason in matrix().items():
            print(f"{method:>18} x {model:<18} {reason or 'runs'}")


if __name__ == "__main__":
    main()
