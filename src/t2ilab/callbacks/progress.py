"""Progress bar and model summary for step-based training (conf/callbacks/default.yaml).

t2ilab trains for `trainer.max_steps` with `max_epochs=-1`, over datasets of a few images, so an
"epoch" is a handful of steps. Lightning's bars count batches per epoch, restart every epoch
(rich's rate then never gets two samples and reads 0.00it/s) and print "Epoch 7/-2". These
count the run's optimizer steps out of max_steps on one bar, with the rate over the run.
Lightning uses its rich bar when `rich` is installed, else tqdm: `StepProgressBar` is the same
choice, and `TrainingModelSummary` likewise.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary


def counts_steps(trainer) -> bool:
    """The run ends at max_steps: progress is the step, not the batch of an epoch."""
    return trainer.max_steps is not None and trainer.max_steps > 0


def epoch_description(trainer) -> str:
    """'Epoch N', with '/last' only when the run has an epoch limit (Lightning writes
    max_epochs - 1 whatever it is: '/-2' for max_epochs=-1)."""
    max_epochs = trainer.max_epochs
    last = f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else ""
    return f"Epoch {trainer.current_epoch}{last}"


def bar_metrics(metrics: dict) -> dict:
    """The logged metrics, without Lightning's v_num: with several loggers it is the tail of
    their joined versions (e.g. "r4_0"), which names nothing a user knows."""
    return {k: v for k, v in metrics.items() if k != "v_num"}


def format_rate(steps_per_second: float | None) -> str:
    """tqdm's convention: it/s when fast, s/it when a step takes longer than a second."""
    if not steps_per_second:
        return "?it/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f}it/s"
    return f"{1 / steps_per_second:.2f}s/it"


if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn
    from rich.progress import ProgressColumn, Task, TextColumn
    from rich.text import Text

    def task_time(task: Task) -> float | None:
        """Seconds the bar ran: up to its last step once finished (end-of-run sampling and
        evaluation come after it)."""
        return task.finished_time if task.finished else task.elapsed

    def task_rate(task: Task) -> float | None:
        """Steps per second: rich's recent estimate, else the mean since the bar started (rich
        needs two updates within 30 s, which slow steps never give)."""
        if task.speed is not None:
            return task.speed
        done, seconds = task.completed - task.fields.get("first_step", 0), task_time(task)
        return done / seconds if done > 0 and seconds else None

    class StepsColumn(ProgressColumn):
        def __init__(self, style):
            self.style = style
            super().__init__()

        def render(self, task: Task) -> Text:
            return Text(f"step {int(task.completed)}/{int(task.total)}", style=self.style)

    def clock(seconds: float | None) -> str:
        return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))

    class TimeColumn(ProgressColumn):
        """Elapsed • remaining while it runs (the remaining time from the rate column's rate),
        the time it took once finished."""

        max_refresh = 0.5

        def __init__(self, style):
            self.style = style
            super().__init__()

        def render(self, task: Task) -> Text:
            if task.finished:
                return Text(clock(task.finished_time), style=self.style)
            rate = task_rate(task)
            remaining = (task.total - task.completed) / rate if rate else None
            return Text(f"{clock(task.elapsed)} • {clock(remaining)}", style=self.style)

    class RateColumn(ProgressColumn):
        def __init__(self, style):
            self.style = style
            super().__init__()

        def render(self, task: Task) -> Text:
            return Text(format_rate(task_rate(task)), style=self.style)

    class StepRichProgressBar(RichProgressBar):
        """Lightning's rich bar over the run's steps: 'Epoch 7 ━━━ step 120/800 0:00:12 •
        0:01:10 9.86it/s train/loss: 0.016'. Epoch-based runs (max_steps=-1) keep Lightning's
        bar, with the epoch fixed."""

        def configure_columns(self, trainer) -> list:
            if not counts_steps(trainer):
                return super().configure_columns(trainer)
            theme = self.theme
            return [
                TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(
                    complete_style=theme.progress_bar,
                    finished_style=theme.progress_bar_finished,
                    pulse_style=theme.progress_bar_pulse,
                ),
                StepsColumn(style=theme.batch_progress),
                TimeColumn(style=theme.time),
                RateColumn(style=theme.processing_speed),
            ]

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if not counts_steps(trainer):
                return super().on_train_epoch_start(trainer, pl_module)
            if self.is_disabled or self.progress is None:
                return
            if self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            else:  # one bar for the whole run: a new epoch only changes its label
                self.progress.update(self.train_progress_bar_id, description=self._description())
            self.refresh()

        def _initialize_train_progress_bar_id(self) -> None:
            trainer = self.trainer
            if not counts_steps(trainer):
                return super()._initialize_train_progress_bar_id()
            step = trainer.global_step  # after a resume, the restored step
            self.train_progress_bar_id = self.progress.add_task(
                self._description(), total=trainer.max_steps, completed=step, first_step=step
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not counts_steps(trainer):
                return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if not self.is_disabled and self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

        def get_metrics(self, trainer, pl_module) -> dict:
            return bar_metrics(super().get_metrics(trainer, pl_module))

        def _get_train_description(self, current_epoch: int) -> str:
            description = epoch_description(self.trainer)
            return f"{description:{len(self.validation_description)}}"  # as Lightning pads it

        def _description(self) -> str:
            description = self._get_train_description(self.trainer.current_epoch)
            style = self.theme.description
            return f"[{style}]{description}" if style else description


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar over the run's steps (Lightning's choice when rich is missing)."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return bar_metrics(super().get_metrics(trainer, pl_module))

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        if not counts_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this fit: one bar for the run
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # tqdm's rate counts from `initial`
            bar.unit = "step"
        bar.set_description(epoch_description(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not counts_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:  # the bar lives on (leave=True closes it)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


StepProgressBar = StepRichProgressBar if _RICH_AVAILABLE else StepTQDMProgressBar


class TrainedSummary(Summary):
    """Lightning's summary with the method's own count of what trains (textual inversion trains
    a few rows of an embedding matrix that requires grad as a whole)."""

    @property
    def trainable_parameters(self) -> int:
        count = getattr(self._model, "trained_parameter_count", None)
        return int(count()) if callable(count) else super().trainable_parameters


class TrainingModelSummary(RichModelSummary if _RICH_AVAILABLE else ModelSummary):
    """Lightning's model summary, built when the first training epoch starts instead of at fit
    start: after the module's on_train_start has put the trained parts in train mode (components
    load in eval mode), so "Modules in train mode" is what the training steps run with."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth, **summarize_kwargs)
        self._shown = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._shown = False  # each fit (a resumed one too) shows its summary once

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._shown:
            self._shown = True
            super().on_fit_start(trainer, pl_module)

    def _summary(self, trainer, pl_module):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            return super()._summary(trainer, pl_module)  # sharded parameters: Lightning's count
        return TrainedSummary(pl_module, max_depth=self._max_depth)
