"""Image grids: people would rather look than read."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

LINE_HEIGHT = 11  # PIL's default bitmap font is 11 px tall


def make_grid(
    images: list[Image.Image],
    rows: int | None = None,
    captions: list[str] | None = None,
    labels: list[str] | None = None,
) -> Image.Image:
    """Tile equally sized images row-major. `captions`: one strip above each row (a row is one
    prompt). `labels`: one per image, above that image and cut to its width (a grid whose
    images were each asked for something else); a label may have several lines."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if captions and labels:
        raise ValueError(
            "make_grid takes captions (one per row) or labels (one per image), not both"
        )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid got {len(labels)} labels for {len(images)} images")
    cols = math.ceil(len(images) / rows) if rows else math.ceil(math.sqrt(len(images)))
    rows = rows or math.ceil(len(images) / cols)
    w, h = images[0].size
    lines = max((label.count("\n") + 1 for label in labels), default=1) if labels else 1
    strip = LINE_HEIGHT * lines + 3 if (captions or labels) else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(image.convert("RGB").resize((w, h)), (c * w, r * (h + strip) + strip))
        if labels:
            # Drawn on its own tile so that a long label is cut at the image's edge instead of
            # running over its neighbour's.
            tile = Image.new("RGB", (w, strip), "white")
            ImageDraw.Draw(tile).multiline_text((2, 1), labels[i], fill="black", spacing=0)
            grid.paste(tile, (c * w, r * (h + strip)))
    for r, caption in enumerate(captions or []):
        draw.text((2, r * (h + strip) + 1), caption, fill="black")
    return grid
