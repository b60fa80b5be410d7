"""results.json: one file per run that the aggregator and the ANOVA read (a contract: docs/design.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t2ilab.utils.atomic import write_json_atomic

STATUSES = ("ok", "failed", "skipped")


def override_key(override: str) -> str:
    """`+trainer.max_steps=4` -> `trainer.max_steps`; `model=sd15` -> `model`."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def collect_factors(
    cfg: DictConfig, overrides: list[str], choices: dict[str, Any], extra_keys: list[str] = ()
) -> dict[str, Any]:
    """The config keys a sweep varies: every command-line override (config-group overrides give
    the chosen option's name) plus `extra_keys` (e.g. noise.beta_schedule), resolved values."""
    factors: dict[str, Any] = {}
    for key in [override_key(o) for o in overrides] + list(extra_keys):
        if key.startswith("hydra.") or key in factors:
            continue
        if key in choices:
            factors[key] = choices[key]
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            continue  # a whole sub-config was replaced: its group choice names it, if any
        factors[key] = (
            OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        )
    return factors


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def write_results(
    path: str | Path,
    *,
    experiment: str,
    status: str,
    factors: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    reason: str | None = None,
    steps: int = 0,
    wall_time_s: float = 0.0,
    resumes: list[dict[str, Any]] | None = None,
    segments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`resumes`: each resume that changed a setting, {"step", "changed": {key: [old, new]}}
    (t2ilab.resume), so the record shows what trained when. `segments`: the first launch and
    every continuation, {"from_step", "to_step", "wall_time_s", "command"}
    (t2ilab.callbacks.segments); `wall_time_s` stays this launch's."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} not in {STATUSES}")
    results = {
        "experiment": experiment,
        "status": status,
        "reason": reason,
        "factors": factors,
        "metrics": _finite(metrics or {}),
        "steps": int(steps),
        "wall_time_s": round(float(wall_time_s), 3),
    }
    if resumes:
        results["resumes"] = resumes
    if segments:
        results["segments"] = segments
    write_json_atomic(path, results)
    return results
