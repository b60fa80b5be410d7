"""Class-labelled images in the ImageNet layout (one sub-folder per class): PixArt stage 1."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.base import T2IDataModule
from t2ilab.data.images import ImageTransform, check_image_folder, load_rgb
from t2ilab.data.loader import draw_rng, resumable_loader
from t2ilab.errors import UserError

# Sub-folders that are never classes: what zip tools and OSes leave behind.
NOT_CLASSES = ("__MACOSX", "$RECYCLE.BIN", "System Volume Information")


def read_class_folder(
    folder: str | Path | None, resolution: int | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, class id) pairs and the class names (sorted sub-folder names = ids 0..K-1).
    Hidden sub-folders and NOT_CLASSES are skipped; every image is decoded once and, with
    `resolution`, must be large enough to train on at it (images.check_image_size)."""
    if folder and Path(folder).expanduser().is_file():
        raise UserError(
            f"data.train_dir={folder} is a file, not a folder: point it at a folder with one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    if not folder or not Path(folder).expanduser().is_dir():
        raise UserError(
            f"data.train_dir={folder} does not exist: point it at a folder with one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    root = Path(folder).expanduser()
    classes = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_CLASSES
    )
    if not classes:
        raise UserError(
            f"data.train_dir={folder} has no class sub-folders: put each class's "
            "images in its own sub-folder (e.g. dog/, cat/)"
        )
    items = []
    for class_id, name in enumerate(classes):
        images = check_image_folder(root / name, f"data.train_dir class '{name}'", resolution)
        items += [(path, class_id) for path in images]
    return items, classes


class ClassFolderDataset(Dataset):
    """(image, class id) pairs, read by draw (t2ilab.data.loader): crops and flips keyed by it."""

    def __init__(self, items: list[tuple[Path, int]], transform: ImageTransform, seed: int = 0):
        self.items = items
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        path, label = self.items[draw % len(self)]
        image = self.transform(load_rgb(path), draw_rng(self.seed, draw))
        return {"pixel_values": image, "class_labels": torch.tensor(label)}


def collate_classes(examples: list[dict[str, torch.Tensor]]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "class_labels": torch.stack([e["class_labels"] for e in examples]),
        "num_instance": len(examples),
    }


class ClassFolderDataModule(T2IDataModule):
    def __init__(
        self,
        train_dir: str,
        resolution: int = 256,
        center_crop: bool = True,
        random_flip: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        cache: dict | None = None,  # no caching: check() refuses data.cache.latents/text=true
        **_ignored,
    ):
        super().__init__(cache, **_ignored)
        self.train_dir = train_dir
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.items: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        self.seed = 0

    def check(self) -> None:
        super().check()
        self.items, self.classes = read_class_folder(self.train_dir, self.transform.resolution)

    def bind(self, tokenizer=None, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        self.seed = int(seed)  # keys the data order
        return super().bind(tokenizer, seed, prompt_transform)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def setup(self, stage: str | None = None) -> None:
        if not self.items:
            self.check()
        self.dataset = ClassFolderDataset(self.items, self.transform, self.seed)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=collate_classes,
        )
