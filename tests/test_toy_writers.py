"""`python -m t2ilab.toy.world captioned|classes|subject OUT_DIR`: never overwrites or adds to a
folder a user filled; every refusal is one line. (The rendering itself: tests/test_toy_world.py.)"""

from __future__ import annotations

import pytest

from t2ilab.toy.world import main

WRITERS = {
    "subject": ["subject", "striped_star", "OUT", "--n", "2", "--resolution", "16"],
    "captioned": ["captioned", "OUT", "--n", "2", "--resolution", "16"],
    "classes": ["classes", "OUT", "--n-per-class", "1", "--resolution", "16"],
}


def _args(writer: str, out) -> list[str]:
    return [str(out) if a == "OUT" else a for a in WRITERS[writer]]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2ilab: error: "), lines
    return lines[0]


def _snapshot(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


# What a user may already have in the target: each a reason to refuse (already refused before
# this file's changes; kept as guards, the hidden file for the OS-files exception below).
USER_CONTENT = {
    "a photo with a name the writer uses": lambda d: (d / "00.png").write_bytes(b"my photo"),
    "a hidden file of theirs": lambda d: (d / ".notes").write_text("mine"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("content", list(USER_CONTENT))
def test_a_folder_with_the_users_files_is_left_untouched(tmp_path, capsys, writer, content):
    out = tmp_path / "mine"
    out.mkdir()
    USER_CONTENT[content](out)
    before = _snapshot(out)
    assert main(_args(writer, out)) == 2
    assert "is not empty, refusing to overwrite: choose an empty folder" in _error(capsys)
    assert _snapshot(out) == before  # nothing overwritten, nothing added


@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_earlier_output_is_refused_and_the_message_says_how_to_redo_it(tmp_path, capsys, writer):
    out = tmp_path / "toy"
    assert main(_args(writer, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_args(writer, out)) == 2
    assert "to redo an earlier output of this command, delete that folder first" in _error(capsys)
    assert _snapshot(out) == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_folder_holding_only_os_files_counts_as_empty(tmp_path, writer):
    out = tmp_path / "new"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (out / "Thumbs.db").write_bytes(b"\0")
    assert main(_args(writer, out)) == 0
    assert (out / ".DS_Store").read_bytes() == b"\0\0\0\1Bud1"
    assert len(_snapshot(out)) > 2


@pytest.mark.parametrize("writer", list(WRITERS))
def test_unusable_targets_are_one_line(tmp_path, capsys, writer):
    (tmp_path / "a_file").write_text("mine")
    assert main(_args(writer, tmp_path / "a_file")) == 2
    assert "a_file is a file: choose an empty folder" in _error(capsys)

    assert main(_args(writer, tmp_path / "a_file" / "inside")) == 2
    assert "inside cannot be created (" in _error(capsys)

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert main(_args(writer, tmp_path / "dangling")) == 2
    assert "dangling is a broken link: remove it or choose a new path" in _error(capsys)
    assert (tmp_path / "a_file").read_text() == "mine" and not (tmp_path / "gone").exists()
