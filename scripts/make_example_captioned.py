"""Draw the tiny example captioned dataset: 12 simple scenes, each with its exact caption.

The images stand in for a captioned fine-tuning set (layout: `NN.png` + `NN.txt`), so smoke tests
and CPU examples of full fine-tuning / LoRA run without downloading one. Every caption says
exactly what is drawn ("a red circle on a blue background"): shape, colour and background vary
independently, so a model that learned the captions can be checked by eye on held-out mixes.

Deterministic: no randomness, the same command always writes the same files.

    python scripts/make_example_captioned.py [--out data/example_captioned]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
# Draw at 4x and downsample: PIL's polygons are not anti-aliased.
SUPERSAMPLE = 4

COLOURS = {
    "red": (214, 32, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 200),
    "yellow": (250, 210, 20),
    "purple": (130, 50, 160),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (245, 170, 200),
}

# (shape, shape colour, background colour, size as a fraction of the image, centre x, centre y).
# Each shape appears three times, in three colours on three backgrounds, at varied size/place.
SCENES = [
    ("circle", "red", "blue", 0.34, 0.50, 0.50),
    ("square", "yellow", "black", 0.30, 0.45, 0.55),
    ("triangle", "green", "white", 0.36, 0.52, 0.48),
    ("star", "orange", "purple", 0.38, 0.50, 0.52),
    ("circle", "white", "green", 0.26, 0.38, 0.40),
    ("square", "blue", "pink", 0.36, 0.56, 0.50),
    ("triangle", "purple", "yellow", 0.30, 0.40, 0.58),
    ("star", "red", "white", 0.32, 0.58, 0.44),
    ("circle", "black", "orange", 0.38, 0.55, 0.55),
    ("square", "green", "gray", 0.24, 0.60, 0.38),
    ("triangle", "orange", "blue", 0.40, 0.50, 0.50),
    ("star", "yellow", "black", 0.30, 0.42, 0.50),
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, bg: str) -> str:
    return f"{article(colour)} {colour} {shape} on {article(bg)} {bg} background"


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a regular shape of circumradius r (circle: a 96-gon)."""
    if shape == "square":
        n, start = 4, math.pi / 4
    elif shape == "triangle":
        n, start = 3, -math.pi / 2
    elif shape == "circle":
        n, start = 96, 0.0
    elif shape == "star":
        # Ten vertices alternating outer and inner radius, one point up.
        return [
            (
                cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (
            cx + r * math.cos(start + 2 * math.pi * k / n),
            cy + r * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def render(shape: str, colour: str, bg: str, size: float, cx: float, cy: float) -> Image.Image:
    side = SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), COLOURS[bg])
    points = shape_points(shape, cx * side, cy * side, size * side)
    # The whole shape must be in frame so the caption is true; catch a bad SCENES edit.
    if min(min(x, y) for x, y in points) < 0 or max(max(x, y) for x, y in points) > side:
        raise ValueError(f"scene {(shape, size, cx, cy)} puts the shape out of frame")
    ImageDraw.Draw(canvas).polygon(points, fill=COLOURS[colour])
    return canvas.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "data" / "example_captioned",
        help="output folder (default: <repo>/data/example_captioned)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (shape, colour, bg, size, cx, cy) in enumerate(SCENES):
        render(shape, colour, bg, size, cx, cy).save(args.out / f"{i:02d}.png")
        (args.out / f"{i:02d}.txt").write_text(caption(shape, colour, bg) + "\n", encoding="utf-8")
        print(args.out / f"{i:02d}.png", "|", caption(shape, colour, bg))


if __name__ == "__main__":
    main()
