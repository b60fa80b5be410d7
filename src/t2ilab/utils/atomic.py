"""Write files and folders so that a crash never leaves a half-written one in place, nor debris.

Every write goes to a temporary beside its target, named after its writer:
`.{target}.{host}.{pid}.{random}.tmp`, then is renamed into place. The next writer of the same
target removes the temporaries of writers on this host that are dead (a SIGKILL leaves them
behind), never those of a live writer, nor those of other hosts (a shared filesystem: their pids
mean nothing here). A folder being replaced waits as `.{target}.{host}.{pid}.old` until the new
one is in place; a writer killed between the two renames leaves the target missing, and the next
writer (or reader, `recover_interrupted_writes`) puts the old folder back.

Modes are what the user's umask gives a plain open()/mkdir() (0644/0755 under umask 022), not
tempfile's private 0600/0700, which would survive the rename and hide results from colleagues;
a folder's contents get them too, whoever wrote them (`give_plain_modes`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Host names may hold dots (node1.cluster); the temporary names use dots as separators.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
# Where a filesystem has no hard links, a no-replace publish falls back to check-then-rename.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _writer() -> str:
    return f"{_HOST}.{os.getpid()}"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_writer()}.{secrets.token_hex(4)}.tmp")


def _leftover_patterns(name: str) -> tuple[re.Pattern, re.Pattern]:
    """(temporaries, folders moved aside) of `name`. Names without a writer are from versions
    before writers were named (tempfile's 8 random characters, a fixed `.name.tmp`, `.name.old`):
    their writers are long gone."""
    n = re.escape(name)
    writer = r"(?:\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+))"
    temp = re.compile(rf"^\.{n}(?:{writer}\.[0-9a-f]+|\.[a-z0-9_]{{8}})?\.tmp$")
    old = re.compile(rf"^\.{n}{writer}?\.old$")
    return temp, old


def _is_alive(host: str | None, pid: str | None) -> bool:
    if host is None:  # an unnamed writer from an older version
        return False
    if host != _HOST:
        return True  # another machine's writer: this one cannot tell, so leave it alone
    if int(pid) == os.getpid():
        return True  # this process (another thread may be writing the same target)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted_writes(path: str | os.PathLike) -> None:
    """Clean up after dead writers of `path`: a folder they moved aside comes back when `path` is
    missing (the swap was interrupted) and is deleted when `path` is there (the new one made it);
    their temporaries are deleted. Live writers' files are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    temp, old = _leftover_patterns(path.name)
    entries = sorted(path.parent.iterdir())
    for entry in entries:
        match = old.match(entry.name)
        if match is None or _is_alive(match["host"], match["pid"]):
            continue
        if not path.exists():
            try:
                os.replace(entry, path)  # the previous version, whole: nothing is lost
                continue
            except FileNotFoundError:  # another writer restored it first
                continue
        _remove(entry)
    for entry in entries:
        match = temp.match(entry.name)
        if match is not None and not _is_alive(match["host"], match["pid"]):
            _remove(entry)


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """An exclusive new temporary for `path`, mode 0666 minus the umask (as open() gives)."""
    while True:
        tmp = _temp_path(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _create_temp_dir(path: Path) -> Path:
    while True:
        tmp = _temp_path(path)
        try:
            tmp.mkdir(mode=0o777)  # minus the umask, as a plain mkdir
            return tmp
        except FileExistsError:
            continue


@contextmanager
def _temp_file_for(path: Path, mode: str) -> Iterator[tuple[Any, Path]]:
    """(open file, its path): a temporary beside `path`, deleted on error (or if left over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_writes(path)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f, tmp
    finally:
        tmp.unlink(missing_ok=True)  # gone already when it was renamed into place


@contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A temporary beside `path` for any writer to write the file to (PIL, matplotlib,
    safetensors, torch): it replaces `path` in one rename when the block ends, and is deleted if
    the block fails. `durable`: flushed to the disk before the rename (checkpoints)."""
    path = Path(path)
    with _temp_file_for(path, "wb") as (f, tmp):
        f.close()
        yield tmp
        if durable:
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """UTF-8 text; `newline=""` writes line endings as they are in `text` (CSV)."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_image_atomic(image, path: str | os.PathLike, *, replace: bool = True) -> bool:
    """Save a PIL image via a temporary beside it, then rename. With `replace=False` an image
    already at `path` (the user's, or another writer's that got there first) is kept and this
    one dropped. Returns whether this image is the one at `path` now."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    with _temp_file_for(path, "wb") as (f, tmp):
        image.save(f, format=image_format)
        f.close()
        if replace:
            os.replace(tmp, path)
            return True
        return _publish_without_replacing(tmp, path)


def _publish_without_replacing(tmp: Path, path: Path) -> bool:
    """Hard-link `tmp` to `path`, which fails when `path` exists: unlike a rename it can never
    replace another writer's file. Where the filesystem has no hard links: check, then rename
    (a writer that gets in between the two can still be replaced)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    if path.exists():
        return False
    os.replace(tmp, path)
    return True


def give_plain_modes(folder: Path) -> None:
    """The modes a plain mkdir()/open() gives under the user's umask (read off `folder`, made by
    mkdir(0o777)) for everything written inside it: some writers (safetensors' save_file) make
    their files 0600 whatever the umask, which would hide an export from colleagues. Execute
    bits stay where a file has them; links are left alone."""
    dir_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            file = os.path.join(root, name)
            st = os.lstat(file)
            if stat.S_ISREG(st.st_mode):
                executable = 0o111 if st.st_mode & 0o100 else 0
                os.chmod(file, (0o666 | executable) & dir_mode)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and only deleted once the new one is in place,
    so a crash at any point leaves either the old or the new folder, never a partial one
    (after a kill between the two renames, the next writer puts the old one back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_writes(path)
    tmp = _create_temp_dir(path)
    try:
        yield tmp
        give_plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{_writer()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
