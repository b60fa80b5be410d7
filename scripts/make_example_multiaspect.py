"""Make data/example_multiaspect/: the captioned examples padded with their own background to
portrait, landscape and square canvases, so PixArt stage 3's aspect-ratio buckets have something
to sort on a CPU. Captions stay true (only background is added).
`python scripts/make_example_multiaspect.py` (after scripts/make_example_captioned.py)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

CANVASES = [(128, 192), (192, 128), (128, 128)]  # (width, height): portrait, landscape, square


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=Path("data/example_captioned"))
    parser.add_argument("--out", type=Path, default=Path("data/example_multiaspect"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(args.src.glob("*.png"))):
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = CANVASES[i % len(CANVASES)]
            canvas = Image.new("RGB", (width, height), image.getpixel((0, 0)))
            canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
            canvas.save(args.out / path.name)
        shutil.copyfile(path.with_suffix(".txt"), args.out / f"{path.stem}.txt")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
