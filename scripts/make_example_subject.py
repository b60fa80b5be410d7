"""Draw the tiny example DreamBooth subject: a red star figurine ("toy") in 6 poses.

The images stand in for the 3-5 photos of a real subject that DreamBooth needs, so smoke tests and
CPU examples run without downloading a dataset. The subject is deliberately distinctive (a red
five-pointed star with yellow stripes, a black outline and a white dot) so that a fine-tuned model
visibly learned it; the poses and backgrounds vary so it cannot just memorise one picture.

Deterministic: no randomness, the same command always writes the same PNGs.

    python scripts/make_example_subject.py [--out data/example_subject]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
# Draw at 4x and downsample: PIL's polygons are not anti-aliased.
SUPERSAMPLE = 4
RED = (214, 32, 40)
YELLOW = (255, 212, 0)
OUTLINE = (30, 20, 20)
WHITE = (255, 255, 255)

# (rotation in degrees, star radius as a fraction of the image, centre x, centre y, background).
# Backgrounds: ("plain", rgb) or ("gradient", top rgb, bottom rgb).
POSES = [
    (0, 0.36, 0.50, 0.50, ("plain", (235, 235, 228))),
    (18, 0.30, 0.38, 0.42, ("gradient", (150, 200, 240), (235, 245, 255))),
    (-25, 0.40, 0.55, 0.56, ("plain", (120, 150, 110))),
    (40, 0.24, 0.64, 0.36, ("gradient", (250, 225, 190), (190, 140, 100))),
    (-8, 0.33, 0.42, 0.60, ("gradient", (70, 70, 95), (150, 150, 175))),
    (160, 0.28, 0.58, 0.48, ("plain", (200, 215, 230))),
]


def star_points(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    """Vertices of an upright five-pointed star, alternating outer and inner radius."""
    points = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_figurine(radius: int) -> Image.Image:
    """The subject on a transparent square canvas of side 2 * radius (supersampled pixels)."""
    side = 2 * radius
    c = radius
    r_out = radius * 0.92
    points = star_points(c, c, r_out, r_out * 0.45)

    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)

    body = Image.new("RGB", (side, side), RED)
    # Diagonal yellow stripes, later clipped to the star by `mask`.
    draw = ImageDraw.Draw(body)
    stripe = max(1, side // 12)
    for offset in range(-side, 2 * side, 3 * stripe):
        band = [(offset, 0), (offset + stripe, 0), (offset + stripe - side, side)]
        draw.polygon([*band, (offset - side, side)], fill=YELLOW)

    figurine = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    figurine.paste(body, (0, 0), mask)
    draw = ImageDraw.Draw(figurine)
    draw.line(points + points[:1], fill=OUTLINE, width=max(2, side // 40), joint="curve")
    # White dot with an outline, slightly above centre: a fixed landmark that shows orientation.
    dot = radius * 0.16
    dot_cy = c - radius * 0.08
    draw.ellipse(
        (c - dot, dot_cy - dot, c + dot, dot_cy + dot),
        fill=WHITE,
        outline=OUTLINE,
        width=max(2, side // 60),
    )
    return figurine


def background(spec: tuple, side: int) -> Image.Image:
    if spec[0] == "plain":
        return Image.new("RGB", (side, side), spec[1])
    top, bottom = spec[1], spec[2]
    # Vertical gradient: a 1-px column resized up is exact and fast.
    column = Image.new("RGB", (1, side))
    for y in range(side):
        t = y / (side - 1)
        column.putpixel(
            (0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    return column.resize((side, side), Image.NEAREST)


def render(angle: float, radius_frac: float, cx: float, cy: float, bg: tuple) -> Image.Image:
    side = SIZE * SUPERSAMPLE
    canvas = background(bg, side)
    radius = round(radius_frac * side)
    figurine = draw_figurine(radius).rotate(angle, resample=Image.BICUBIC, expand=True)
    x = round(cx * side - figurine.width / 2)
    y = round(cy * side - figurine.height / 2)
    # The whole subject must be visible in every training image; catch a bad POSES edit.
    left, top, right, bottom = figurine.getbbox()
    if x + left < 0 or y + top < 0 or x + right > side or y + bottom > side:
        raise ValueError(f"pose {(angle, radius_frac, cx, cy)} puts the subject out of frame")

    # Soft drop shadow so the toy reads as an object standing in front of the background.
    alpha = figurine.getchannel("A").point(lambda a: a * 90 // 255)
    shadow = Image.new("RGBA", figurine.size, (0, 0, 0, 0))
    shadow.putalpha(alpha.filter(ImageFilter.GaussianBlur(side // 80)))
    offset = side // 50
    # paste() with the layer as mask alpha-blends onto the opaque canvas and clips at the edges.
    canvas.paste(shadow, (x + offset, y + offset), shadow)
    canvas.paste(figurine, (x, y), figurine)
    return canvas.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "data" / "example_subject",
        help="output folder (default: <repo>/data/example_subject)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, pose in enumerate(POSES):
        path = args.out / f"subject_{i:02d}.png"
        render(*pose).save(path)
        print(path)


if __name__ == "__main__":
    main()
