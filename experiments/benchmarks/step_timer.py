"""Run a training script and record when each optimizer step ends, without touching the script.

    python step_timer.py --out timings.json -- train_dreambooth.py --max_train_steps 100 ...
    python step_timer.py --out timings.json -- train.py experiment=dreambooth ...

A global optimizer-step hook (torch.optim.optimizer.register_optimizer_step_post_hook) stamps
`time.perf_counter()` and the process's peak RSS so far after every `optimizer.step()`, so every
arm of the side-by-side benchmark (diffusers' scripts, t2ilab's train.py, the bare loop) is timed
by the same clock at the same point of its step. The script runs as `__main__` in this process,
so its own peak RSS is this process's. On exit the stamps go to --out as JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """The process's peak resident set so far (VmHWM), in MiB; 0.0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class StepStamps:
    """perf_counter and peak RSS after each optimizer step, from a global post-step hook."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.peak_rss_mib: list[float] = []

    def install(self) -> None:
        import torch.optim.optimizer as optim_base

        optim_base.register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.times.append(time.perf_counter() - self.start)
        self.peak_rss_mib.append(peak_rss_mib())

    def write(self, path: Path, script: str, exit_code: int | None) -> None:
        gpu_peak = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu_peak = torch.cuda.max_memory_allocated() / 2**20
        record = {
            "script": script,
            "exit_code": exit_code,
            "step_end_s": self.times,
            "peak_rss_mib_at_step": self.peak_rss_mib,
            "wall_s": time.perf_counter() - self.start,
            "peak_rss_mib": peak_rss_mib(),
            "cuda_max_memory_allocated_mib": gpu_peak,
            "pid": os.getpid(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: step_timer.py --out FILE -- SCRIPT [ARGS ...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="step_timer.py")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv[:split])
    script, *script_args = argv[split + 1 :]

    stamps = StepStamps()
    stamps.install()
    outcome: dict[str, int | None] = {"code": None}
    atexit.register(lambda: stamps.write(args.out, script, outcome["code"]))
    sys.argv = [script, *script_args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` would
    try:
        runpy.run_path(script, run_name="__main__")
        outcome["code"] = 0
    except SystemExit as exit_:
        code = exit_.code
        outcome["code"] = code if isinstance(code, int) else (0 if code is None else 1)
        raise


if __name__ == "__main__":
    main()
