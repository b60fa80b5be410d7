"""The end of a Hydra multirun says how it went, and its exit code says it too.

A sweep goes on past failed runs (each records its reason in results.json), so without this the
last line of a sweep with failures is an ordinary log line and the exit code is 0: a user who
walked away would not learn that anything failed. `SweepSummary` (a Hydra callback, registered in
conf/hydra/default.yaml) reads the results of this sweep's runs when it ends, prints one line per
failed run and a last line with the counts, and exits 1 when any run failed or left no results.
Runs skipped by design (an impossible adapter pair) are counted, not failures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def _job_number(folder: Path) -> tuple[int, str]:
    return (int(folder.name), "") if folder.name.isdigit() else (sys.maxsize, folder.name)


def sweep_outcomes(sweep_dir: Path, since: float = 0.0) -> dict[Path, dict[str, Any]]:
    """{job folder: its results.json (or {"status": "no results"})} for the jobs of the sweep
    that started at `since` (older job folders of a reused sweep dir are left out)."""
    outcomes = {}
    if not sweep_dir.is_dir():
        return outcomes
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_number):
        record = job / ".hydra"
        if not record.is_dir() or record.stat().st_mtime < since:
            continue
        try:
            outcomes[job] = json.loads((job / "results.json").read_text())
        except (OSError, ValueError):
            outcomes[job] = {"status": "no results", "reason": "it ended without results.json"}
    return outcomes


def summarize(sweep_dir: Path, outcomes: dict[Path, dict[str, Any]]) -> tuple[list[str], bool]:
    """The lines to print, and whether the sweep failed."""
    counts: dict[str, int] = {}
    lines = []
    for job, result in outcomes.items():
        status = result.get("status", "no results")
        counts[status] = counts.get(status, 0) + 1
        if status not in ("ok", "skipped"):
            reason = str(result.get("reason") or "no reason recorded").splitlines()[0]
            lines.append(f"t2ilab: error: run {job} {status}: {reason}")
    failed = sum(n for status, n in counts.items() if status not in ("ok", "skipped"))
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    table = f"python -m t2ilab.analysis.collect {sweep_dir}"
    if failed:
        lines.append(
            f"t2ilab: error: sweep {sweep_dir}: {failed} of {len(outcomes)} runs failed "
            f"({parts}); table of all runs: {table}"
        )
    else:
        lines.append(f"t2ilab: sweep {sweep_dir}: {len(outcomes)} runs ({parts}); table: {table}")
    return lines, failed > 0


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # mtimes may be coarser than the clock

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        lines, failed = summarize(sweep_dir, sweep_outcomes(sweep_dir, self.started))
        sys.stdout.flush()
        for line in lines:
            print(line, file=sys.stderr if failed else sys.stdout)
        if failed:
            sys.exit(1)
