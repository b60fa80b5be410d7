"""What `conf/scale/<model>.yaml` changed: it applies after the experiment (CPU-sized budgets for
the tiny and toy models), so a run says which of the experiment's values it replaced.

Exact by construction: the config is composed with the run's command line, with and without
`~scale`, and the two are compared key by key (values as written, before interpolation). A key
the command line sets is the same in both, so it is never listed: the command line wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from t2ilab.results import override_key

_UNSET = object()


def scale_changes(cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (value without the scale file, value with it)} for every key the scale file of
    this run changed; empty when no scale file applies or it changes nothing."""
    hydra_cfg = HydraConfig.get()
    choice = hydra_cfg.runtime.choices.get("scale")
    if not choice or not _may_exist(hydra_cfg, f"scale/{choice}.yaml"):
        return {}  # `optional scale: ${model}` with no file for this model (sd15, sd21, ...)
    order = _file_order(hydra_cfg, f"scale/{choice}.yaml")
    overrides = list(hydra_cfg.overrides.task)
    others = [o for o in overrides if override_key(o) != "scale"]  # e.g. scale=tiny_sd
    without = _compose(hydra_cfg, others + ["~scale"])
    new = _leaves(OmegaConf.to_container(_compose(hydra_cfg, overrides), resolve=False))
    old = _leaves(OmegaConf.to_container(without, resolve=False))
    changed = [key for key in new if old.get(key, _UNSET) != new[key]]
    changed.sort(key=lambda k: order.index(k) if k in order else len(order))  # as in the file
    # Shown as they resolve: without the scale file, and in the run's own config.
    return {
        key: (_resolved(without, key, old.get(key, _UNSET)), _resolved(cfg, key, new[key]))
        for key in changed
    }


def scale_line(cfg: DictConfig) -> str | None:
    """One line naming the scale file and what it changed, or None when it changed nothing."""
    changes = scale_changes(cfg)
    if not changes:
        return None
    choices = HydraConfig.get().runtime.choices
    listed = ", ".join(f"{key} {_show(a)} -> {_show(b)}" for key, (a, b) in changes.items())
    return (
        f"scale/{choices['scale']} (applied with model={choices.get('model')}, after the "
        f"experiment) sets {listed} (the command line wins: add key=value to change one)"
    )


def _may_exist(hydra_cfg, path: str) -> bool:
    """False only when every config source is a folder and none holds `path`."""
    for source in hydra_cfg.runtime.config_sources:
        if source.schema == "file" and (Path(source.path) / path).is_file():
            return True
        if source.schema == "pkg" and source.provider != "hydra":
            return True  # a package's configs: leave it to Hydra
    return False


def _file_order(hydra_cfg, path: str) -> list[str]:
    """The keys of the first folder source's `path` in the order they are written."""
    for source in hydra_cfg.runtime.config_sources:
        file = Path(source.path) / path
        if source.schema == "file" and file.is_file():
            return list(_leaves(OmegaConf.to_container(OmegaConf.load(file), resolve=False)))
    return []


def _compose(hydra_cfg, overrides: list[str]) -> DictConfig:
    """The run's config (no hydra node) for these overrides, from the run's config sources."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    name = hydra_cfg.job.config_name
    if GlobalHydra.instance().is_initialized():  # inside the Hydra app: its own search path
        return compose(name, overrides=overrides)
    # Outside one (a config composed by hand, as the tests do): the same sources.
    sources = [s for s in hydra_cfg.runtime.config_sources if s.schema == "file"]
    main = next(s.path for s in sources if s.provider == "main")
    others = [f"file://{s.path}" for s in sources if s.provider != "main"]
    extra = [f"hydra.searchpath=[{','.join(others)}]"] if others else []
    with initialize_config_dir(config_dir=main, version_base="1.3"):
        return compose(name, overrides=extra + overrides)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; lists and empty dicts are values."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _resolved(cfg: DictConfig, key: str, raw: Any) -> Any:
    if raw is _UNSET:
        return raw
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # an interpolation that only resolves later: show it as written
        return raw
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, (list, dict)) and len(repr(value)) > 30:
        return f"[{len(value)} items]" if isinstance(value, list) else f"{{{len(value)} keys}}"
    return str(value)
