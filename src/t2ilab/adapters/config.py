"""AdapterConfig: one point of the adapter design space (input, output, function form)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from t2ilab.adapters.positions import (
    PAPER_PAIRS,
    InvalidAdapterPair,
    canonical_input,
    canonical_output,
    family,
    validate_pair,
)
from t2ilab.errors import UserError

# The paper's function-form grid.
ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid", "silu", "identity")
SCALES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
_ACTIVATION_ALIASES = {"sig": "sigmoid", "ident": "identity", "default": "relu", "swish": "silu"}

# Default bottleneck width r per target, chosen for the paper's DreamBooth budget (1.5 M
# parameters, 0.17 % of the SD 1.x UNet's 859.5 M). Transformer: 60, also the official code's
# `mid_dim`; SD 1.x has 16 transformer blocks whose widths sum to 12,480, so dim -> r -> dim
# adapters hold 24,976 * r + 12,480 = 1,511,040 parameters (0.176 %); CA_c -> CA_c 1,487,808.
# ResBlock: 3 (22 ResBlocks, 3x3 convs): Res_in -> Res_out 1,427,586 (0.166 %), Res_in -> Res_in
# 1.7 M, Res_out -> Res_out 1.2 M. The official example's mid_dim 7 would give 3.2 M (0.38 %).
# Pinned in tests/adapters/test_adapter_budget.py.
DEFAULT_RANK: dict[str, int] = {"transformer": 60, "resblock": 3}


@dataclass(frozen=True)
class AdapterConfig:
    """Where an adapter reads (`input_position`), where it adds (`output_position`), its form.

    Positions take the paper's names (see `t2ilab.adapters.positions`), case-insensitive, or the
    official code's (`attn2o`, `ffni`, ...); they are stored canonical, output merges applied.
    `rank` None picks `DEFAULT_RANK` for the target. `scale` multiplies the adapter output (paper
    grid: 0.5, 1, 2, 4). `block_filter` is a regex searched in each block's module name inside the
    UNet (e.g. ``"^up_blocks"``); None means every block. An invalid pair raises
    `InvalidAdapterPair` here already, before any weights load.
    """

    input_position: str = "CA_out"
    output_position: str = "FFN_in"
    rank: int | None = None
    activation: str = "relu"
    scale: float = 1.0
    block_filter: str | None = None

    def __post_init__(self) -> None:
        inp = canonical_input(self.input_position)
        out = canonical_output(self.output_position)
        ok, reason = validate_pair(inp, out)
        if not ok:
            raise InvalidAdapterPair(reason)
        act = str(self.activation).strip().lower()
        act = _ACTIVATION_ALIASES.get(act, act)
        if act not in ACTIVATIONS:
            raise UserError(
                f"Unknown adapter activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}."
            )
        rank = DEFAULT_RANK[family(inp)] if self.rank is None else self.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"Adapter rank must be a positive integer, got {self.rank!r}.")
        scale = self.scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
        ):
            raise UserError(f"Adapter scale must be a finite number, got {self.scale!r}.")
        if self.block_filter is not None:
            try:
                re.compile(self.block_filter)
            except re.error as e:
                raise UserError(
                    f"Adapter block_filter {self.block_filter!r} is not a valid regex: {e}."
                ) from None
        for name, value in (
            ("input_position", inp),
            ("output_position", out),
            ("rank", rank),
            ("activation", act),
            ("scale", float(scale)),
        ):
            object.__setattr__(self, name, value)

    @property
    def targets(self) -> str:
        """'transformer' (BasicTransformerBlock) or 'resblock' (ResnetBlock2D), from the positions."""
        return family(self.input_position)

    @property
    def in_paper(self) -> bool:
        """Whether the paper trains this pair (CA_c -> image outputs are this library's extension)."""
        return (self.input_position, self.output_position) in PAPER_PAIRS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": self.targets}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"targets"}
        if unknown:
            raise UserError(
                f"Unknown adapter config keys {sorted(unknown)}; expected {sorted(names)}."
            )
        return cls(**{k: v for k, v in data.items() if k in names})
