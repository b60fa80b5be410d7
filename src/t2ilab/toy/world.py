"""A procedural "toy world": small RGB images of coloured shapes with exact captions.

Real image-text data is too large to pretrain a VAE, a CLIP or a diffusion model on a CPU in
minutes. This world is small enough for that and still compositional: every image is one shape
(8 classes) with a colour, size, position, optional pattern (stripes or dots) and a background,
and its caption states all of them exactly, so a tiny model's mistakes can be read off the
caption ("it draws the right shape in the wrong colour").

DreamBooth needs a *subject* the pretrained model has never seen. `SUBJECTS` are such objects:
each carries a feature the world never produces (two-colour stripes, a single central spot), so
a model fine-tuned on a subject's instance images learns something genuinely new.

Everything is pure PIL + numpy and deterministic: scene `index` of `seed` is always the same
scene (`scene_at`), and a scene always renders to the same pixels. Shapes are drawn at 4x and
box-downsampled, so edges are antialiased; a 64x64 render takes about half a millisecond.

Command line (writes PNG folders in the layouts this project's datamodules read):

    python -m t2ilab.toy.world subject striped_star OUT_DIR [--n 6]
    python -m t2ilab.toy.world captioned OUT_DIR --n 1000 [--caption dense|class]
    python -m t2ilab.toy.world classes OUT_DIR --n-per-class 100
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from t2ilab.errors import UserError
from t2ilab.utils.atomic import save_image_atomic, write_text_atomic

# --- the world's vocabulary ----------------------------------------------------------------------

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "hexagon",
)

# Saturated, well-separated colours: each is recognisable at 32x32 and none is a blend of two
# neighbours, so a caption's colour word has one right answer.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (130, 40, 180),
    "pink": (255, 130, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}

# Texture backgrounds use colours outside COLORS (teal; sky blue to mint), so no shape colour
# disappears into them.
TEXTURES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "checkered": ((90, 190, 190), (30, 105, 110)),
    "gradient": ((140, 215, 250), (40, 245, 140)),
}
BACKGROUNDS: tuple[str, ...] = (*COLORS, *TEXTURES)
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots")

# Shape diameter as a fraction of the image side.
SIZE_FRACTION = {"small": 0.34, "medium": 0.48, "large": 0.66}
# (column, row) in -1/0/1 of each position.
POSITION_OFFSETS = {
    name: (column, row)
    for name, (row, column) in zip(
        POSITIONS, [(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1)], strict=True
    )
}
# Poses stay within +-20 degrees: beyond that a square starts to look like a diamond.
MAX_ROTATION = 20.0
MAX_JITTER = 0.03
EDGE_MARGIN = 0.04  # fraction of the image between an edge shape and the border (> MAX_JITTER)
SUPERSAMPLE = 4  # PIL's polygons are not antialiased: draw at 4x, box-downsample

# Stripes: period in fractions of the image side, so they are equally wide on every shape and
# survive downsampling to 32x32. Dots: in fractions of the shape's radius, so every shape, even
# a small star, holds several (a lone central dot would look like a subject's spot).
STRIPE_PERIOD = 0.125
DOT_SPACING = 0.44
DOT_RADIUS = 0.12
SPOT_RADIUS = 0.24  # the subjects' single spot: twice a dot


# --- scenes --------------------------------------------------------------------------------------


def _choices(values) -> str:
    return ", ".join(values)


def _check_member(field: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"Scene.{field}={value!r} is not allowed: use one of {_choices(allowed)}")


def _is_jitter(value) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(j, int | float) and abs(j) <= 0.25 for j in value)
    )


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image; `render` and `dense_caption` read only this."""

    shape: str
    color: str
    background: str
    size: str = "medium"
    position: str = "center"
    pattern: str = "plain"
    pattern_color: str | None = None  # required when pattern != "plain"
    second_pattern_color: str | None = None  # stripes alternate two colours (subjects only)
    spot_color: str | None = None  # one extra dot in the middle (subjects only)
    rotation: float = 0.0  # degrees counter-clockwise, a "pose"
    jitter: tuple[float, float] = (0.0, 0.0)  # (x, y) offset in fractions of the image side

    def validate(self) -> None:
        """A one-line error naming the bad field and what is allowed, instead of a KeyError
        deep inside rendering or an image whose caption is wrong."""
        _check_member("shape", self.shape, SHAPES)
        _check_member("color", self.color, COLORS)
        _check_member("background", self.background, BACKGROUNDS)
        _check_member("size", self.size, SIZES)
        _check_member("position", self.position, POSITIONS)
        _check_member("pattern", self.pattern, PATTERNS)
        if self.background == self.color:
            raise UserError(
                f"Scene.background={self.background!r} is the shape's colour, which hides "
                f"the shape: use one of {_choices(b for b in BACKGROUNDS if b != self.color)}"
            )
        self._validate_pattern()
        if self.spot_color is not None:
            _check_member("spot_color", self.spot_color, COLORS)
        if not isinstance(self.rotation, int | float) or not math.isfinite(self.rotation):
            raise UserError(f"Scene.rotation={self.rotation!r} is not allowed: use degrees")
        if not _is_jitter(self.jitter):
            raise UserError(
                f"Scene.jitter={self.jitter!r} is not allowed: use (x, y) with each "
                "in -0.25..0.25 (fractions of the image side)"
            )

    def _validate_pattern(self) -> None:
        if self.pattern == "plain":
            for field in ("pattern_color", "second_pattern_color"):
                if getattr(self, field) is not None:
                    raise UserError(
                        f"Scene.{field}={getattr(self, field)!r} is not allowed with "
                        "pattern='plain': use None, or pattern 'stripes'/'dots'"
                    )
            return
        if self.pattern_color is None:
            raise UserError(
                f"Scene.pattern_color=None is not allowed with pattern={self.pattern!r}: "
                f"use one of {_choices(c for c in COLORS if c != self.color)}"
            )
        for field in ("pattern_color", "second_pattern_color"):
            value = getattr(self, field)
            if value is None:
                continue
            _check_member(field, value, COLORS)
            if value == self.color:
                raise UserError(
                    f"Scene.{field}={value!r} is the shape's colour, which hides the "
                    f"pattern: use one of {_choices(c for c in COLORS if c != self.color)}"
                )
        if self.second_pattern_color is not None and self.pattern != "stripes":
            raise UserError(
                f"Scene.second_pattern_color={self.second_pattern_color!r} is not allowed "
                f"with pattern={self.pattern!r}: use None, or pattern='stripes'"
            )


# --- captions ------------------------------------------------------------------------------------

# Caption attributes that may be left out; the shape is always named.
OPTIONAL_ATTRIBUTES = ("size", "color", "pattern", "background", "position")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pattern_phrase(scene: Scene) -> str:
    """' with white dots', ' with orange and purple stripes and a white dot', or ''."""
    parts = []
    if scene.pattern != "plain":
        colors = scene.pattern_color
        if scene.second_pattern_color is not None:
            colors = f"{scene.pattern_color} and {scene.second_pattern_color}"
        parts.append(f"{colors} {scene.pattern}")
    if scene.spot_color is not None:
        parts.append(f"{_article(scene.spot_color)} {scene.spot_color} dot")
    return " with " + " and ".join(parts) if parts else ""


def background_phrase(background: str) -> str:
    return f"{_article(background)} {background} background"


def dense_caption(scene: Scene) -> str:
    """Every attribute, in a fixed order: 'a small red star with white dots on a green
    background, top left'."""
    scene.validate()
    return (
        f"{_article(scene.size)} {scene.size} {scene.color} {scene.shape}"
        f"{_pattern_phrase(scene)} on {background_phrase(scene.background)}, {scene.position}"
    )


def partial_caption(scene: Scene, stated: Iterable[str]) -> str:
    """The dense caption's grammar with only the `stated` attributes (the shape always):
    all of OPTIONAL_ATTRIBUTES gives exactly `dense_caption(scene)`."""
    stated = set(stated)
    words = [scene.size] if "size" in stated else []
    words += [scene.color] if "color" in stated else []
    words.append(scene.shape)
    text = f"{_article(words[0])} {' '.join(words)}"
    if "pattern" in stated:
        text += _pattern_phrase(scene)
    if "background" in stated:
        text += f" on {background_phrase(scene.background)}"
    if "position" in stated:
        text += f", {scene.position}"
    return text


def class_caption(scene: Scene) -> str:
    """The class noun alone ('a star'): DreamBooth's class prompt and a class-only caption."""
    return f"{_article(scene.shape)} {scene.shape}"


# --- sampling ------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, values: Sequence):
    return values[int(rng.integers(len(values)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    pattern_prob: float = 0.35,
    pose_jitter: bool = True,
) -> Scene:
    """One scene of the world's distribution. The shape never has the background's colour and
    a pattern never has the shape's; two-colour stripes and spots never occur (they are what
    makes a subject new). Draws the same number of random values whatever the outcome, so
    changing `pattern_prob` does not reshuffle the other attributes."""
    for shape in shapes:
        _check_member("shape", shape, SHAPES)
    if not 0.0 <= pattern_prob <= 1.0:
        raise UserError(f"pattern_prob={pattern_prob} is not a probability: use 0.0 to 1.0")
    colors = tuple(COLORS)
    shape = _pick(rng, tuple(shapes))
    color = _pick(rng, colors)
    background = _pick(rng, tuple(b for b in BACKGROUNDS if b != color))
    size = _pick(rng, SIZES)
    position = _pick(rng, POSITIONS)
    patterned = rng.random() < pattern_prob
    pattern = _pick(rng, PATTERNS[1:])
    pattern_color = _pick(rng, tuple(c for c in colors if c != color))
    rotation = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    jitter = tuple(float(j) for j in rng.uniform(-MAX_JITTER, MAX_JITTER, size=2))
    return Scene(
        shape=shape,
        color=color,
        background=background,
        size=size,
        position=position,
        pattern=pattern if patterned else "plain",
        pattern_color=pattern_color if patterned else None,
        rotation=round(rotation, 2) if pose_jitter else 0.0,
        jitter=(round(jitter[0], 4), round(jitter[1], 4)) if pose_jitter else (0.0, 0.0),
    )


def scene_at(seed: int, index: int, **kw) -> Scene:
    """Scene `index` of the world with `seed`: independent of every other index, so datasets
    of any length and any worker split agree on it."""
    return sample_scene(np.random.default_rng([seed, index]), **kw)


# --- rendering -----------------------------------------------------------------------------------


def _regular_polygon(sides: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(sides) / sides)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.08, 0.52)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 15.0


def _cross() -> np.ndarray:
    """A plus sign: one arm's three corners, turned by 0, 90, 180 and 270 degrees."""
    a, b = 0.34, 1.0  # arm half-width, arm length
    arm = np.array([(-a, -b), (a, -b), (a, -a)])
    quarter_turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    return np.concatenate([arm @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)])


def _centred(points: np.ndarray) -> np.ndarray:
    """Centre the bounding box on the origin, so every shape sits where its position says."""
    return points - (points.min(axis=0) + points.max(axis=0)) / 2


# Outlines in local units (y down): each spans about [-1, 1], so sizes compare across shapes.
OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular_polygon(96, 1.0, 0.0),
    "square": _regular_polygon(4, 1.22, 45.0),  # half-side 0.86: same area feel as the circle
    "triangle": _centred(_regular_polygon(3, 1.18, -90.0)),
    "star": _centred(_star()),
    "heart": _centred(_heart()),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.05), (0.7, 0.0), (0.0, 1.05), (-0.7, 0.0)]),
    "hexagon": _regular_polygon(6, 1.02, -90.0),
}


def _centroid(points: np.ndarray) -> np.ndarray:
    """Area centroid of a polygon: where a triangle's or heart's "middle" visibly is."""
    x, y = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * area)


CENTROIDS = {name: _centroid(points) for name, points in OUTLINES.items()}


@functools.lru_cache(maxsize=64)
def _background(name: str, side: int) -> Image.Image:
    """The background at the drawing resolution (cached; callers copy before drawing)."""
    if name in COLORS:
        return Image.new("RGB", (side, side), COLORS[name])
    first, second = (np.array(c, dtype=np.float32) for c in TEXTURES[name])
    if name == "checkered":
        cells = (np.arange(side) * 8 // side) % 2  # 8x8 checks
        which = (cells[:, None] ^ cells[None, :]).astype(np.float32)[..., None]
    else:  # gradient: top to bottom
        which = np.broadcast_to(
            np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None], (side, side, 1)
        )
    pixels = first * (1 - which) + second * which
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


class _Frame:
    """Maps a shape's local units (rotated with it) to drawing pixels."""

    def __init__(self, scene: Scene, side: int):
        diameter = SIZE_FRACTION[scene.size]
        angle = math.radians(scene.rotation)
        # Counter-clockwise on screen, where y points down.
        self.matrix = np.array(
            [[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]]
        )
        self.radius = side * diameter / 2
        # Edge and corner positions put the rotated shape's bounding box EDGE_MARGIN from the
        # border, so a position word means the same gap for every shape, size and pose (and
        # the world's jitter, smaller than the margin, never cuts a shape off).
        turned = OUTLINES[scene.shape] @ self.matrix.T * (diameter / 2)
        low, high = turned.min(axis=0), turned.max(axis=0)
        offsets = POSITION_OFFSETS[scene.position]
        center = []
        for axis, offset in enumerate(offsets):
            if offset < 0:
                center.append(EDGE_MARGIN - low[axis])
            elif offset > 0:
                center.append(1.0 - EDGE_MARGIN - high[axis])
            else:
                center.append(0.5)
        self.center = side * (np.array(center) + np.array(scene.jitter))

    def pixels(self, points: np.ndarray) -> list[tuple[float, float]]:
        xy = self.center + self.radius * (np.asarray(points) @ self.matrix.T)
        return [tuple(p) for p in xy.tolist()]


def _stripes(draw: ImageDraw.ImageDraw, frame: _Frame, colors: list[tuple], side: int) -> None:
    """Diagonal bands (at 45 degrees to the shape, turning with it), one centred on the middle;
    with two colours they alternate, with the shape's colour in between."""
    period = STRIPE_PERIOD * side / frame.radius  # local units
    half_width = period / 4
    direction = np.array([1.0, 1.0]) / math.sqrt(2)  # across the bands
    along = np.array([1.0, -1.0]) / math.sqrt(2)
    count = int(math.ceil(1.6 / period)) + 1
    for k in range(-count, count + 1):
        middle = k * period * direction
        corners = [
            middle + s * half_width * direction + t * 2.0 * along
            for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))
        ]
        draw.polygon(frame.pixels(np.array(corners)), fill=colors[k % len(colors)])


def _inside(mask: np.ndarray, x: float, y: float, radius: float) -> bool:
    """Whether a disc lies in the shape: checks its centre and 8 points on its rim."""
    side = mask.shape[0]
    for angle in range(0, 360, 45):
        px = round(x + radius * math.cos(math.radians(angle)))
        py = round(y + radius * math.sin(math.radians(angle)))
        if not (0 <= px < side and 0 <= py < side and mask[py, px]):
            return False
    return bool(mask[round(y), round(x)])


def _dot_centres(frame: _Frame, mask: np.ndarray, keep_out=None) -> list[tuple[float, float]]:
    """Centres (drawing pixels) of a staggered grid of whole dots, no dot cut by the edge,
    turning with the shape; `keep_out` is the (centre, radius) of a spot no dot may touch."""
    radius = DOT_RADIUS * frame.radius
    count = int(1.2 / DOT_SPACING) + 1
    centres = []
    for row in range(-count, count + 1):
        shift = 0.5 * (row % 2)
        for column in range(-count, count + 1):
            local = np.array([[(column + shift) * DOT_SPACING, row * DOT_SPACING * 0.87]])
            ((x, y),) = frame.pixels(local)
            if keep_out is not None:
                (cx, cy), spot_radius = keep_out
                if math.hypot(x - cx, y - cy) < spot_radius + radius * 1.5:
                    continue
            if _inside(mask, x, y, radius * 1.3):
                centres.append((x, y))
    return centres


def _dots(draw, frame: _Frame, color: tuple, mask: np.ndarray, keep_out) -> None:
    radius = DOT_RADIUS * frame.radius
    for x, y in _dot_centres(frame, mask, keep_out):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)


def _check_resolution(resolution: int) -> None:
    if resolution < 8:
        raise UserError(f"resolution {resolution} is too small: use 8 or more pixels")


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """The scene as an RGB image, always the same pixels for the same scene and resolution."""
    scene.validate()
    _check_resolution(resolution)
    side = resolution * SUPERSAMPLE
    frame = _Frame(scene, side)
    outline = frame.pixels(OUTLINES[scene.shape])
    mask_image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask_image).polygon(outline, fill=255)
    fill = Image.new("RGB", (side, side), COLORS[scene.color])
    draw = ImageDraw.Draw(fill)
    spot = None
    if scene.spot_color is not None:
        (center,) = frame.pixels(CENTROIDS[scene.shape][None])
        spot = (center, SPOT_RADIUS * frame.radius)
    if scene.pattern == "stripes":
        colors = [scene.pattern_color, scene.second_pattern_color or scene.pattern_color]
        _stripes(draw, frame, [COLORS[c] for c in colors], side)
    elif scene.pattern == "dots":
        mask = np.asarray(mask_image) > 0
        _dots(draw, frame, COLORS[scene.pattern_color], mask, spot)
    if spot is not None:
        (x, y), r = spot
        draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[scene.spot_color])
    image = _background(scene.background, side).copy()
    image.paste(fill, mask=mask_image)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


# --- dataset -------------------------------------------------------------------------------------

CAPTION_MODES = ("dense", "class", "both")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [-1, 1], the range the VAEs here expect."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


class ToyWorldDataset(Dataset):
    """`size` scenes of the world, rendered on demand: item i is `scene_at(seed, i)`, so it is
    the same in every worker and every epoch, and nothing is stored."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        resolution: int = 64,
        caption: str = "dense",
        *,
        shapes: Sequence[str] = SHAPES,
        pattern_prob: float = 0.35,
        pose_jitter: bool = True,
    ):
        if caption not in CAPTION_MODES:
            raise UserError(f"caption={caption!r} is not allowed: use one of dense, class, both")
        if size < 1:
            raise UserError(f"size={size} is not allowed: use 1 or more scenes")
        self.size = size
        self.seed = seed
        self.resolution = resolution
        self.caption = caption
        self.scene_kw = {
            "shapes": tuple(shapes),
            "pattern_prob": pattern_prob,
            "pose_jitter": pose_jitter,
        }

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        return scene_at(self.seed, index, **self.scene_kw)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        short = class_caption(scene)
        return {
            "image": image_to_tensor(render(scene, self.resolution)),
            "caption": short if self.caption == "class" else dense_caption(scene),
            "class_caption": short,
            "shape_index": SHAPES.index(scene.shape),
            "color_index": list(COLORS).index(scene.color),
            "scene": scene,
        }


def toy_collate(batch: list[dict]) -> dict:
    """Stack tensors, turn indices into long tensors, keep strings and scenes as lists."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


# --- DreamBooth subjects -------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A unique object the world never produces. `base` fixes its appearance (shape, colour,
    pattern, spot); background, size, position and pose vary between instance images."""

    name: str
    class_name: str
    base: Scene
    description: str


def _subject(name: str, base: Scene) -> Subject:
    # The description reuses the caption grammar so it can never disagree with the images.
    description = f"{_article(base.color)} {base.color} {base.shape}{_pattern_phrase(base)}"
    return Subject(name=name, class_name=base.shape, base=base, description=description)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        _subject(
            "striped_star",
            Scene(
                "star",
                "yellow",
                "gray",
                pattern="stripes",
                pattern_color="orange",
                second_pattern_color="purple",
                spot_color="white",
            ),
        ),
        _subject(
            "candy_heart",
            Scene(
                "heart",
                "white",
                "gray",
                pattern="stripes",
                pattern_color="pink",
                second_pattern_color="black",
            ),
        ),
        _subject(
            "spotted_hexagon",
            Scene(
                "hexagon", "blue", "gray", pattern="dots", pattern_color="green", spot_color="red"
            ),
        ),
    )
}

# Subjects are mostly medium or large (stripes and spots need the pixels), now and then small,
# in a wider range of poses than the world (no subject's class turns into another shape when
# rotated further).
SUBJECT_SIZES = ("small", "medium", "medium", "large", "large")
SUBJECT_MAX_ROTATION = 35.0


def _subject_colors(subject: Subject) -> set[str]:
    base = subject.base
    return {base.color, base.pattern_color, base.second_pattern_color, base.spot_color} - {None}


def subject_scenes(subject: Subject, n: int, seed: int = 0) -> list[Scene]:
    """`n` instance scenes of `subject`: varied pose, size, position and background. Backgrounds
    and positions are dealt from shuffled decks, so a handful of images never repeats one;
    no background has one of the subject's own colours, which would hide part of it."""
    rng = np.random.default_rng([seed, zlib.crc32(subject.name.encode())])
    used = _subject_colors(subject)
    backgrounds = [b for b in BACKGROUNDS if b not in used]
    background_deck = [backgrounds[j] for j in rng.permutation(len(backgrounds))]
    position_deck = [POSITIONS[j] for j in rng.permutation(len(POSITIONS))]
    scenes = []
    for i in range(n):
        size = _pick(rng, SUBJECT_SIZES)
        rotation = round(float(rng.uniform(-SUBJECT_MAX_ROTATION, SUBJECT_MAX_ROTATION)), 2)
        scenes.append(
            dataclasses.replace(
                subject.base,
                background=background_deck[i % len(background_deck)],
                size=size,
                position=position_deck[i % len(position_deck)],
                rotation=rotation,
            )
        )
    return scenes


def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise UserError(f"unknown subject {name!r}: use one of {_choices(SUBJECTS)}")
    return SUBJECTS[name]


# --- writing folders -----------------------------------------------------------------------------


# What an OS drops into a folder by itself: a folder holding only these counts as empty.
_OS_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def _prepare_out_dir(folder: Path) -> None:
    """Create the output folder, refusing one that holds anything (OS files aside): the writers
    never overwrite or add to a user's data. An earlier output of the same command is refused
    too: nothing tells its files from a user's of the same names, and rerunning it gives the
    same files anyway."""
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{folder} is a broken link: remove it or choose a new path")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: choose an empty folder (or a new path)")
    if folder.is_dir() and any(p.name not in _OS_FILES for p in folder.iterdir()):
        raise UserError(
            f"{folder} is not empty, refusing to overwrite: choose an empty folder (or a new "
            "path); to redo an earlier output of this command, delete that folder first"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{folder} cannot be created ({err.strerror or err.__class__.__name__}): "
            "choose a folder you can write to"
        ) from None


def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def _check_count(flag: str, n: int, resolution: int) -> None:
    """Bad arguments fail before a folder is created."""
    if n < 1:
        raise UserError(f"{flag} {n} is not allowed: use 1 or more")
    _check_resolution(resolution)


def write_subject(
    name: str, out_dir: str | Path, n: int = 6, seed: int = 0, resolution: int = 64
) -> list[Path]:
    """Instance images `00.png`, `01.png`, ... of a subject (a DreamBooth instance folder)."""
    subject = get_subject(name)
    _check_count("--n", n, resolution)
    out = Path(out_dir)
    _prepare_out_dir(out)
    paths = []
    for i, scene in enumerate(subject_scenes(subject, n, seed)):
        path = out / f"{i:02d}.png"
        save_image_atomic(render(scene, resolution), path)
        paths.append(path)
    return paths


def write_captioned(
    out_dir: str | Path, n: int, seed: int = 0, resolution: int = 64, caption: str = "dense"
) -> Path:
    """`n` world images plus `metadata.jsonl` (the Hugging Face imagefolder layout that
    `t2ilab.data.captioned` reads). The metadata is written last, so an interrupted run never
    leaves a folder that looks complete."""
    if caption not in ("dense", "class"):
        raise UserError(f"--caption {caption} is not allowed: use dense or class")
    _check_count("--n", n, resolution)
    out = Path(out_dir)
    _prepare_out_dir(out)
    to_text = dense_caption if caption == "dense" else class_caption
    lines = []
    for i in _progress(range(n), n, "captioned"):
        scene = scene_at(seed, i)
        name = f"{i:05d}.png"
        save_image_atomic(render(scene, resolution), out / name)
        lines.append(json.dumps({"file_name": name, "text": to_text(scene)}))
    metadata = out / "metadata.jsonl"
    write_text_atomic(metadata, "\n".join(lines) + "\n")
    return metadata


def write_classes(
    out_dir: str | Path, n_per_class: int, seed: int = 0, resolution: int = 64
) -> list[Path]:
    """`OUT_DIR/<shape>/00000.png ...`, the ImageNet layout `t2ilab.data.class_folder` reads.
    Image i of class k is scene i * len(SHAPES) + k restricted to that shape, so every image
    is independent and a larger `n_per_class` only appends images."""
    _check_count("--n-per-class", n_per_class, resolution)
    out = Path(out_dir)
    _prepare_out_dir(out)
    folders = []
    for shape in SHAPES:
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    total = n_per_class * len(SHAPES)
    for i, k in _progress(
        ((i, k) for i in range(n_per_class) for k in range(len(SHAPES))), total, "classes"
    ):
        scene = scene_at(seed, i * len(SHAPES) + k, shapes=(SHAPES[k],))
        save_image_atomic(render(scene, resolution), folders[k] / f"{i:05d}.png")
    return folders


# --- command line --------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2ilab.toy.world",
        description="Render the procedural toy world (coloured shapes with exact captions) "
        "into image folders. The target folder must be new or empty.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    subject = commands.add_parser("subject", help="instance images of a DreamBooth subject")
    subject.add_argument("name", help=f"one of: {_choices(SUBJECTS)}")
    subject.add_argument("out_dir", type=Path, help="a new or empty folder")
    subject.add_argument("--n", type=int, default=6, help="number of images (6)")

    captioned = commands.add_parser("captioned", help="images + metadata.jsonl captions")
    captioned.add_argument("out_dir", type=Path, help="a new or empty folder")
    captioned.add_argument("--n", type=int, required=True, help="number of images")
    captioned.add_argument(
        "--caption",
        choices=("dense", "class"),
        default="dense",
        help="every attribute (dense) or the shape alone (class)",
    )

    classes = commands.add_parser("classes", help="one sub-folder of images per shape")
    classes.add_argument("out_dir", type=Path, help="a new or empty folder")
    classes.add_argument("--n-per-class", type=int, required=True, help="images per shape")

    for command in (subject, captioned, classes):
        command.add_argument("--seed", type=int, default=0, help="world seed (0)")
        command.add_argument("--resolution", type=int, default=64, help="image side (64)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "subject":
            written = write_subject(args.name, args.out_dir, args.n, args.seed, args.resolution)
            summary = f"{len(written)} images of {args.name}"
        elif args.command == "captioned":
            write_captioned(args.out_dir, args.n, args.seed, args.resolution, args.caption)
            summary = f"{args.n} captioned images"
        else:
            write_classes(args.out_dir, args.n_per_class, args.seed, args.resolution)
            summary = f"{args.n_per_class} images for each of {len(SHAPES)} shapes"
    except UserError as err:
        print(f"t2ilab: error: {err}", file=sys.stderr)
        return 2
    print(f"{summary} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
