"""Class-labelled images in the ImageNet layout (one sub-folder per class): PixArt stage 1."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.images import ImageTransform, check_image_folder, load_rgb
from t2ilab.errors import UserError


def read_class_folder(folder: str | Path | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, class id) pairs and the class names (sorted sub-folder names = ids 0..K-1)."""
    if not folder or not Path(folder).expanduser().is_dir():
        raise UserError(
            f"data.train_dir={folder} does not exist: point it at a folder with one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    root = Path(folder).expanduser()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(
            f"data.train_dir={folder} has no class sub-folders: put each class's "
            "images in its own sub-folder (e.g. dog/, cat/)"
        )
    items = []
    for class_id, name in enumerate(classes):
        images = check_image_folder(root / name, f"data.train_dir class '{name}'")
        items += [(path, class_id) for path in images]
    return items, classes


class ClassFolderDataset(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform: ImageTransform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, label = self.items[index]
        return {"pixel_values": self.transform(load_rgb(path)), "class_labels": torch.tensor(label)}


def collate_classes(examples: list[dict[str, torch.Tensor]]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "class_labels": torch.stack([e["class_labels"] for e in examples]),
        "num_instance": len(examples),
    }


class ClassFolderDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_dir: str,
        resolution: int = 256,
        center_crop: bool = True,
        random_flip: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        **_ignored,
    ):
        super().__init__()
        self.train_dir = train_dir
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.items: list[tuple[Path, int]] = []
        self.classes: list[str] = []

    def check(self) -> None:
        self.items, self.classes = read_class_folder(self.train_dir)

    def bind(self, tokenizer=None, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        return {}

    @property
    def class_prompt(self) -> None:
        return None  # no prior preservation

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def setup(self, stage: str | None = None) -> None:
        if not self.items:
            self.check()
        self.dataset = ClassFolderDataset(self.items, self.transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_classes,
            persistent_workers=self.num_workers > 0,
        )
