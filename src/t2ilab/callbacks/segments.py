"""A run's segments: its first launch and every continuation from a checkpoint, with the steps
each one trained, its wall time and its command.

A long run stopped and continued (`ckpt_path=last`) writes results.json again at each
continuation, so the record of a single launch would hold the last one's wall time and command
alone. The segments travel in every checkpoint instead (under t2ilab's record key): a
continuation starts from the checkpoint's list and adds its own, so the final record holds
every launch that contributed to the weights. A segment that was stopped after its last
checkpoint is recorded up to that checkpoint: what it trained after it was lost, and the next
segment trained those steps again.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from t2ilab.checkpoints import RECORD_KEY


def earlier_segments(record: dict[str, Any], step: int) -> list[dict[str, Any]]:
    """The segments a checkpoint's record holds. A checkpoint from before segments were
    recorded (or one without a record) still counts its steps, with unknown time and command."""
    segments = record.get("segments")
    if isinstance(segments, list):
        return [dict(s) for s in segments]
    if step <= 0:
        return []
    return [{"from_step": 0, "to_step": step, "wall_time_s": None, "command": None}]


def total_wall_time_s(records: list[dict[str, Any]], key: str = "wall_time_s") -> float | None:
    """The wall time of all segments (or stages) together; None when one of them is unknown."""
    times = [r.get(key) for r in records]
    return None if any(t is None for t in times) else round(sum(times), 1)


class SegmentRecorder(L.Callback):
    """Stamps the segment list into every checkpoint; `segments(step)` is the list at the end."""

    def __init__(self, command: str, earlier: list[dict[str, Any]] | None = None, step: int = 0):
        self.command = command
        self.earlier = [dict(s) for s in earlier or []]
        self.from_step = int(step)
        self._started = time.monotonic()

    def segments(self, step: int) -> list[dict[str, Any]]:
        current = {
            "from_step": self.from_step,
            "to_step": int(step),
            "wall_time_s": round(time.monotonic() - self._started, 1),
            "command": self.command,
        }
        return [*self.earlier, current]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(RECORD_KEY, {})["segments"] = self.segments(trainer.global_step)
