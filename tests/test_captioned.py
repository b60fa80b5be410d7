"""Captioned-folder data: both layouts, every user error, batch layout, caption dropout."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2ilab.data.captioned import CaptionedDataModule, CaptionedDataset, read_captioned_folder
from t2ilab.data.dreambooth import tokenize
from t2ilab.data.images import ImageTransform
from t2ilab.errors import UserError
from t2ilab.models.clip_tokenizer import build_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def _image(path: Path, colour=(200, 30, 30), size=(24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _sidecar(folder: Path, captions: dict[str, str]) -> Path:
    for i, (name, caption) in enumerate(captions.items()):
        _image(folder / f"{name}.png", colour=(40 * i, 100, 200))
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def _metadata(folder: Path, rows: list[dict], images: list[str]) -> Path:
    for i, name in enumerate(images):
        _image(folder / name, colour=(40 * i, 100, 200))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# --- reading both layouts --------------------------------------------------------------------


def test_sidecar_layout(tmp_path):
    folder = _sidecar(tmp_path, {"b": "a blue square", "a": "a red circle"})
    items = read_captioned_folder(folder)
    assert items == [(folder / "a.png", "a red circle"), (folder / "b.png", "a blue square")]


def test_metadata_layout_keeps_line_order_and_subfolders(tmp_path):
    rows = [
        {"file_name": "z.png", "text": "a zebra"},
        {"file_name": "sub/y.png", "text": "a yak", "extra": 1},
    ]
    folder = _metadata(tmp_path, rows, ["z.png", "sub/y.png"])
    items = read_captioned_folder(folder)
    assert items == [(folder / "z.png", "a zebra"), (folder / "sub" / "y.png", "a yak")]


def test_metadata_wins_over_txt_and_caption_column_is_configurable(tmp_path):
    rows = [{"file_name": "a.png", "caption": "from metadata"}]
    folder = _metadata(tmp_path, rows, ["a.png"])
    (folder / "a.txt").write_text("from txt")
    assert read_captioned_folder(folder, caption_column="caption") == [
        (folder / "a.png", "from metadata")
    ]


def test_example_dataset_reads():
    items = read_captioned_folder(ROOT / "data" / "example_captioned")
    assert len(items) == 12
    assert items[0][1] == "a red circle on a blue background"
    assert len({c for _, c in items}) == 12


# --- every user error ------------------------------------------------------------------------


def test_missing_or_unset_folder(tmp_path):
    with pytest.raises(UserError, match="data.train_dir is not set: set data.train_dir=PATH"):
        read_captioned_folder(None)
    with pytest.raises(UserError, match="does not exist: set data.train_dir=PATH"):
        read_captioned_folder(tmp_path / "missing")


def test_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"has no images: add \.jpg/\.png/\.webp files and"):
        read_captioned_folder(tmp_path)


def test_images_without_captions_name_the_first_and_the_count(tmp_path):
    _sidecar(tmp_path, {"a": "a cat"})
    for name in ("c", "b", "d"):
        _image(tmp_path / f"{name}.png")
    with pytest.raises(UserError) as err:
        read_captioned_folder(tmp_path)
    message = str(err.value)
    assert "3 images have no caption, first b.png (and 2 more)" in message
    assert "add b.txt next to it" in message and "\n" not in message


def test_one_image_without_caption(tmp_path):
    _image(tmp_path / "only.png")
    with pytest.raises(UserError, match="1 image has no caption, first only.png: add only.txt"):
        read_captioned_folder(tmp_path)


def test_empty_caption_file(tmp_path):
    _sidecar(tmp_path, {"a": "   "})
    with pytest.raises(UserError, match="a.txt is empty: write the caption of a.png in it"):
        read_captioned_folder(tmp_path)


def test_unreadable_image(tmp_path):
    _sidecar(tmp_path, {"a": "a cat"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    (tmp_path / "broken.txt").write_text("a broken image")
    with pytest.raises(UserError, match="broken.png cannot be read as an image"):
        read_captioned_folder(tmp_path)


def test_metadata_row_naming_a_missing_file(tmp_path):
    rows = [{"file_name": "a.png", "text": "a cat"}, {"file_name": "gone.png", "text": "x"}]
    _metadata(tmp_path, rows, ["a.png"])
    with pytest.raises(UserError, match=r"line 2 names 'gone.png', which is not in .*: add the"):
        read_captioned_folder(tmp_path)


def test_metadata_empty_caption(tmp_path):
    _metadata(tmp_path, [{"file_name": "a.png", "text": " "}], ["a.png"])
    with pytest.raises(UserError, match='line 1 has an empty "text" for a.png: write its caption'):
        read_captioned_folder(tmp_path)


def test_metadata_wrong_caption_column_suggests_the_setting(tmp_path):
    _metadata(tmp_path, [{"file_name": "a.png", "caption": "a cat"}], ["a.png"])
    with pytest.raises(
        UserError, match=r'no "text" column \(other columns: caption\): set data.caption_column'
    ):
        read_captioned_folder(tmp_path)


def test_metadata_bad_json_and_missing_file_name(tmp_path):
    _metadata(tmp_path, [], ["a.png"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_captioned_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file"}\n')
    with pytest.raises(UserError, match='line 1 has no "file_name"'):
        read_captioned_folder(tmp_path)


def test_metadata_empty_or_not_listing_every_image(tmp_path):
    _metadata(tmp_path, [], ["a.png", "b.png"])
    with pytest.raises(UserError, match="metadata.jsonl lists no images"):
        read_captioned_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    with pytest.raises(UserError, match='1 image has no caption, first b.png: add a {"file_name"'):
        read_captioned_folder(tmp_path)


def test_metadata_unreadable_image(tmp_path):
    _metadata(tmp_path, [{"file_name": "bad.png", "text": "x"}], [])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png cannot be read as an image"):
        read_captioned_folder(tmp_path)


def test_datamodule_check_validates_settings(tmp_path):
    _sidecar(tmp_path, {"a": "a cat"})
    with pytest.raises(UserError, match="data.caption_dropout=1.5 is not a probability"):
        CaptionedDataModule(str(tmp_path), caption_dropout=1.5).check()
    with pytest.raises(UserError, match="data.batch_size=0 must be at least 1"):
        CaptionedDataModule(str(tmp_path), batch_size=0).check()
    with pytest.raises(UserError, match="does not exist"):
        CaptionedDataModule(str(tmp_path / "nope")).check()


# --- dataset and datamodule ------------------------------------------------------------------


def _datamodule(folder: Path, tokenizer, **kwargs) -> CaptionedDataModule:
    dm = CaptionedDataModule(str(folder), resolution=16, **kwargs)
    dm.check()
    assert dm.bind(tokenizer, seed=0) == {}
    dm.setup("fit")
    return dm


def test_batches_have_the_shared_layout(tmp_path, tokenizer):
    folder = _sidecar(tmp_path, {f"i{k}": f"a photo number {k}" for k in range(5)})
    dm = _datamodule(folder, tokenizer, batch_size=2, class_dir="ignored", identifier="sks")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values", "input_ids", "prompt", "num_instance"}
    assert all(p.startswith("a photo number ") for p in batch["prompt"])  # the text, for T5
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["input_ids"].shape == (2, 77)
    assert batch["num_instance"] == 2
    sizes = [b["pixel_values"].shape[0] for b in dm.train_dataloader()]
    assert sizes == [2, 2, 1]  # the last partial batch is kept


def test_input_ids_are_the_tokenized_captions(tmp_path, tokenizer):
    folder = _sidecar(tmp_path, {"a": "a red circle", "b": "a blue square"})
    dataset = CaptionedDataset(read_captioned_folder(folder), tokenizer, ImageTransform(16))
    assert torch.equal(dataset[0]["input_ids"], tokenize(tokenizer, "a red circle"))
    assert torch.equal(dataset[1]["input_ids"], tokenize(tokenizer, "a blue square"))


def test_prompts_class_prompt_and_validation_prompts(tmp_path, tokenizer):
    folder = _sidecar(tmp_path, {f"i{k}": f"caption {k}" for k in range(6)})
    dm = CaptionedDataModule(str(folder), resolution=16)  # 24x20 images are too small for 512
    assert dm.class_prompt is None
    assert dm.validation_prompts() == [f"caption {k}" for k in range(4)]
    assert dm.validation_prompts(n=2) == ["caption 0", "caption 1"]
    assert dm.validation_prompts(n=10) == [f"caption {k}" for k in range(6)]


def test_validation_prompts_are_templates_that_format_to_the_caption(tmp_path):
    _sidecar(tmp_path, {"a": "a {weird} caption with {} braces"})
    (template,) = CaptionedDataModule(str(tmp_path), resolution=16).validation_prompts()
    assert template.format(identifier="sks") == "a {weird} caption with {} braces"


def test_prompt_transform_rewrites_training_captions(tmp_path, tokenizer):
    folder = _sidecar(tmp_path, {"a": "a photo of <cat>"})
    dm = CaptionedDataModule(str(folder), resolution=16)
    dm.check()
    dm.bind(tokenizer, seed=0, prompt_transform=lambda p: p.replace("<cat>", "sks cat"))
    dm.setup("fit")
    assert torch.equal(dm.dataset[0]["input_ids"], tokenize(tokenizer, "a photo of sks cat"))
    assert dm.validation_prompts() == ["a photo of <cat>"]  # as the user wrote it


def test_caption_dropout_one_gives_empty_caption_ids(tmp_path, tokenizer):
    folder = _sidecar(tmp_path, {"a": "a red circle", "b": "a blue square"})
    dm = _datamodule(folder, tokenizer, batch_size=2, caption_dropout=1.0)
    batch = next(iter(dm.train_dataloader()))
    empty = tokenize(tokenizer, "")
    assert all(torch.equal(ids, empty) for ids in batch["input_ids"])
    kept = _datamodule(folder, tokenizer, batch_size=2, caption_dropout=0.0)
    batch = next(iter(kept.train_dataloader()))
    assert not any(torch.equal(ids, empty) for ids in batch["input_ids"])


def test_caption_dropout_rate_and_determinism(tmp_path, tokenizer):
    """Dropout is keyed by (seed, draw), not by the global RNG: the same draws drop the same
    captions in every run, also after a resume (which does not restore the global RNG)."""
    folder = _sidecar(tmp_path, {"a": "a red circle"})
    items = read_captioned_folder(folder)
    empty = tokenize(tokenizer, "")

    def drops(seed: int) -> list[bool]:
        dataset = CaptionedDataset(items, tokenizer, ImageTransform(16), 0.5, seed=seed)
        random.seed(seed + 100)  # the global RNG has no say
        return [torch.equal(dataset[draw]["input_ids"], empty) for draw in range(400)]

    first = drops(0)
    assert first == drops(0)
    assert first != drops(1)
    assert 0.4 < sum(first) / len(first) < 0.6


def test_dataloader_order_and_augmentation_depend_on_the_seed_alone(tmp_path, tokenizer):
    import lightning as L

    folder = _sidecar(tmp_path, {f"i{k}": f"caption {k}" for k in range(6)})

    def epoch(seed: int, global_seed: int) -> list[torch.Tensor]:
        L.seed_everything(global_seed, verbose=False)
        dm = _datamodule(folder, tokenizer, batch_size=3, random_flip=True, center_crop=False)
        dm.bind(tokenizer, seed=seed)
        dm.setup("fit")
        return [t for b in dm.train_dataloader() for t in (b["pixel_values"], b["input_ids"])]

    a, b = epoch(3, global_seed=0), epoch(3, global_seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = epoch(4, global_seed=0)
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_setup_needs_bind(tmp_path):
    _sidecar(tmp_path, {"a": "a cat"})
    with pytest.raises(RuntimeError, match="bind"):
        CaptionedDataModule(str(tmp_path)).setup("fit")
