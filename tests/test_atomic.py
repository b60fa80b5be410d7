"""Atomic writes (utils/atomic.py): a killed writer leaves no debris for good, an interrupted
folder swap is recovered, modes follow the umask, and concurrent writers of the same names
neither collide nor replace each other's images."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from t2ilab.utils import atomic
from t2ilab.utils.atomic import (
    atomic_directory,
    recover_interrupted_writes,
    save_image_atomic,
    write_json_atomic,
)

# A writer that stops where the test wants it (its output half written, written but not yet
# renamed into place, or between the two renames of a folder swap), says so in READY, and waits
# to be killed.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from t2ilab.utils.atomic import atomic_directory, write_json_atomic

    mode, target, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def hang(what):
        ready.write_text(what)
        time.sleep(600)

    if mode == "folder":
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"new" * 1000)
            hang(str(tmp))
    elif mode == "swap":
        real_replace = os.replace

        def replace_then_hang(src, dst):
            real_replace(src, dst)
            if str(dst).endswith(".old"):
                hang("moved aside")

        os.replace = replace_then_hang
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
    elif mode == "json":
        def hang_before_rename(src, dst):
            hang("written, not yet in place")

        os.replace = hang_before_rename
        write_json_atomic(target, {"status": "ok"})
    """
)


def start_writer(mode: str, target: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready_{mode}_{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(target), str(ready)])
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, f"the {mode} writer exited early"
        assert time.monotonic() < deadline, f"the {mode} writer never got going"
        time.sleep(0.05)
    return proc, ready


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no finally, no atexit
    proc.wait()


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def test_a_killed_folder_writer_leaves_debris_that_the_next_writer_removes(tmp_path):
    runs = tmp_path / "run"
    runs.mkdir()
    target = runs / "export"
    proc, _ = start_writer("folder", target, tmp_path)
    kill(proc)
    assert not target.exists() and len(leftovers(runs, "export")) == 1  # the .tmp of the dead

    with atomic_directory(target) as tmp:  # the resumed run's export
        (tmp / "weights.bin").write_bytes(b"resumed")
    assert (target / "weights.bin").read_bytes() == b"resumed"
    assert leftovers(runs, "export") == []


def test_a_killed_json_writer_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"status": "running"})
    proc, _ = start_writer("json", target, tmp_path)
    kill(proc)
    assert json.loads(target.read_text()) == {"status": "running"}  # never half written
    assert len(leftovers(tmp_path, "results.json")) == 1

    write_json_atomic(target, {"status": "ok"})
    assert json.loads(target.read_text()) == {"status": "ok"}
    assert leftovers(tmp_path, "results.json") == []


@pytest.mark.parametrize("recover", ["next_writer", "reader"])
def test_a_swap_killed_between_its_renames_is_recovered(recover, tmp_path):
    runs = tmp_path / "run"
    target = runs / "export"
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"first export")
    proc, _ = start_writer("swap", target, tmp_path)
    kill(proc)
    assert not target.exists()  # moved aside, the new one not yet in place

    if recover == "reader":  # e.g. python evaluate.py run_dir=<run>
        recover_interrupted_writes(target)
        assert (target / "weights.bin").read_bytes() == b"first export"
    else:
        with atomic_directory(target) as tmp:
            assert (target / "weights.bin").read_bytes() == b"first export"
            (tmp / "weights.bin").write_bytes(b"second export")
        assert (target / "weights.bin").read_bytes() == b"second export"
    assert leftovers(runs, "export") == []


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "export"
    proc, ready = start_writer("folder", target, tmp_path)
    try:
        live_tmp = Path(ready.read_text())
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"other writer")
        write_json_atomic(target / "t2ilab.json", {})
        assert live_tmp.is_dir() and (live_tmp / "weights.bin").is_file()
    finally:
        kill(proc)
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"again")
    assert not live_tmp.exists() and leftovers(tmp_path, "export") == []


def test_debris_of_versions_without_named_writers_is_removed(tmp_path):
    """tempfile's names (.export.k3j4h5g6.tmp), the fixed image temp name and `.export.old`
    from before writers were named; an old folder moved aside comes back."""
    (tmp_path / ".export.k3j4h5g6.tmp").mkdir()
    (tmp_path / ".export.old").mkdir()
    (tmp_path / ".export.old" / "weights.bin").write_bytes(b"old")
    (tmp_path / ".class_00001.png.tmp").write_bytes(b"half")
    recover_interrupted_writes(tmp_path / "export")
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "class_00001.png", replace=False)
    assert (tmp_path / "export" / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_00001.png", "export"]


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_modes_of_a_plain_open_and_mkdir(umask, tmp_path):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    write_json_atomic(tmp_path / "results.json", {"status": "ok"})
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "grid.png")
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "class.png", replace=False)
    with atomic_directory(tmp_path / "export") as tmp:
        write_json_atomic(tmp / "t2ilab.json", {})
        (tmp / "unet").mkdir()
        # safetensors writes 0600 whatever the umask: the export must not stay private
        save_file({"w": torch.zeros(2)}, str(tmp / "unet" / "model.safetensors"))
    export = tmp_path / "export"
    assert mode(export) == dir_mode and mode(export / "unet") == dir_mode
    for path in (
        tmp_path / "results.json",
        tmp_path / "grid.png",
        tmp_path / "class.png",
        export / "t2ilab.json",
        export / "unet" / "model.safetensors",
    ):
        assert mode(path) == file_mode, path.name


# Two writers fill the same class-image names at once, many times over; each paints its own
# colour and reports which images it put in place.
IMAGE_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from PIL import Image
    from t2ilab.utils.atomic import save_image_atomic

    folder, colour, go, replace = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    while not go.exists():
        time.sleep(0.01)
    image = Image.new("RGB", (16, 16), (colour, colour, colour))
    placed = []
    for round in range(25):
        for i in range(8):
            name = f"class_{i:05d}.png"
            if replace == "no":
                if save_image_atomic(image, folder / name, replace=False):
                    placed.append(name)
            else:
                save_image_atomic(image, folder / name)
    print(json.dumps(placed))
    """
)


@pytest.mark.parametrize("replace", ["no", "yes"])
def test_concurrent_writers_of_the_same_images(replace, tmp_path):
    folder = tmp_path / "class_images"
    folder.mkdir()
    go = tmp_path / "go"
    colours = (40, 200)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", IMAGE_WRITER, str(folder), str(c), str(go), replace],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in colours
    ]
    time.sleep(1.0)  # both interpreters up, then both start at once
    go.touch()
    outputs = [w.communicate(timeout=300) for w in writers]
    for w, (_, err) in zip(writers, outputs, strict=True):
        assert w.returncode == 0, err[-2000:]  # e.g. FileNotFoundError on a shared temp name
    names = [f"class_{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in folder.iterdir()) == names  # no temporaries left
    for name in names:
        pixels = np.asarray(Image.open(folder / name))
        assert pixels.shape == (16, 16, 3) and len(np.unique(pixels)) == 1  # one writer's, whole
    if replace == "no":
        placed = [json.loads(out) for out, _ in outputs]
        for name in names:
            (winner,) = [c for c, p in zip(colours, placed, strict=True) if name in p]
            assert sum(p.count(name) for p in placed) == 1  # placed once, never replaced
            assert np.asarray(Image.open(folder / name))[0, 0, 0] == winner


def test_an_image_already_there_is_kept(tmp_path):
    path = tmp_path / "class_00000.png"
    assert save_image_atomic(Image.new("RGB", (4, 4), (255, 0, 0)), path, replace=False)
    assert not save_image_atomic(Image.new("RGB", (4, 4), (0, 0, 255)), path, replace=False)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_00000.png"]


def test_without_hard_links_an_image_already_there_is_still_kept(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    path = tmp_path / "class_00000.png"
    assert save_image_atomic(Image.new("RGB", (4, 4), (255, 0, 0)), path, replace=False)
    assert not save_image_atomic(Image.new("RGB", (4, 4), (0, 0, 255)), path, replace=False)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_00000.png"]
