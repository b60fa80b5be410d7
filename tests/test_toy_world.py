"""The procedural toy world: determinism, exact captions, pixels checked independently of the
renderer's geometry, the world/subject separation, and the folder writers' layouts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from t2ilab.data.captioned import read_captioned_folder
from t2ilab.data.class_folder import read_class_folder
from t2ilab.toy.world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    SUBJECTS,
    Scene,
    ToyWorldDataset,
    class_caption,
    dense_caption,
    main,
    render,
    scene_at,
    subject_scenes,
    toy_collate,
)

ROOT = Path(__file__).resolve().parents[1]


def _pixels(scene: Scene, resolution: int = 64) -> np.ndarray:
    return np.asarray(render(scene, resolution), dtype=np.int16)


def _near(pixels: np.ndarray, color: str, tolerance: int = 12) -> np.ndarray:
    """Mask of pixels within `tolerance` (per channel) of a named colour."""
    return (np.abs(pixels - np.array(COLORS[color])) <= tolerance).all(axis=-1)


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (a tiny flood fill, no scipy needed)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


# --- vocabulary and determinism --------------------------------------------------------------


def test_vocabulary():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    assert all(name.isalpha() for name in SHAPES)
    assert SIZES == ("small", "medium", "large") and PATTERNS == ("plain", "stripes", "dots")
    assert len(POSITIONS) == 9 and "center" in POSITIONS and "top left" in POSITIONS
    textures = [b for b in BACKGROUNDS if b not in COLORS]
    assert len(textures) >= 2 and "checkered" in textures


def test_same_seed_and_index_give_the_same_pixels_and_others_differ():
    first, again = scene_at(3, 17), scene_at(3, 17)
    assert first == again
    assert np.array_equal(_pixels(first), _pixels(again))
    others = [scene_at(3, i) for i in range(16, 19) if i != 17] + [scene_at(4, 17)]
    assert all(other != first for other in others)
    assert not np.array_equal(_pixels(first), _pixels(others[0]))


# --- captions --------------------------------------------------------------------------------


def test_dense_captions_are_exact():
    dots = Scene(
        "star",
        "red",
        "green",
        size="small",
        position="top left",
        pattern="dots",
        pattern_color="white",
    )
    assert dense_caption(dots) == "a small red star with white dots on a green background, top left"
    circle = Scene("circle", "blue", "checkered", size="large")
    assert dense_caption(circle) == "a large blue circle on a checkered background, center"
    subject_like = Scene(
        "star",
        "yellow",
        "orange",
        position="bottom right",
        pattern="stripes",
        pattern_color="white",
        second_pattern_color="purple",
        spot_color="white",
    )
    assert dense_caption(subject_like) == (
        "a medium yellow star with white and purple stripes and a white dot "
        "on an orange background, bottom right"
    )
    spot_only = Scene("hexagon", "blue", "gradient", spot_color="red", rotation=12.0)
    assert dense_caption(spot_only) == (
        "a medium blue hexagon with a red dot on a gradient background, center"
    )
    assert class_caption(dots) == "a star"


def test_subject_descriptions():
    assert SUBJECTS["striped_star"].description == (
        "a yellow star with orange and purple stripes and a white dot"
    )
    for subject in SUBJECTS.values():
        assert subject.class_name == subject.base.shape and subject.class_name in SHAPES
        description = subject.description.removeprefix("a ").removeprefix("an ")
        assert dense_caption(subject.base).startswith(f"a medium {description} on ")
    assert len(SUBJECTS) >= 3


# --- rendering, checked pixel by pixel -------------------------------------------------------


def test_plain_square_centre_is_its_colour_and_corner_is_the_background():
    pixels = _pixels(Scene("square", "red", "white", size="large"))
    assert tuple(pixels[32, 32]) == COLORS["red"]
    assert tuple(pixels[0, 0]) == COLORS["white"] == tuple(pixels[63, 63])


def test_textured_backgrounds_are_textured():
    checkered = _pixels(Scene("circle", "red", "checkered", size="small"))
    assert len({tuple(p) for p in checkered[:8, :16].reshape(-1, 3)}) == 2  # two check colours
    gradient = _pixels(Scene("circle", "red", "gradient", size="small"))
    assert not np.array_equal(gradient[0, 0], gradient[63, 0])
    assert np.array_equal(gradient[0, 0], gradient[0, 63])  # top to bottom


@pytest.mark.parametrize("shape", SHAPES)
def test_small_shapes_land_in_their_ninth(shape):
    for row, vertical in enumerate(("top", "", "bottom")):
        for column, horizontal in enumerate(("left", "", "right")):
            position = f"{vertical} {horizontal}".strip() or "center"
            scene = Scene(shape, "black", "white", size="small", position=position, rotation=15.0)
            ys, xs = np.nonzero((_pixels(scene) != 255).any(axis=-1))
            assert int(xs.mean() // (64 / 3)) == column, (shape, position, xs.mean())
            assert int(ys.mean() // (64 / 3)) == row, (shape, position, ys.mean())
            assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63  # not cut


def test_stripes_show_both_colours_inside_the_shape():
    one = _pixels(
        Scene("circle", "blue", "white", size="large", pattern="stripes", pattern_color="yellow")
    )
    assert _near(one, "blue").sum() > 100 and _near(one, "yellow").sum() > 100
    base = dataclasses.replace(SUBJECTS["striped_star"].base, size="large")
    star = _pixels(base)
    # The same star without pattern or spot: where its pixels differ from the background.
    plain = dataclasses.replace(
        base, pattern="plain", pattern_color=None, second_pattern_color=None, spot_color=None
    )
    inside = ~_near(_pixels(plain), "gray", tolerance=0)
    for color in ("yellow", "orange", "purple", "white"):
        found = _near(star, color)
        assert found.sum() > 20, color
        assert not (found & ~inside).any(), color  # the pattern stays within the star


@pytest.mark.parametrize("shape", SHAPES)
def test_dots_are_several_whole_dots_on_every_shape(shape):
    """Even a small star shows several dots: a lone dot would read as a subject's spot."""
    scene = Scene(shape, "blue", "black", size="small", pattern="dots", pattern_color="white")
    dots = _near(_pixels(scene), "white", tolerance=60)
    assert _components(dots) >= 3


def test_spot_is_one_dot_in_the_middle():
    scene = Scene("hexagon", "blue", "white", size="large", spot_color="red")
    red = _near(_pixels(scene), "red", tolerance=30)
    assert _components(red) == 1
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 32) < 1.5 and abs(ys.mean() - 32) < 1.5


def test_render_is_fast():
    import time

    scenes = [scene_at(0, i) for i in range(200)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene, 64)
    assert (time.perf_counter() - start) / len(scenes) < 0.005


# --- the world's distribution ----------------------------------------------------------------


def test_sampled_scenes_are_valid_and_visible():
    for i in range(1000):
        scene = scene_at(0, i)
        scene.validate()
        assert scene.color != scene.background
        assert scene.pattern_color != scene.color
        assert (scene.pattern == "plain") == (scene.pattern_color is None)


def test_world_never_produces_subject_features():
    scenes = [scene_at(1, i) for i in range(2000)]
    assert all(s.second_pattern_color is None and s.spot_color is None for s in scenes)
    assert {s.pattern for s in scenes} == set(PATTERNS)  # patterns themselves do occur
    assert {s.shape for s in scenes} == set(SHAPES)


def test_sampling_options():
    scenes = [
        scene_at(2, i, shapes=("heart",), pattern_prob=0.0, pose_jitter=False) for i in range(50)
    ]
    assert {s.shape for s in scenes} == {"heart"} and {s.pattern for s in scenes} == {"plain"}
    assert all(s.rotation == 0.0 and s.jitter == (0.0, 0.0) for s in scenes)
    with pytest.raises(ValueError, match="shape='blob'"):
        scene_at(0, 0, shapes=("blob",))


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"shape": "blob"}, ["shape", "circle"]),
        ({"color": "teal"}, ["color", "red"]),
        ({"background": "sky"}, ["background", "checkered"]),
        ({"size": "huge"}, ["size", "medium"]),
        ({"position": "middle"}, ["position", "top left"]),
        ({"pattern": "zigzag"}, ["pattern", "stripes"]),
        ({"background": "red"}, ["background", "shape's colour"]),
        ({"pattern": "dots"}, ["pattern_color", "blue"]),
        ({"pattern": "dots", "pattern_color": "red"}, ["pattern_color", "shape's colour"]),
        ({"pattern_color": "blue"}, ["pattern_color", "plain"]),
        (
            {"pattern": "dots", "pattern_color": "blue", "second_pattern_color": "white"},
            ["second_pattern_color", "stripes"],
        ),
        ({"spot_color": "teal"}, ["spot_color", "white"]),
        ({"jitter": (0.5, 0.0)}, ["jitter", "-0.25..0.25"]),
    ],
)
def test_validate_names_the_field_and_the_allowed_values(changes, names):
    scene = dataclasses.replace(Scene("star", "red", "white"), **changes)
    with pytest.raises(ValueError) as err:
        scene.validate()
    assert all(name in str(err.value) for name in names), str(err.value)
    with pytest.raises(ValueError):
        render(scene)


def test_shapes_are_visually_distinct_to_a_nearest_class_mean_classifier():
    """Raw 16x16 pixels of large black shapes on white, in the world's poses (rotation and
    jitter), rendered at 32x32: class means separate the 8 shapes far above chance (measured
    0.99; chance 0.125)."""
    features, labels = [], []
    for i in range(900):
        scene = dataclasses.replace(
            scene_at(7, i, pattern_prob=0.0),
            color="black",
            background="white",
            size="large",
            position="center",
        )
        small = render(scene, 32).resize((16, 16), Image.Resampling.BOX)
        features.append(np.asarray(small, dtype=np.float32).ravel() / 255)
        labels.append(SHAPES.index(scene.shape))
    x, y = np.array(features), np.array(labels)
    means = np.stack([x[:600][y[:600] == k].mean(axis=0) for k in range(len(SHAPES))])
    predicted = ((x[600:, None] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = (predicted == y[600:]).mean()
    assert accuracy > 4 / len(SHAPES), accuracy


# --- subjects --------------------------------------------------------------------------------


def test_subject_scenes_vary_but_keep_the_subject():
    for subject in SUBJECTS.values():
        scenes = subject_scenes(subject, 6, seed=0)
        assert scenes == subject_scenes(subject, 6, seed=0)
        assert scenes != subject_scenes(subject, 6, seed=1)
        assert len({s.rotation for s in scenes}) == 6
        assert len({s.background for s in scenes}) == 6 and len({s.position for s in scenes}) == 6
        own = {
            subject.base.color,
            subject.base.pattern_color,
            subject.base.second_pattern_color,
            subject.base.spot_color,
        }
        for scene in scenes:
            assert scene.background not in own
            same = (
                "shape",
                "color",
                "pattern",
                "pattern_color",
                "second_pattern_color",
                "spot_color",
            )
            assert all(getattr(scene, f) == getattr(subject.base, f) for f in same)
            scene.validate()


def test_bundled_subject_images_match_the_readme_command():
    for name, subject in SUBJECTS.items():
        folder = ROOT / "data" / "toy_subjects" / name
        files = sorted(folder.glob("*.png"))
        assert [f.name for f in files] == [f"{i:02d}.png" for i in range(6)]
        for path, scene in zip(files, subject_scenes(subject, 6, seed=0), strict=True):
            with Image.open(path) as image:
                assert image.mode == "RGB" and image.size == (64, 64)
                stored = np.asarray(image, dtype=np.int16)
            # Regenerating gives the same picture (exact for the same Pillow version).
            assert np.abs(stored - _pixels(scene)).mean() < 2.0, path


# --- dataset ---------------------------------------------------------------------------------


def test_dataset_items_and_collate():
    dataset = ToyWorldDataset(6, seed=5, resolution=32, caption="both")
    item = dataset[2]
    scene = scene_at(5, 2)
    assert item["scene"] == scene and item["caption"] == dense_caption(scene)
    assert item["class_caption"] == class_caption(scene)
    assert item["shape_index"] == SHAPES.index(scene.shape)
    assert item["color_index"] == list(COLORS).index(scene.color)
    image = item["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    expected = torch.from_numpy(_pixels(scene, 32).astype(np.float32)).permute(2, 0, 1)
    assert torch.allclose((image + 1) * 127.5, expected, atol=1e-3)
    assert ToyWorldDataset(6, seed=5, caption="class")[2]["caption"] == class_caption(scene)
    with pytest.raises(IndexError):
        dataset[6]
    with pytest.raises(ValueError, match="dense, class, both"):
        ToyWorldDataset(6, caption="short")

    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=toy_collate)))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["shape_index"].dtype == torch.long and batch["shape_index"].shape == (4,)
    assert batch["caption"] == [dense_caption(scene_at(5, i)) for i in range(4)]
    assert batch["scene"] == [scene_at(5, i) for i in range(4)]


# --- command line ----------------------------------------------------------------------------


def test_captioned_writer_matches_the_captioned_datamodule(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["captioned", str(out), "--n", "5", "--seed", "3", "--resolution", "32"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == [
        {"file_name": f"{i:05d}.png", "text": dense_caption(scene_at(3, i))} for i in range(5)
    ]
    items = read_captioned_folder(out)
    assert [(p.name, c) for p, c in items] == [(r["file_name"], r["text"]) for r in rows]
    with Image.open(out / "00004.png") as image:
        assert image.size == (32, 32)
        assert np.array_equal(np.asarray(image, dtype=np.int16), _pixels(scene_at(3, 4), 32))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    classes = tmp_path / "class_captions"
    assert main(["captioned", str(classes), "--n", "2", "--caption", "class"]) == 0
    texts = [
        json.loads(line)["text"]
        for line in (classes / "metadata.jsonl").read_text().split("\n")
        if line
    ]
    assert texts == [class_caption(scene_at(0, i)) for i in range(2)]


def test_classes_writer_matches_the_class_folder_layout(tmp_path):
    out = tmp_path / "classes"
    assert main(["classes", str(out), "--n-per-class", "2", "--resolution", "32"]) == 0
    items, classes = read_class_folder(out)
    assert classes == sorted(SHAPES)
    assert len(items) == 2 * len(SHAPES)
    assert sorted(p.name for p in (out / "star").iterdir()) == ["00000.png", "00001.png"]
    with Image.open(out / "circle" / "00000.png") as image:
        pixels = np.asarray(image, dtype=np.int16)
    # Image i of class k is world scene i * len(SHAPES) + k, restricted to that shape.
    expected = scene_at(0, SHAPES.index("circle"), shapes=("circle",))
    assert np.array_equal(pixels, _pixels(expected, 32))


def test_writers_refuse_bad_arguments_before_writing(tmp_path, capsys):
    assert main(["subject", "unicorn", str(tmp_path / "a")]) == 2
    assert main(["captioned", str(tmp_path / "b"), "--n", "0"]) == 2
    assert main(["classes", str(tmp_path / "c"), "--n-per-class", "1", "--resolution", "4"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("t2ilab: error: ") for e in errors)
    assert "striped_star" in errors[0]
    assert not any((tmp_path / name).exists() for name in "abc")
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    assert "captioned" in capsys.readouterr().out


def test_subject_cli_writes_instances_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "star"
    command = [
        sys.executable,
        "-m",
        "t2ilab.toy.world",
        "subject",
        "striped_star",
        str(out),
        "--n",
        "3",
        "--seed",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png"]
    scenes = subject_scenes(SUBJECTS["striped_star"], 3, seed=2)
    with Image.open(out / "01.png") as image:
        assert np.array_equal(np.asarray(image, dtype=np.int16), _pixels(scenes[1]))
    before = (out / "00.png").read_bytes()

    again = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("t2ilab: error: ") and "choose an empty folder" in line
    assert (out / "00.png").read_bytes() == before


def test_dino_views_are_softened_only_when_asked():
    """ObjectViews: degrade_prob=0 gives the crisp renders the first toy_dino trained on, pixel
    for pixel; degrade_prob=1 softens both views (fewer sharp edges, same mean colour)."""
    from t2ilab.toy.streams import ObjectViews, object_at, random_view
    from t2ilab.toy.world import image_to_tensor

    crisp, soft = ObjectViews(4, seed=3), ObjectViews(4, seed=3, degrade_prob=1.0)
    for index in range(4):
        rng = np.random.default_rng([3, index, 11])
        scene = object_at(3, index, 0.25)
        expected = [image_to_tensor(render(random_view(scene, rng))) for _ in range(2)]
        assert torch.equal(crisp[index]["views"], torch.stack(expected))
        assert crisp[index]["key"] == soft[index]["key"]
        for sharp, blurred in zip(crisp[index]["views"], soft[index]["views"], strict=True):
            energy = lambda x: x.diff(dim=-1).pow(2).mean() + x.diff(dim=-2).pow(2).mean()  # noqa: E731
            assert energy(blurred) < 0.85 * energy(sharp)
            assert (blurred.mean((1, 2)) - sharp.mean((1, 2))).abs().max() < 0.01
