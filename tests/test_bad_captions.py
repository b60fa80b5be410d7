"""What real users' captions look like: Windows encodings and line endings, BOMs, empty files,
broken metadata.jsonl lines, captions without images. Each is read correctly or is one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from t2ilab.data.captioned import CaptionedDataModule, read_captioned_folder
from t2ilab.errors import UserError


def _image(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 90, 200)).save(path)
    return path


def _sidecar(folder: Path, caption: bytes, name: str = "x") -> Path:
    _image(folder / f"{name}.png")
    (folder / f"{name}.txt").write_bytes(caption)
    return folder


def _only_caption(folder: Path) -> str:
    ((_, caption),) = read_captioned_folder(folder)
    return caption


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- sidecar .txt captions ---------------------------------------------------------------------

# name -> (the bytes a user's editor saved, the caption training sees)
READABLE = {
    "UTF-8": ("a café on a sunny street\n".encode(), "a café on a sunny street"),
    "UTF-8 with a BOM (Notepad)": (
        b"\xef\xbb\xbf" + "a café\n".encode(),
        "a café",
    ),
    "UTF-16 with a BOM (Notepad's Unicode)": ("a café\r\n".encode("utf-16"), "a café"),
    "CRLF line endings": (b"a red car\r\nparked by the sea\r\n", "a red car parked by the sea"),
    "old Mac CR line endings": (b"a red car\rparked by the sea\r", "a red car parked by the sea"),
    "tabs and runs of spaces": (b"  a red\t\tcar   by the sea  ", "a red car by the sea"),
}


@pytest.mark.parametrize("case", list(READABLE))
def test_caption_files_are_read_as_written(tmp_path, case):
    raw, caption = READABLE[case]
    assert _only_caption(_sidecar(tmp_path, raw)) == caption


def test_windows_1252_caption_names_the_file_and_the_byte(tmp_path):
    _sidecar(tmp_path, "a café\n".encode("cp1252"))
    with pytest.raises(UserError) as err:
        read_captioned_folder(tmp_path)
    assert _one_line(err) == (
        f"{tmp_path / 'x.txt'} is not UTF-8 text (line 1, byte 5 is 0xe9; saved as "
        "Windows-1252/latin-1?): save it as UTF-8, e.g. iconv -f cp1252 -t utf-8"
    )


@pytest.mark.parametrize(
    "raw",
    [b"", b"   \n", b"\r\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf \r\n", "\n".encode("utf-16")],
    ids=["empty", "spaces", "CRLF and tabs", "BOM only", "BOM and CRLF", "UTF-16 newline"],
)
def test_empty_caption_is_an_error_naming_the_image(tmp_path, raw):
    _sidecar(tmp_path, raw)
    with pytest.raises(UserError) as err:
        read_captioned_folder(tmp_path)
    assert _one_line(err) == f"{tmp_path / 'x.txt'} is empty: write the caption of x.png in it"


def test_caption_without_image_is_unused_and_named_in_a_warning(tmp_path, caplog):
    _sidecar(tmp_path, b"a cat")
    (tmp_path / "README.txt").write_text("captions by me")
    (tmp_path / "deleted.txt").write_text("a photo I deleted")
    (tmp_path / "._x.txt").write_bytes(b"\0\5\26\7")  # macOS metadata: not a caption
    with caplog.at_level(logging.WARNING, logger="t2ilab.data.captioned"):
        assert read_captioned_folder(tmp_path) == [(tmp_path / "x.png", "a cat")]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"{tmp_path}: 2 .txt files have no image of the same name and are not used, first "
        "README.txt"
    )


def test_folder_setting_that_is_a_file(tmp_path):
    with pytest.raises(UserError, match=r"data.train_dir=.*x.png is a file, not a folder"):
        read_captioned_folder(_image(tmp_path / "x.png"))


# --- metadata.jsonl ----------------------------------------------------------------------------


def _metadata(folder: Path, raw: bytes, images=("a.png",)) -> Path:
    for name in images:
        _image(folder / name)
    (folder / "metadata.jsonl").write_bytes(raw)
    return folder


def _line(file_name: str, text) -> bytes:
    return json.dumps({"file_name": file_name, "text": text}).encode() + b"\n"


def test_metadata_with_a_bom_and_crlf_reads(tmp_path):
    raw = b"\xef\xbb\xbf" + _line("a.png", "a cat").replace(b"\n", b"\r\n")
    assert read_captioned_folder(_metadata(tmp_path, raw)) == [(tmp_path / "a.png", "a cat")]


def test_metadata_caption_with_line_breaks_is_one_line(tmp_path):
    raw = _line("a.png", "a cat\r\non the grass\n")
    assert read_captioned_folder(_metadata(tmp_path, raw))[0][1] == "a cat on the grass"


def test_metadata_in_windows_1252_names_the_byte(tmp_path):
    raw = _line("a.png", "x") + '{"file_name": "a.png", "text": "café"}\n'.encode("cp1252")
    with pytest.raises(UserError) as err:
        read_captioned_folder(_metadata(tmp_path, raw))
    byte = raw.index(b"\xe9")
    assert f"metadata.jsonl is not UTF-8 text (line 2, byte {byte} is 0xe9;" in _one_line(err)


def test_metadata_bad_line_is_named_by_number(tmp_path):
    raw = _line("a.png", "a cat") + b"\n" + b'{"file_name": "b.png", "text": "a dog"\n'
    with pytest.raises(UserError) as err:
        read_captioned_folder(_metadata(tmp_path, raw, ("a.png", "b.png")))
    assert "metadata.jsonl line 3 is not JSON" in _one_line(err)


@pytest.mark.parametrize(
    "text,kind", [(42, "int 42"), (["a", "cat"], 'list ["a", "cat"]'), ({"en": "x"}, "dict")]
)
def test_metadata_caption_that_is_not_text(tmp_path, text, kind):
    with pytest.raises(UserError) as err:
        read_captioned_folder(_metadata(tmp_path, _line("a.png", text)))
    assert f'line 1: "text" is {kind}' in _one_line(err)
    assert 'not text: write the caption as a JSON string, "text": "..."' in str(err.value)


def test_metadata_null_caption_is_empty(tmp_path):
    with pytest.raises(UserError, match='line 1 has an empty "text" for a.png'):
        read_captioned_folder(_metadata(tmp_path, _line("a.png", None)))


@pytest.mark.parametrize("escape", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_metadata_file_name_outside_the_folder(tmp_path, escape):
    folder = tmp_path / "data"
    outside = _image(tmp_path / "outside.png")
    _image(tmp_path / "neighbour.png")  # an unlisted image next to it: once a crash
    name = str(outside) if escape == "ABSOLUTE" else escape
    raw = _line("a.png", "a cat") + _line(name, "an escape")
    with pytest.raises(UserError) as err:
        read_captioned_folder(_metadata(folder, raw))
    assert f"line 2: file_name {name!r} is not a path inside {folder}" in _one_line(err)


def test_metadata_listing_a_symlink_loop_is_one_line(tmp_path):
    _metadata(tmp_path, _line("a.png", "a cat") + _line("loop.png", "a loop"))
    (tmp_path / "loop.png").symlink_to("loop.png")
    with pytest.raises(UserError) as err:
        read_captioned_folder(tmp_path)
    assert "loop.png cannot be read as an image (a symbolic link loop)" in _one_line(err)


# --- through the datamodule --------------------------------------------------------------------


def test_datamodule_checks_captions_before_training(tmp_path):
    _sidecar(tmp_path, b"\xef\xbb\xbfa red car\r\nby the sea\r\n")
    dm = CaptionedDataModule(str(tmp_path), resolution=64)
    dm.check()
    assert dm.validation_prompts() == ["a red car by the sea"]
