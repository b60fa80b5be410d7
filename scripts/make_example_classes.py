"""Make data/example_classes/: a tiny class-labelled set in the ImageNet layout (one folder per
class) for PixArt stage 1 on a CPU. Deterministic: `python scripts/make_example_classes.py`."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 190, 30), (150, 60, 200)]


def draw(shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(image)
    colour = rng.choice(COLOURS)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        k = 3 if shape == "triangle" else 10
        angle = rng.uniform(0, 2 * math.pi)
        points = []
        for i in range(k):
            radius = r if shape == "triangle" or i % 2 == 0 else r * 0.45
            a = angle + 2 * math.pi * i / k
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        d.polygon(points, fill=colour)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/example_classes"))
    parser.add_argument("--per-class", type=int, default=6)
    args = parser.parse_args()
    rng = random.Random(0)
    for shape in SHAPES:
        folder = args.out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(shape, rng).save(folder / f"{i:02d}.png")
    print(f"wrote {len(SHAPES) * args.per_class} images to {args.out}")


if __name__ == "__main__":
    main()
