"""Image grids: people would rather look than read."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw


def make_grid(
    images: list[Image.Image], rows: int | None = None, captions: list[str] | None = None
) -> Image.Image:
    """Tile equally sized images row-major; an optional caption strip above each row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = math.ceil(len(images) / rows) if rows else math.ceil(math.sqrt(len(images)))
    rows = rows or math.ceil(len(images) / cols)
    w, h = images[0].size
    strip = 14 if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(image.convert("RGB").resize((w, h)), (c * w, r * (h + strip) + strip))
    for r, caption in enumerate(captions or []):
        draw.text((2, r * (h + strip) + 1), caption, fill="black")
    return grid
