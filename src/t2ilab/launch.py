"""How this process was launched: its rank among externally started ranks, and a run-folder
name that every rank of one launch agrees on.

torchrun and `srun` start every rank as its own `python train.py ...`; each runs Hydra, and a
timestamped run folder would differ per rank (the lightning-hydra-template problem). The
`${t2ilab_run_stamp:}` resolver (conf/hydra/default.yaml) names the folder after the launch
instead: torchrun's rendezvous id, or SLURM's job and step. Lightning's own launcher (one
process starting the others, `trainer.devices=N`) passes rank 0's folder to the others.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from omegaconf import OmegaConf, open_dict, read_write


def external_rank() -> tuple[int, int]:
    """(global rank, world size) when the ranks were started by torchrun or SLURM before
    Lightning runs; (0, 1) for a single process or for Lightning's own launcher, whose other
    ranks only start at `trainer.fit` (after class images and caches are prepared)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    ntasks = int(env.get("SLURM_NTASKS", 1))
    if ntasks > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), ntasks
    return 0, 1


def local_rank() -> int:
    """This rank's index on its node (which GPU it uses)."""
    env = os.environ
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))


def run_stamp() -> str:
    """The run folder's name: shared by all ranks of a torchrun/SLURM launch, else the time."""
    env = os.environ
    if external_rank()[1] > 1:
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        if "TORCHELASTIC_RUN_ID" in env or "RANK" in env:
            if run_id != "none":  # --standalone or --rdzv-id: unique per launch
                return f"torchrun-{run_id}"
            # No rendezvous id: the master port is shared by the ranks; the date makes a rerun
            # on another day land elsewhere (pass --rdzv-id or hydra.run.dir to be sure).
            return f"torchrun-{dt.date.today():%Y-%m-%d}-port{env.get('MASTER_PORT', '0')}"
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0"))
        task = env.get("SLURM_ARRAY_TASK_ID")
        step = env.get("SLURM_STEP_ID", "0")
        return f"slurm-{job}" + (f"_{task}" if task else "") + f".{step}"
    # Microseconds: two runs started in the same second never share a folder.
    return f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S-%f}"


# Command-line options that say which config to load; every other option is Hydra's run mode.
_CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def single_job_argv(argv: Sequence[str], job_overrides: Sequence[str]) -> list[str]:
    """The command line that runs one job of a multirun on its own: the same config options,
    this job's overrides, and no --multirun or sweep lists."""
    out, args = [argv[0]], list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(_CONFIG_OPTIONS) and "=" in arg:
            out.append(arg)
        elif arg in _CONFIG_OPTIONS and i + 1 < len(args):
            out += [arg, args[i + 1]]
            i += 1
        i += 1
    return out + list(job_overrides)


def pin_job_for_lightning_ranks() -> None:
    """Before `trainer.fit`: Lightning's DDP launcher starts ranks > 0 by re-running sys.argv
    with `hydra.run.dir=<HydraConfig run.dir>`. In a multirun that would be the whole sweep in
    another folder; point both at this job, so its ranks train it and share its folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = single_job_argv(sys.argv, list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def rank_scope() -> Iterator[None]:
    """Around `trainer.fit`: afterwards, remove the variables Lightning's launcher set and the
    process group, so the next job of a multirun starts its own ranks (with LOCAL_RANK left
    set, Lightning would think they were started externally and wait for them forever)."""
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("t2ilab_run_stamp"):
        # use_cache: every interpolation in one process gives the same name.
        OmegaConf.register_new_resolver("t2ilab_run_stamp", run_stamp, use_cache=True)


register_resolvers()
