"""How many CPU threads torch's intra-op work uses: `trainer.cpu_threads`.

torch starts one OpenMP thread per core. On a machine whose cores other jobs are using, its
threads wait on each other at every parallel region, and a step can take several times longer
than with one thread (experiments/benchmarks/README.md, "Threads"). `auto` takes the cores that
are free: the cores this process may run on, less the tasks running elsewhere right now (the
kernel's count of runnable tasks, sampled a few times; the 1-minute load average where there is
no /proc, which also counts a run that just ended), split over the ranks that share the
machine, at least one. An explicit OMP_NUM_THREADS or MKL_NUM_THREADS is the
user's choice and is kept; a number sets that many threads; `null` leaves torch's default.

The count is decided once per process (a multirun or a test session keeps the first choice), so
every run in a process computes with the same number of threads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2ilab.errors import UserError

log = logging.getLogger(__name__)

# trainer.* keys that are t2ilab's, not arguments of Lightning's Trainer.
TRAINER_KEYS = ("cpu_threads",)

ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_chosen: dict[str, Any] = {}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_elsewhere(samples: int = 5, interval_s: float = 0.04) -> float | None:
    """Runnable tasks other than this process's one thread, averaged over a few instants (the
    running count in /proc/loadavg); None where there is no /proc."""
    counts = []
    try:
        for i in range(samples):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            if i + 1 < samples:
                time.sleep(interval_s)
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, sum(counts) / len(counts) - 1)


def free_cores(cores: int, load: float, ranks: int = 1) -> int:
    """Cores not busy with other work, shared among `ranks` processes, at least one each."""
    free = round(cores - load)
    return max(1, min(cores, free) // max(1, ranks))


def choose_threads(
    setting: Any,
    *,
    cores: int | None = None,
    load: float | None = None,
    env: Mapping[str, str] | None = None,
    ranks: int = 1,
) -> tuple[int | None, str]:
    """(threads to set, or None to leave torch's choice; the reason, for the log)."""
    env = os.environ if env is None else env
    if setting is None:
        return None, "trainer.cpu_threads=null: torch's default"
    if isinstance(setting, bool) or not (setting == "auto" or isinstance(setting, int)):
        raise UserError(
            f"trainer.cpu_threads={setting!r}: use auto, a number of threads, or null "
            "(torch's default)"
        )
    if setting != "auto":
        if setting < 1:
            raise UserError(f"trainer.cpu_threads={setting}: needs at least 1 thread")
        return int(setting), f"trainer.cpu_threads={setting}"
    for key in ENV_KEYS:
        if env.get(key):
            return None, f"{key}={env[key]} set: kept"
    cores = usable_cores() if cores is None else cores
    source = "busy elsewhere"
    if load is None:
        load = busy_elsewhere()
    if load is None:
        load, source = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), "load average"
    threads = free_cores(cores, load, ranks)
    return threads, f"auto: {cores} cores, {load:.1f} {source}, {ranks} rank(s) on this machine"


def apply_cpu_threads(setting: Any, ranks: int = 1, resumed: int | None = None) -> int:
    """Set torch's intra-op threads per `setting` (once per process); the count in force.
    `resumed`: the count the checkpoint's run used, which `auto` keeps, so that a resumed run
    computes exactly as the uninterrupted one would have."""
    threads, reason = choose_threads(setting, ranks=ranks)  # a bad setting fails every time
    if setting == "auto" and threads is not None and resumed:
        threads, reason = int(resumed), "auto: as in the run this one resumes"
    if "threads" not in _chosen:
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        _chosen["threads"] = torch.get_num_threads()
        log.info("cpu threads: %d (%s)", _chosen["threads"], reason)
    return _chosen["threads"]


def lightning_trainer_config(trainer_cfg: Any) -> dict[str, Any]:
    """The `trainer` block as Lightning's Trainer takes it: resolved, without t2ilab's keys."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(trainer_cfg, resolve=True)
    for key in TRAINER_KEYS:
        settings.pop(key, None)
    return settings
