"""Known third-party noise, silenced at its source so a run's output shows what matters.

Imported first by the entry points (train.py, evaluate.py), before transformers or Lightning
import: some of these messages are printed at import time. Each filter names the logger or module
that emits the message and matches the message itself, so every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# (logger, pattern): messages of that logger that are not about the user's run
NOISY_LOGGERS = [
    # transformers 5 resolves `CLIPImageProcessor` (imported by diffusers' pipelines) to its PIL
    # backend when torchvision is absent, as t2ilab's CPU install intends.
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to"),
    # Lightning advertises its cloud products on every Trainer.
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless cloud .*\blit(logger|models)\b"),
    # conf/callbacks/default.yaml configures the model summary (t2ilab.callbacks.progress).
    ("lightning.pytorch.utilities.rank_zero", r"^Trainer already configured with model summary"),
]


def install() -> None:
    for name, pattern in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        installed = [f.pattern.pattern for f in logger.filters if isinstance(f, DropMessages)]
        if pattern not in installed:  # once, however often install() runs
            logger.addFilter(DropMessages(pattern))
    # Lightning's own pytree helper builds a LeafSpec, which recent torch deprecates.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # torchdata's StatefulDataLoader calls torch.set_vital, which torch deprecates.
    warnings.filterwarnings(
        "ignore",
        message=r"'set_vital' is deprecated",
        category=UserWarning,
        module=r"torchdata\.stateful_dataloader\.stateful_dataloader",
    )


def route_lightning_through_root() -> None:
    """Once Hydra has configured logging: Lightning's messages go through the root logger only
    (Hydra's console format, and train.log). The `lightning` package adds a console handler of
    its own when it is imported, which then prints each of them a second time."""
    if not logging.getLogger().handlers:
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


install()
