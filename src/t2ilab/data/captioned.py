"""Fine-tuning data from a folder of captioned images (full fine-tuning, LoRA, adapters).

Two layouts, the two a user most likely already has:

(a) sidecar captions: every image `x.png` has a sibling `x.txt` holding its caption;
(b) the Hugging Face `imagefolder` convention: a `metadata.jsonl` with one JSON object per line,
    `{"file_name": "x.png", "text": "..."}` (the caption column is configurable). When
    `metadata.jsonl` exists it wins and `.txt` files are ignored.

Every image needs a caption: an image without one, or with an empty one, is an error (an empty
caption would silently train the unconditional prediction; `data.caption_dropout` is the way to
do that). A `.txt` file without a same-named image (README.txt, a deleted image's caption) is not
used, and a warning names it. Caption files may be UTF-8 with or without a BOM or UTF-16 with a
BOM, with any line endings; a caption's line breaks and runs of spaces become single spaces.

Every example is conditioned on its own caption, so there is no prior preservation: a batch is
all "instance" examples (`num_instance` = B) and the shared diffusion step computes a plain loss.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.base import T2IDataModule
from t2ilab.data.dreambooth import tokenize
from t2ilab.data.images import (
    IMAGE_EXTENSIONS,
    ImageTransform,
    check_images,
    list_images,
    load_rgb,
)
from t2ilab.data.loader import draw_rng, resumable_loader
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


def read_text_file(path: Path) -> str:
    """A user's text file: UTF-8 with or without a BOM (Windows Notepad writes one), or UTF-16
    with a BOM (Notepad's "Unicode"). Other bytes are an error naming the first one that is not
    UTF-8, rather than a guessed code page that could silently garble the caption."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(
            f"{path} cannot be read ({err.strerror or err.__class__.__name__}): "
            "make it a readable text file (chmod a+r)"
        ) from None
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path} is not UTF-8 text (line {line}, byte {err.start} is "
            f"0x{data[err.start]:02x}; saved as Windows-1252/latin-1?): save it as UTF-8, "
            "e.g. iconv -f cp1252 -t utf-8"
        ) from None


def clean_caption(text: str) -> str:
    """One line: line breaks (CRLF too) and runs of whitespace become single spaces."""
    return " ".join(text.split())


def _warn_captions_without_images(folder: Path, images: list[Path]) -> None:
    used = {image.with_suffix(".txt").name for image in images}
    unused = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix == ".txt" and not p.name.startswith(".") and p.name not in used
    )
    if unused:
        log.warning(
            "%s: %d .txt files have no image of the same name and are not used, first %s",
            folder,
            len(unused),
            unused[0],
        )


def _read_sidecar_captions(folder: Path, resolution: int | None) -> list[tuple[Path, str]]:
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
        caption = clean_caption(read_text_file(caption_file))
        if not caption:
            raise UserError(f"{caption_file} is empty: write the caption of {image.name} in it")
        items.append((image, caption))
    _warn_captions_without_images(folder, images)
    # Decodes every image once (a truncated or non-image file fails here, not mid-training).
    check_images(images, resolution)
    return items


def _inside(folder: Path, file_name: str) -> Path | None:
    """folder/file_name, normalised, when it stays inside `folder` (no absolute path, no ..)."""
    path = Path(os.path.normpath(folder / file_name))
    if Path(file_name).is_absolute() or path == folder or not path.is_relative_to(folder):
        return None
    return path


def _caption_of(row: dict, caption_column: str, where: str) -> str:
    caption = row[caption_column]
    if caption is not None and not isinstance(caption, str):
        raise UserError(
            f'{where}: "{caption_column}" is {type(caption).__name__} {json.dumps(caption)[:40]}, '
            f'not text: write the caption as a JSON string, "{caption_column}": "..."'
        )
    return clean_caption(caption or "")


def _read_metadata(
    folder: Path, caption_column: str, resolution: int | None
) -> list[tuple[Path, str]]:
    folder = Path(os.path.normpath(folder))
    metadata = folder / METADATA_FILE
    lines = read_text_file(metadata).splitlines()
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
        image = _inside(folder, row["file_name"])
        if image is None:
            raise UserError(
                f"{where}: file_name {row['file_name']!r} is not a path inside {folder}: "
                "name the image relative to the folder, e.g. x.png or sub/x.png"
            )
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(
                f"{where}: file_name {row['file_name']!r} is not a .jpg/.png/.webp image: "
                "point it at an image in the folder"
            )
        if not image.is_file() and not image.is_symlink():  # a broken link: named when read
            raise UserError(
                f"{where} names {row['file_name']!r}, which is not in {folder}: "
                "add the image or remove the line"
            )
        caption = _caption_of(row, caption_column, where)
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
    listed = {image for image, _ in items}  # normalised paths: comparable without resolve()
    folders = {folder} | {image.parent for image, _ in items}
    present = sorted({p for f in folders for p in list_images(f)})
    missing = [p for p in present if p not in listed]
    if missing:
        raise _uncaptioned_error(
            folder,
            missing,
            f'add a {{"file_name": "{missing[0].relative_to(folder).as_posix()}", '
            f'"{caption_column}": "..."}} line to {METADATA_FILE} or move the image out',
        )
    check_images(list(dict.fromkeys(image for image, _ in items)), resolution)  # decode once
    return items


def read_captioned_folder(
    folder: str | Path | None, caption_column: str = "text", resolution: int | None = None
) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a captioned folder; a one-line UserError naming the fix
    for anything that would fail later (see the module docstring for the two layouts). With
    `resolution`, images too small to train on at it are errors too (images.check_image_size).

    Sidecar layout: images in sorted order. metadata.jsonl layout: in the order of its lines
    (`file_name` may name a file in a subfolder, as in Hugging Face imagefolder datasets).
    """
    if not folder:
        raise UserError(f"{KEY} is not set: set {KEY}=PATH to a folder of captioned images")
    path = Path(folder).expanduser()
    if path.is_file():
        raise UserError(f"{KEY}={folder} is a file, not a folder: set {KEY}=PATH to a folder")
    if not path.is_dir():
        raise UserError(
            f"{KEY}={folder} does not exist: set {KEY}=PATH to a folder of captioned images"
        )
    if (path / METADATA_FILE).is_file():
        return _read_metadata(path, caption_column, resolution)
    return _read_sidecar_captions(path, resolution)


class CaptionedDataset(Dataset):
    """One example per (image, caption); the caption is replaced by "" with probability
    `caption_dropout`, which trains the unconditional prediction classifier-free guidance needs.

    Items are read by draw (t2ilab.data.loader): dropout and random crops/flips are keyed by
    (seed, draw), so every epoch draws anew and a resumed run draws what it would have.
    """

    def __init__(
        self,
        items: list[tuple[Path, str]],
        tokenizer,
        transform: ImageTransform,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(
                f"data.caption_dropout={caption_dropout} is not a probability: use 0.0 to 1.0"
            )
        self.items = list(items)
        self.transform = transform
        self.caption_dropout = caption_dropout
        self.seed = seed
        # Tokenized once: captions do not change between epochs.
        self.input_ids = [tokenize(tokenizer, caption) for _, caption in self.items]
        self.empty_ids = tokenize(tokenizer, "")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        index, rng = draw % len(self), draw_rng(self.seed, draw)
        path, caption = self.items[index]
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        return {
            "pixel_values": self.transform(load_rgb(path), rng),
            "input_ids": self.empty_ids if drop else self.input_ids[index],
            "prompt": "" if drop else caption,
        }


def collate_captioned(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "prompt": [e["prompt"] for e in examples],  # for a second vocabulary (T5)
        # No prior-preservation half: every example counts as an instance example.
        "num_instance": len(examples),
    }


class CaptionedDataModule(T2IDataModule):
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
        cache: dict | None = None,  # no caching: check() refuses data.cache.latents/text=true
        **_ignored,  # keys other data configs carry (e.g. class_dir), unused here
    ):
        super().__init__(cache, **_ignored)
        self.train_dir = train_dir
        self.caption_column = caption_column
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.caption_dropout = caption_dropout
        self.items: list[tuple[Path, str]] | None = None
        self.seed = 0

    def check(self) -> None:
        """All validation that needs no model: folder, images, captions, settings."""
        super().check()
        if not 0.0 <= float(self.caption_dropout) <= 1.0:
            raise UserError(
                f"data.caption_dropout={self.caption_dropout} is not a probability: use 0.0 to 1.0"
            )
        if int(self.batch_size) < 1:
            raise UserError(f"data.batch_size={self.batch_size} must be at least 1")
        self.items = read_captioned_folder(
            self.train_dir, self.caption_column, self.transform.resolution
        )

    def bind(self, tokenizer, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        """Store the model's tokenizer; returns the prompt variables this data defines (none:
        captions are used verbatim, there is no identifier or class noun). `prompt_transform`
        rewrites captions before tokenizing (e.g. textual inversion's multi-vector tokens)."""
        super().bind(tokenizer, seed, prompt_transform)
        self.seed = int(seed)  # keys the data order
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
            self._training_items(),
            self.tokenizer,
            self.transform,
            self.caption_dropout,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=collate_captioned,
        )
