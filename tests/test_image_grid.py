"""make_grid: captions label rows, labels label each image (and stay inside it)."""

import numpy as np
import pytest
from PIL import Image

from t2ilab.toy.alignment import save_grid
from t2ilab.utils.images import LINE_HEIGHT, make_grid

W = H = 48


def tiles(n):
    return [Image.new("RGB", (W, H), (0, 120 + i, 200)) for i in range(n)]


def strip_ink(grid, row, col, strip):
    """How many dark pixels the label strip above cell (row, col) holds."""
    a = np.asarray(grid)[row * (H + strip) : row * (H + strip) + strip, col * W : (col + 1) * W]
    return int((a.sum(axis=2) < 300).sum())


def test_each_image_gets_its_own_label():
    labels = ["star", "", "heart", "cross", "", "ring", "x", "moon"]
    grid = make_grid(tiles(8), rows=2, labels=labels)
    strip = LINE_HEIGHT + 3
    assert grid.size == (4 * W, 2 * (H + strip))
    for i, label in enumerate(labels):
        ink = strip_ink(grid, *divmod(i, 4), strip)
        assert (ink > 0) == bool(label), (i, label, ink)


def test_a_long_label_is_cut_at_its_image_edge():
    grid = make_grid(tiles(2), rows=1, labels=["a very long label that runs on and on", ""])
    strip = LINE_HEIGHT + 3
    assert strip_ink(grid, 0, 0, strip) > 0
    assert strip_ink(grid, 0, 1, strip) == 0


def test_multiline_labels_make_a_taller_strip():
    grid = make_grid(tiles(2), rows=1, labels=["red star\non blue", "x"])
    assert grid.size == (2 * W, H + 2 * LINE_HEIGHT + 3)
    second_line = np.asarray(grid)[LINE_HEIGHT + 1 : 2 * LINE_HEIGHT + 3, :W]
    assert (second_line.sum(axis=2) < 300).any()


def test_captions_label_rows_only():
    grid = make_grid(tiles(4), rows=2, captions=["first row", "second row"])
    strip = LINE_HEIGHT + 3
    assert strip_ink(grid, 0, 0, strip) > 0 and strip_ink(grid, 1, 0, strip) > 0
    assert strip_ink(grid, 0, 1, strip) == 0  # one caption a row, written from the left


def test_bad_label_lists_are_refused():
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        make_grid(tiles(2), labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="not both"):
        make_grid(tiles(2), captions=["a"], labels=["a", "b"])


def test_alignment_grid_labels_every_image(tmp_path):
    """The alignment grid's images were each asked for another shape: every cell is labelled,
    not only the first of each row; 10 images make two rows of 5 (at most 8 a row)."""
    labels = [f"s{i}" for i in range(10)]
    path = save_grid(tiles(10), labels, tmp_path / "alignment.png", shown=16)
    grid = Image.open(path).convert("RGB")
    strip = LINE_HEIGHT + 3
    assert grid.size == (5 * W, 2 * (H + strip))
    for i in range(10):
        assert strip_ink(grid, *divmod(i, 5), strip) > 0, i
