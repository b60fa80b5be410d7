"""What a run prints (issue 13): a step-based progress bar, a model summary that says what
trains, no third-party noise, and a log short enough to read."""

from __future__ import annotations

import copy
import logging
import re
import warnings

import lightning as L
import pytest
import torch
from _support import CONF, FAST, run_train
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from t2ilab import quiet
from t2ilab.callbacks.progress import (
    StepRichProgressBar,
    StepTQDMProgressBar,
    TrainingModelSummary,
    format_rate,
)
from t2ilab.callbacks.reliability import KeepLastCheckpoint
from t2ilab.models.loading import load_sd_components
from t2ilab.modules.dreambooth import DreamBoothModule
from t2ilab.modules.textual_inversion import TextualInversionModule

RATE = re.compile(r"\d+\.\d\d(it/s|s/it)")


class TwoBatchesAnEpoch(BoringModel):
    """An epoch of 2 batches, as DreamBooth's few images make it: 5 steps span 3 epochs."""

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 4), batch_size=2)


def fit(model, callbacks, tmp_path, max_steps=5, ckpt_path=None):
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,  # as conf/trainer/default.yaml
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, KeepLastCheckpoint) for c in callbacks),
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


# --- the progress bar -----------------------------------------------------------------------


def test_rich_bar_counts_the_runs_steps_with_a_rate(tmp_path):
    from rich.text import Text

    bar = StepRichProgressBar()
    fit(TwoBatchesAnEpoch(), [bar], tmp_path)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    shown = " ".join(
        r.plain for r in (column(task) for column in bar.progress.columns) if isinstance(r, Text)
    )
    assert "Epoch 2" in shown and "/-2" not in shown  # max_epochs=-1: no epoch limit to show
    assert "step 5/5" in shown  # one bar over the run, not the epoch's 2 batches
    assert RATE.search(shown), shown  # a measured rate, not 0.00it/s


def test_tqdm_bar_counts_the_runs_steps(tmp_path):
    bar = StepTQDMProgressBar()
    fit(TwoBatchesAnEpoch(), [bar], tmp_path)
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.n, tqdm_bar.total, tqdm_bar.desc) == (5, 5, "Epoch 2: ")
    shown = str(tqdm_bar)
    assert "5/5" in shown and re.search(r"\d(step/s|s/step)", shown), shown


def test_rates_read_like_tqdm():
    assert format_rate(None) == "?it/s"
    assert format_rate(12.345) == "12.35it/s"
    assert format_rate(0.25) == "4.00s/it"  # a slow step reads as seconds per step


# --- the model summary ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def components():
    return load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))


def one_batch(tokenizer, prompt):
    ids = tokenizer([prompt] * 2, padding="max_length", max_length=77, return_tensors="pt")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"pixel_values": pixels, "input_ids": ids.input_ids, "num_instance": 2}


class ModesInStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        children = list(pl_module.modules())[1:]  # as the summary counts: without the root
        self.train_modules = sum(m.training for m in children)


def summary_of_one_step(module, batch, tmp_path, monkeypatch):
    """(trainable params, modules in train mode) as the summary reports them, and the modules
    in train mode during the training step."""
    shown = []
    monkeypatch.setattr(
        TrainingModelSummary, "summarize", staticmethod(lambda *a, **k: shown.append(a))
    )
    modes = ModesInStep()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrainingModelSummary(), modes],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    (args,) = shown
    return args[2], args[4]["train"], modes.train_modules


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


def test_summary_shows_the_modes_the_training_steps_run_in(components, tmp_path, monkeypatch):
    c = copy.deepcopy(components)
    module = DreamBoothModule(c, optimizer=adamw)
    trainable, in_train_mode, in_step = summary_of_one_step(
        module, one_batch(c.tokenizer, "a sks toy"), tmp_path, monkeypatch
    )
    assert in_train_mode == in_step > 1  # the UNet's modules train (components load in eval)
    assert trainable == sum(p.numel() for p in c.unet.parameters())


def test_summary_counts_what_textual_inversion_trains(components, tmp_path, monkeypatch):
    c = copy.deepcopy(components)
    method = {"placeholder_token": "<toy-x>", "initializer_token": "toy", "num_vectors": 2}
    transform = TextualInversionModule.prepare_tokenizer(c.tokenizer, OmegaConf.create(method))
    module = TextualInversionModule(c, **method, optimizer=adamw)
    batch = one_batch(c.tokenizer, transform("a photo of <toy-x>"))
    trainable, _, _ = summary_of_one_step(module, batch, tmp_path, monkeypatch)
    width = c.text_encoder.get_input_embeddings().weight.shape[1]
    assert trainable == module.trained_parameter_count() == 2 * width  # two rows, not the matrix


# --- checkpoints folder ---------------------------------------------------------------------


def checkpoint_warnings(tmp_path, max_steps=2, ckpt_path=None) -> list[str]:
    checkpoint = KeepLastCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(BoringModel(), [checkpoint], tmp_path, max_steps=max_steps, ckpt_path=ckpt_path)
    return [str(w.message) for w in caught if "is not empty" in str(w.message)]


def test_resuming_into_the_runs_checkpoints_is_quiet_a_fresh_run_is_warned(tmp_path):
    assert checkpoint_warnings(tmp_path) == []  # a new folder
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # ckpt_path=last: the run's own checkpoints are expected there
    assert checkpoint_warnings(tmp_path, max_steps=4, ckpt_path=str(last)) == []
    (warning,) = checkpoint_warnings(tmp_path)  # a fresh run into a full folder: said
    assert str(tmp_path / "checkpoints") in warning


# --- third-party noise ----------------------------------------------------------------------


def test_known_noise_is_dropped_and_other_messages_kept(caplog):
    quiet.install()
    transformers_log = logging.getLogger("transformers.utils.import_utils")
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        transformers_log.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        transformers_log.warning("Could not import module 'X'.")
        lightning_log.info("💡 Tip: For seamless cloud logging ..., try installing litlogger")
        lightning_log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == [
        "Could not import module 'X'.",
        "GPU available: False, used: False",
    ]
    from lightning.pytorch.utilities._pytree import _tree_flatten
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()  # again: its filters go in front of "always"
        _tree_flatten(torch.zeros(1))  # Lightning builds a LeafSpec
        StatefulDataLoader([1, 2])  # torchdata calls torch.set_vital
        warnings.warn("about the user's run", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["about the user's run"]


# --- a whole run on the command line ----------------------------------------------------------

NOISE = [
    "requires torchvision",  # transformers
    "litlogger",  # Lightning's tip
    "LeafSpec",  # torch deprecation inside Lightning
    "anonymous setting",  # wandb
    "Run history",  # wandb's end-of-run block
    "Run summary",
    "Tracking run with wandb",
    "no API key found",  # WANDB_MODE=offline was set on purpose
    "/-2",  # Lightning's "Epoch 7/-2"
    "0.00it/s",
    "v_num",
    "Modules in train mode: 0",
]
# Progress bars: tqdm's, and the training bar (wrapped on a narrow console, its clock shows).
PROGRESS = re.compile(r"%\||it/s|s/it|img/s|s/img|step \d+/\d+|(?<!\d)\d:\d\d:\d\d")
MAX_LINES = 32  # a screen: 27 today (13 of them the model summary), 67 before issue 13


@pytest.mark.slow
def test_a_runs_output_is_short_and_true(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # what a user sees
    fast = [o for o in FAST if not o.startswith("logger=")]  # the default logger: W&B + CSV
    run_dir = tmp_path / "run"
    proc = run_train(
        ["experiment=dreambooth_sigmoid", *fast], run_dir, env={"WANDB_MODE": "offline"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in output, noise
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    bar = [line for line in lines if "step 3/3" in line]
    assert bar and RATE.search(bar[-1]), bar
    assert "Trainable params: 5.6 M" in output  # the toy UNet, all of it
    assert re.search(r"Modules in train mode: [1-9]", output)
    offline_run = next((run_dir / "wandb").glob("offline-run-*"))
    assert f"W&B: logging offline (WANDB_MODE=offline) to {offline_run}" in output
    assert f"wandb sync {offline_run}" in output
    readable = [line for line in lines if not PROGRESS.search(line)]
    assert len(readable) <= MAX_LINES, "\n".join(readable)
