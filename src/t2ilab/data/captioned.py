"""Fine-tuning data from a folder of captioned images (full fine-tuning, LoRA, adapters).

Two layouts, the two a user most likely already has:

(a) sidecar captions: every image `x.png` has a sibling `x.txt` holding its caption;
(b) the Hugging Face `imagefolder` convention: a `metadata.jsonl` with one JSON object per line,
    `{"file_name": "x.png", "text": "..."}` (the caption column is configurable). When
    `metadata.jsonl` exists it wins and `.txt` files are ignored.

Every example is conditioned on its own caption, so there is no prior preservation: a batch is
all "instance" examples (`num_instance` = B) and the shared diffusion step computes a plain loss.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.dreambooth import tokenize
from t2ilab.data.images import (
    IMAGE_EXTENSIONS,
    ImageTransform,
    check_image_folder,
    list_images,
    load_rgb,
)
from t2ilab.errors import UserError

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
KEY = "data.train_dir"  # the config key users set; error messages name it


LAYOUTS_HINT = (
    f"give each image a same-named .txt caption (x.png + x.txt) or list them in "
    f'{METADATA_FILE} as {{"file_name": "x.png", "text": "..."}} lines'
)


def _uncaptioned_error(folder: Path, missing: list[Path], how: str) -> UserError:
    first = missing[0].relative_to(folder)
    others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    what = "image has" if len(missing) == 1 else "images have"
    return UserError(
        f"{KEY}={folder}: {len(missing)} {what} no caption, first {first}{others}: {how}"
    )


def _read_sidecar_captions(folder: Path) -> list[tuple[Path, str]]:
    images = list_images(folder)
    if not images:
        raise UserError(
            f"{KEY}={folder} has no images: add .jpg/.png/.webp files and {LAYOUTS_HINT}"
        )
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise _uncaptioned_error(
            folder,
            missing,
            f"add {missing[0].with_suffix('.txt').name} next to it holding its caption "
            f"(or list every caption in {METADATA_FILE})",
        )
    items = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"{caption_file} cannot be read ({err.__class__.__name__}): "
                "save it as a UTF-8 text file"
            ) from None
        if not caption:
            raise UserError(f"{caption_file} is empty: write the caption of {image.name} in it")
        items.append((image, caption))
    # Decodes every image once (a truncated or non-image file fails here, not mid-training).
    check_image_folder(folder, KEY)
    return items


def _read_metadata(folder: Path, caption_column: str) -> list[tuple[Path, str]]:
    metadata = folder / METADATA_FILE
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"{metadata} cannot be read ({err.__class__.__name__}): save it as UTF-8 JSON lines"
        ) from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where} is not JSON ({err.msg}): write one "
                f'{{"file_name": "x.png", "{caption_column}": "..."}} object per line'
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(
                f'{where} has no "file_name": write one '
                f'{{"file_name": "x.png", "{caption_column}": "..."}} object per line'
            )
        if caption_column not in row:
            columns = ", ".join(k for k in row if k != "file_name") or "none"
            raise UserError(
                f'{where} has no "{caption_column}" column (other columns: {columns}): '
                "set data.caption_column=NAME to the column holding the captions"
            )
        image = folder / row["file_name"]
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(
                f"{where}: file_name {row['file_name']!r} is not a .jpg/.png/.webp image: "
                "point it at an image in the folder"
            )
        if not image.is_file():
            raise UserError(
                f"{where} names {row['file_name']!r}, which is not in {folder}: "
                "add the image or remove the line"
            )
        caption = row[caption_column]
        caption = caption.strip() if isinstance(caption, str) else ""
        if not caption:
            raise UserError(
                f'{where} has an empty "{caption_column}" for {row["file_name"]}: '
                "write its caption (or remove the line)"
            )
        items.append((image, caption))
    if not items:
        raise UserError(
            f"{metadata} lists no images: add one "
            f'{{"file_name": "x.png", "{caption_column}": "..."}} line per image'
        )
    # Images next to listed ones (or in the top folder) that no line names would be silently
    # left out of training; the Hugging Face loader would not skip them either.
    listed = {image.resolve() for image, _ in items}
    folders = {folder} | {image.parent for image, _ in items}
    present = sorted({p for f in folders for p in list_images(f)})
    missing = [p for p in present if p.resolve() not in listed]
    if missing:
        raise _uncaptioned_error(
            folder,
            missing,
            f'add a {{"file_name": "{missing[0].relative_to(folder).as_posix()}", '
            f'"{caption_column}": "..."}} line to {METADATA_FILE} or move the image out',
        )
    for image_folder in sorted({p.parent for p in present}):
        check_image_folder(image_folder, KEY)  # decodes each image once
    return items


def read_captioned_folder(
    folder: str | Path | None, caption_column: str = "text"
) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a captioned folder; a one-line UserError naming the fix
    for anything that would fail later (see the module docstring for the two layouts).

    Sidecar layout: images in sorted order. metadata.jsonl layout: in the order of its lines
    (`file_name` may name a file in a subfolder, as in Hugging Face imagefolder datasets).
    """
    if not folder:
        raise UserError(f"{KEY} is not set: set {KEY}=PATH to a folder of captioned images")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{KEY}={folder} does not exist: set {KEY}=PATH to a folder of captioned images"
        )
    if (path / METADATA_FILE).is_file():
        return _read_metadata(path, caption_column)
    return _read_sidecar_captions(path)


class CaptionedDataset(Dataset):
    """One example per (image, caption); the caption is replaced by "" with probability
    `caption_dropout`, which trains the unconditional prediction classifier-free guidance needs.

    Randomness (dropout, random crop/flip) comes from Python's `random`, which
    `L.seed_everything(seed, workers=True)` seeds in the main process and in every worker.
    """

    def __init__(
        self,
        items: list[tuple[Path, str]],
        tokenizer,
        transform: ImageTransform,
        caption_dropout: float = 0.0,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(
                f"data.caption_dropout={caption_dropout} is not a probability: use 0.0 to 1.0"
            )
        self.items = list(items)
        self.transform = transform
        self.caption_dropout = caption_dropout
        # Tokenized once: captions do not change between epochs.
        self.input_ids = [tokenize(tokenizer, caption) for _, caption in self.items]
        self.empty_ids = tokenize(tokenizer, "")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, _ = self.items[index]
        drop = self.caption_dropout > 0 and random.random() < self.caption_dropout
        return {
            "pixel_values": self.transform(load_rgb(path)),
            "input_ids": self.empty_ids if drop else self.input_ids[index],
        }


def collate_captioned(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        # No prior-preservation half: every example counts as an instance example.
        "num_instance": len(examples),
    }


class CaptionedDataModule(L.LightningDataModule):
    """Captioned-folder fine-tuning data. Call `check()` before loading weights (it reads and
    validates the folder), `bind(tokenizer)` once the tokenizer exists, then hand it to Lightning.
    """

    def __init__(
        self,
        train_dir: str,
        caption_column: str = "text",
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        caption_dropout: float = 0.0,
        **_ignored,  # keys other data configs carry (e.g. class_dir), unused here
    ):
        super().__init__()
        self.train_dir = train_dir
        self.caption_column = caption_column
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.caption_dropout = caption_dropout
        self.tokenizer = None
        self.prompt_transform = None
        self.items: list[tuple[Path, str]] | None = None

    def check(self) -> None:
        """All validation that needs no model: folder, images, captions, settings."""
        if not 0.0 <= float(self.caption_dropout) <= 1.0:
            raise UserError(
                f"data.caption_dropout={self.caption_dropout} is not a probability: use 0.0 to 1.0"
            )
        if int(self.batch_size) < 1:
            raise UserError(f"data.batch_size={self.batch_size} must be at least 1")
        self.items = read_captioned_folder(self.train_dir, self.caption_column)

    def bind(self, tokenizer, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        """Store the model's tokenizer; returns the prompt variables this data defines (none:
        captions are used verbatim, there is no identifier or class noun). `prompt_transform`
        rewrites captions before tokenizing (e.g. textual inversion's multi-vector tokens)."""
        self.tokenizer = tokenizer
        self.prompt_transform = prompt_transform
        if self.items is None:
            self.check()
        limit = getattr(tokenizer, "model_max_length", None)
        if limit:
            captions = [c for _, c in self._training_items()]
            long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
            if long:
                log.warning(
                    "%d of %d captions are longer than %d tokens and will be truncated, first: %r",
                    len(long),
                    len(captions),
                    limit,
                    long[0],
                )
        return {}

    def _training_items(self) -> list[tuple[Path, str]]:
        transform = self.prompt_transform or (lambda prompt: prompt)
        return [(path, transform(caption)) for path, caption in self.items]

    @property
    def class_prompt(self) -> str | None:
        return None  # no prior preservation on captioned data

    def validation_prompts(self, n: int = 4) -> list[str]:
        """The first `n` training captions, so sample grids show what the model was taught.

        Returned as prompt templates, like every `validation_prompts()`: braces are doubled, so
        `caption.format(**prompt_vars)` gives the caption back verbatim."""
        if self.items is None:
            self.check()
        return [c.replace("{", "{{").replace("}", "}}") for _, c in self.items[:n]]

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("CaptionedDataModule.bind(tokenizer) must run before setup")
        if self.items is None:
            self.check()
        self.dataset = CaptionedDataset(
            self._training_items(), self.tokenizer, self.transform, self.caption_dropout
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_captioned,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )
