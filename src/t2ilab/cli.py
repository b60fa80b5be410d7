"""What every t2ilab command line shares: a user mistake is one line on stderr,
`t2ilab: error: <what is wrong>: <the fix>`, and exit code 2, never a traceback; and a tool
never replaces a file that it did not write itself.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from t2ilab.errors import UserError
from t2ilab.utils.atomic import atomic_file

# The PNG text chunk "Software" of every figure a t2ilab tool writes starts with this, so a
# rerun knows the file is its own to replace.
PNG_SOFTWARE = "t2ilab"

Main = TypeVar("Main", bound=Callable[..., int])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def print_error(err: object) -> None:
    print(f"t2ilab: error: {_one_line(err)}", file=sys.stderr)


def print_warning(message: object) -> None:
    print(f"t2ilab: warning: {_one_line(message)}", file=sys.stderr)


def one_line_errors(main: Main) -> Main:
    """Wrap a CLI `main` so that a UserError (argparse's mistakes included, see ArgumentParser)
    prints one `t2ilab: error:` line and `main` returns 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print_error(err)
            return 2

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own complaints (a missing option, a bad number) are UserErrors, so they
    read like every other mistake: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}: see {self.prog} --help")


def png_is_ours(path: Path) -> bool:
    """A PNG that a t2ilab tool wrote (its "Software" text chunk says so)."""
    try:
        with Image.open(path) as image:
            return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


def save_marked_png(image: Image.Image, path: Path, software: str) -> Path:
    """A PIL image as PNG, via a temp file in the same folder (a crash never leaves half an
    image), its "Software" text chunk set to `software` (PNG_SOFTWARE...), see `png_is_ours`."""
    info = PngInfo()
    info.add_text("Software", software)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def first_line(path: Path) -> str:
    """The first line of a text file without its newline; "" when it cannot be read as text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def text_starts_with(path: Path, *prefixes: str) -> bool:
    """Whether the first line of a text file starts with one of `prefixes`."""
    return first_line(path).startswith(prefixes)


def check_png_output(path: Path, option: str = "--out") -> Path:
    """A PNG these tools may write: its name ends in .png and it is new or their own."""
    check_output(path, option, png_is_ours)
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} {path}: the picture is a PNG: give a path ending in .png")
    return path


def check_output(path: Path, option: str, is_ours: Callable[[Path], bool]) -> Path:
    """`path` may be written: it is not a folder, and if it exists this tool wrote it before
    (`is_ours`). Raises UserError otherwise, before anything is computed or written."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: pass a file path inside it")
    if path.exists() and not is_ours(path):
        raise UserError(
            f"{path} exists and was not written by this tool, so it is left alone: move it "
            f"away or choose another {option}"
        )
    return path
