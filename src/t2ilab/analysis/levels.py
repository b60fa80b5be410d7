"""Factor levels as a report shows them: the name a user knows for a column, a value as a
level label (null -> "model default"), the order of levels, and the decimals that tell
values apart. Shared by the ANOVA (`anova`) and its figures (`plots`); imports neither."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from t2ilab.analysis.collect import FACTOR_PREFIX, METRIC_PREFIX

# A null factor in results.json (noise.beta_schedule: null, ...) means the model's own value.
NONE_LEVEL = "model default"


def short(column: str) -> str:
    """The name a user knows: `factor.noise.beta_schedule` -> `noise.beta_schedule`."""
    for prefix in (FACTOR_PREFIX, METRIC_PREFIX):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return column


def level_label(value: Any) -> str:
    """One value of a factor as its level's label."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return NONE_LEVEL
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 4 and 4.0 (a column with a NaN) are one level
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return level_label(value.item())
    return str(value)


def as_levels(series: pd.Series) -> pd.Series:
    """A factor column as level labels (`level_label`)."""
    return series.map(level_label).astype(object)


def level_order(labels: Iterable[str]) -> list[str]:
    """The model's default first, then numeric levels ascending (1e-5 < 1e-4), anything else
    in first-seen (sweep) order."""
    seen = list(dict.fromkeys(labels))
    default = [NONE_LEVEL] if NONE_LEVEL in seen else []
    rest = [level for level in seen if level != NONE_LEVEL]
    try:
        return default + sorted(rest, key=float)
    except ValueError:
        return default + rest


def distinct_decimals(values: np.ndarray, min_digits: int = 3, max_digits: int = 8) -> int:
    """Decimals that give distinct values distinct labels: as many significant digits (of the
    largest value) as it takes, from `min_digits` up to `max_digits`."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return min_digits
    largest = float(np.abs(finite).max())
    magnitude = int(np.floor(np.log10(largest))) if largest > 0 else 0
    # means that differ only by float rounding are one value
    distinct = np.unique(np.array([float(f"{v:.12g}") for v in finite]))
    decimals = 0
    for digits in range(min_digits, max_digits + 1):
        decimals = max(0, digits - 1 - magnitude)
        if len({f"{v:.{decimals}f}" for v in distinct}) == len(distinct):
            break
    return decimals
