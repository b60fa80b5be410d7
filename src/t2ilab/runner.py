"""Running one Hydra task (train or evaluate) so that results.json is always written.

A user error ends a single run with one line on stderr and exit code 2; in a multirun sweep
any failure is recorded in that run's results.json and the sweep goes on. A SkipRun (a
configuration that cannot run by design) is recorded as "skipped" and is not an error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from t2ilab.checkpoints import DISK_FULL, disk_full_message
from t2ilab.errors import SkipRun, UserError
from t2ilab.quiet import route_lightning_through_root
from t2ilab.results import collect_factors, write_results
from t2ilab.run_folder import RunFolderTaken

log = logging.getLogger(__name__)

# What a task returns: {"metrics": {name: float}, "steps": int}.
TaskOutcome = dict[str, Any]


def experiment_name(default: str = "default") -> str:
    return HydraConfig.get().runtime.choices.get("experiment") or default


def command_line(script: str = "train.py") -> str:
    """The command that launched this run, as a user would type it again."""
    return " ".join(["python", script, *HydraConfig.get().overrides.task])


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def user_error_in(err: BaseException) -> UserError | SkipRun | None:
    """The UserError (or SkipRun) that caused `err`, however wrapped."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, SkipRun)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_task(
    cfg: DictConfig, task: Callable[[DictConfig], TaskOutcome], name: str | None = None
) -> dict:
    route_lightning_through_root()  # Hydra's logging is set up now
    hydra_cfg = HydraConfig.get()
    is_multirun = hydra_cfg.mode == RunMode.MULTIRUN
    factors = collect_factors(
        cfg,
        list(hydra_cfg.overrides.task),
        dict(hydra_cfg.runtime.choices),
        list(cfg.results.factor_keys),
    )
    results_path = Path(cfg.paths.output_dir) / "results.json"
    start = time.time()
    status, reason, outcome = "ok", None, {"metrics": {}, "steps": 0}

    def write() -> dict:
        if not is_rank_zero():
            return {}
        # Values the config left to the model (null: "the model's own") as they resolved, and
        # values the task found out (evaluate: the export's model), so the record is true.
        for key, value in outcome.get("resolved", {}).items():
            if key in factors and factors[key] is None:
                factors[key] = value
        factors.update(outcome.get("factors", {}))
        return write_results(
            results_path,
            experiment=name or experiment_name(),
            status=status,
            reason=reason,
            factors=factors,
            metrics=outcome["metrics"],
            steps=outcome["steps"],
            wall_time_s=time.time() - start,
            resumes=outcome.get("resumes"),
            segments=outcome.get("segments"),
        )

    record = True
    try:
        try:
            outcome = task(cfg)
        except Exception as err:  # e.g. Hydra's instantiate wraps what a constructor raised
            cause = user_error_in(err)
            if cause is None or cause is err:
                raise
            raise cause from None
    except SkipRun as err:
        status, reason = "skipped", str(err)
        log.warning("skipped: %s", err)
    except UserError as err:
        status, reason = "failed", str(err)
        record = not isinstance(err, RunFolderTaken)  # that folder's results.json is another run's
        log.error("%s", err)
    except OSError as err:
        if err.errno not in DISK_FULL:
            status, reason = "failed", f"{type(err).__name__}: {err}"
            if not is_multirun:
                write()
                raise
            log.exception("run failed; the sweep goes on")
        else:  # a full disk is the user's to fix: one line, no traceback
            status = "failed"
            reason = disk_full_message(Path(err.filename or cfg.paths.output_dir), err)
            log.error("%s", reason)
    except Exception as err:
        status, reason = "failed", f"{type(err).__name__}: {err}"
        if not is_multirun:
            write()
            raise
        log.exception("run failed; the sweep goes on")
    results = write() if record else {}
    if status == "failed" and not is_multirun:
        print(f"t2ilab: error: {reason}", file=sys.stderr)
        sys.exit(2)
    return results
