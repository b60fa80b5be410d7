"""How good the toy models are, measured on fresh renders (a seed the recipes never train on).

The recipes write these numbers into `training.json` after loading the exported folder back, and
`tests/test_toy_models.py` asserts them on the shipped folders, so both measure the artefact a
user loads, through the same loaders the metrics use (`ClipEmbedder`, `DinoEmbedder`).
Each `*_grid` function draws the sample grid a recipe saves next to its numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2ilab.toy.streams import appearance, degrade, object_at, random_view
from t2ilab.toy.world import (
    COLORS,
    SHAPES,
    SUBJECTS,
    TEXTURES,
    Scene,
    _article,
    dense_caption,
    image_to_tensor,
    render,
    scene_at,
    subject_scenes,
)
from t2ilab.utils.images import make_grid

# Seeds of the fresh renders: the recipes train on seeds 0-2.
EVAL_SEED = 1000


def render_batch(scenes: list[Scene], resolution: int = 64) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1], the range the VAE sees."""
    return torch.stack([image_to_tensor(render(s, resolution)) for s in scenes])


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the range the embedders take."""
    return ((images + 1) / 2).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL images."""
    array = (to_unit(images) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def subject_instances(n: int = 6) -> list[Scene]:
    return [s for subject in SUBJECTS.values() for s in subject_scenes(subject, n)]


# --- toy_vae -------------------------------------------------------------------------------------


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured in [0, 1]."""
    mse = ((to_unit(reconstruction) - to_unit(target)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def vae_quality(vae, seed: int = EVAL_SEED, n: int = 64) -> dict[str, float]:
    """PSNR of reconstructions (posterior mode) of `n` world renders and of the subjects'
    instance images; mean and std of scaled latents (posterior samples x scaling_factor),
    which SD-style training expects near 0 and 1."""
    vae = vae.eval()
    images = render_batch([scene_at(seed, i) for i in range(n)])
    subjects = render_batch(subject_instances())
    posterior = vae.encode(images).latent_dist
    generator = torch.Generator().manual_seed(seed)
    latents = posterior.sample(generator) * vae.config.scaling_factor
    return {
        "psnr": float(psnr(vae.decode(posterior.mode()).sample.clamp(-1, 1), images).mean()),
        "subject_psnr": float(psnr(reconstruct(vae, subjects), subjects).mean()),
        "latent_std": float(latents.std()),
        "latent_mean": float(latents.mean()),
    }


@torch.no_grad()
def vae_grid(vae, seed: int = EVAL_SEED, columns: int = 8) -> Image.Image:
    """Rows: originals, reconstructions (world renders), then the same for subject images."""
    world = render_batch([scene_at(seed, i) for i in range(columns)])
    subjects = render_batch(subject_instances(3)[:columns])
    rows = []
    for images in (world, subjects):
        rows += [images, reconstruct(vae.eval(), images)]
    captions = ["originals", "reconstructions", "subjects", "reconstructions"]
    return make_grid(to_pil(torch.cat(rows)), rows=4, captions=captions)


# --- toy_clip ------------------------------------------------------------------------------------


def shape_prompts() -> list[str]:
    return [f"{_article(shape)} {shape}" for shape in SHAPES]


def color_prompts(color: str) -> list[str]:
    """'a red circle', 'a red square', ...: averaged into one colour embedding (CLIP's prompt
    ensembling), so the colour is classified whatever the shape."""
    return [f"{_article(color)} {color} {shape}" for shape in SHAPES]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@torch.no_grad()
def clip_quality(
    embedder, seed: int = EVAL_SEED, n: int = 256, batch: int = 32
) -> dict[str, float]:
    """Zero-shot shape accuracy ('a star' prompts, chance 1/8); shape accuracy in context (the
    image's own dense caption with each shape in turn, chance 1/8); colour accuracy (ensembled
    'a red <shape>' prompts, chance 1/11); retrieval top-1 among `batch` images and their
    dense captions, both ways (chance 1/`batch`)."""
    scenes = [scene_at(seed, i) for i in range(n)]
    images = _unit(embedder.embed_images(to_unit(render_batch(scenes))))
    shapes = _unit(embedder.embed_texts(shape_prompts()))
    colors = torch.stack(
        [_unit(_unit(embedder.embed_texts(color_prompts(c))).mean(0)) for c in COLORS]
    )
    shape_true = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    color_true = torch.tensor([list(COLORS).index(s.color) for s in scenes])
    texts = _unit(embedder.embed_texts([dense_caption(s) for s in scenes]))
    swapped = [
        dense_caption(dataclasses.replace(s, shape=shape)) for s in scenes for shape in SHAPES
    ]
    swapped = _unit(embedder.embed_texts(swapped)).view(n, len(SHAPES), -1)
    in_context = torch.einsum("nd,nkd->nk", images, swapped).argmax(1)
    i2t, t2i = [], []
    for start in range(0, n - batch + 1, batch):
        sims = images[start : start + batch] @ texts[start : start + batch].T
        target = torch.arange(batch)
        i2t.append((sims.argmax(1) == target).float().mean())
        t2i.append((sims.argmax(0) == target).float().mean())
    return {
        "shape_acc": float(((images @ shapes.T).argmax(1) == shape_true).float().mean()),
        "shape_in_caption_acc": float((in_context == shape_true).float().mean()),
        "color_acc": float(((images @ colors.T).argmax(1) == color_true).float().mean()),
        "retrieval_i2t_top1": float(torch.stack(i2t).mean()),
        "retrieval_t2i_top1": float(torch.stack(t2i).mean()),
    }


GRID_PROMPTS = (
    *shape_prompts(),
    "a red heart",
    "a blue star with white dots",
    "a small green circle on a black background",
    "a large square on a checkered background, top left",
)


@torch.no_grad()
def clip_grid(embedder, seed: int = EVAL_SEED, pool: int = 512, columns: int = 8) -> Image.Image:
    """Text-to-image retrieval: per prompt, its `columns` best matches among `pool` renders."""
    images = render_batch([scene_at(seed, i) for i in range(pool)])
    image_features = _unit(embedder.embed_images(to_unit(images)))
    text_features = _unit(embedder.embed_texts(list(GRID_PROMPTS)))
    best = (text_features @ image_features.T).topk(columns, dim=1).indices
    captions = [f"{p!r}: top {columns} of {pool}" for p in GRID_PROMPTS]
    return make_grid(to_pil(images[best.flatten()]), rows=len(GRID_PROMPTS), captions=captions)


# --- toy_dino ------------------------------------------------------------------------------------


def view_pairs(seed: int, n: int, extras_prob: float = 0.25) -> tuple[list[Scene], list[Scene]]:
    """Two views of each of `n` objects (as the DINO recipe trains on, from another seed)."""
    first, second = [], []
    for i in range(n):
        scene = object_at(seed, i, extras_prob)
        rng = np.random.default_rng([seed, i, 11])
        first.append(random_view(scene, rng))
        second.append(random_view(scene, rng))
    return first, second


def _embed(embedder, scenes: list[Scene]) -> torch.Tensor:
    return _unit(embedder.embed_images(to_unit(render_batch(scenes))))


def _mean_offdiagonal(sims: torch.Tensor) -> float:
    mask = ~torch.eye(len(sims), dtype=torch.bool)
    return float(sims[mask].mean())


@torch.no_grad()
def dino_quality(embedder, seed: int = EVAL_SEED, n: int = 128) -> dict[str, float]:
    """CLS-embedding cosines between two views of one object (other background, size,
    position, pose) vs. different objects; object retrieval top-1 (a view finds its object's
    other view among `n`); 1-NN shape accuracy among *other* objects (chance ~1/8). For the
    DreamBooth subjects: mean cosine between a subject's instance images, between them and
    softened renders of the subject in new poses (`degrade`: what a decoder's blur does), and
    renders of the subject without its unique feature (same shape, colour and stripes, no
    spot or second stripe colour), and between them and other objects."""
    first, second = view_pairs(seed, n)
    a, b = _embed(embedder, first), _embed(embedder, second)
    sims = a @ b.T
    keys = [appearance(s) for s in first]
    same = torch.tensor([[x == y for y in keys] for x in keys])
    nearest_other = sims.masked_fill(same, -2).argmax(1)
    shape_true = [s.shape for s in first]

    subject_same, soft, lookalike, other = [], [], [], []
    for k, subject in enumerate(SUBJECTS.values()):
        instances = _embed(embedder, subject_scenes(subject, 6))
        plain = dataclasses.replace(subject.base, second_pattern_color=None, spot_color=None)
        rng = np.random.default_rng([seed, k, 13])
        lookalikes = _embed(embedder, [random_view(plain, rng) for _ in range(6)])
        # new poses as a decoder returns them: blurred or through a lower resolution
        softened = [degrade(render(s), rng) for s in subject_scenes(subject, 6, seed=seed)]
        subject_same.append(_mean_offdiagonal(instances @ instances.T))
        soft.append(float((instances @ _unit(embedder.embed_images(softened)).T).mean()))
        lookalike.append(float((instances @ lookalikes.T).mean()))
        other.append(float((instances @ a.T).mean()))
    return {
        "same_object_cos": float(sims.diagonal().mean()),
        "different_object_cos": float(sims[~same].mean()),
        "object_top1": float(
            same[torch.arange(n), sims.argmax(1)].float().mean()  # any view of the same look
        ),
        "knn_shape_acc": float(
            np.mean([shape_true[int(j)] == shape_true[i] for i, j in enumerate(nearest_other)])
        ),
        "subject_same_cos": float(np.mean(subject_same)),
        "subject_softened_cos": float(np.mean(soft)),
        "subject_lookalike_cos": float(np.mean(lookalike)),
        "subject_other_cos": float(np.mean(other)),
    }


@torch.no_grad()
def dino_grid(embedder, seed: int = EVAL_SEED, n: int = 128, columns: int = 8) -> Image.Image:
    """Nearest neighbours: each row is a query, then its `columns - 1` nearest among the other
    images (two views of `n` objects plus the subjects' instance images). The first rows query
    world objects, the last ones the three subjects."""
    first, second = view_pairs(seed, n)
    gallery = first + second + subject_instances()
    features = _embed(embedder, gallery)
    queries = list(range(6)) + [2 * n + 6 * k for k in range(len(SUBJECTS))]
    tiles = []
    for q in queries:
        sims = features @ features[q]
        sims[q] = -2
        tiles += [gallery[q]] + [gallery[int(j)] for j in sims.topk(columns - 1).indices]
    captions = [f"query, then its {columns - 1} nearest of {len(gallery) - 1}"] * len(queries)
    return make_grid(to_pil(render_batch(tiles)), rows=len(queries), captions=captions)


# --- toy_sd --------------------------------------------------------------------------------------


def nearest_color(rgb: np.ndarray) -> str:
    """The named world colour nearest to an RGB triple (0-255)."""
    names = list(COLORS)
    table = np.array([COLORS[c] for c in names], dtype=np.float32)
    return names[int(((table - rgb) ** 2).sum(1).argmin())]


def read_colors(image: Image.Image) -> tuple[str, str]:
    """(background colour, object colour) of a 64 px render-like image read from its pixels:
    the median of the four 6x6 corners, and of the central 8x8 patch. Exact on renders of a
    large centred object on a plain background; no model involved."""
    array = _pixels(image)
    centre = array[28:36, 28:36].reshape(-1, 3)
    return nearest_color(_corner_colour(array)), nearest_color(np.median(centre, 0))


def _pixels(image: Image.Image) -> np.ndarray:
    """The image as float RGB at the 64 px the readers measure in."""
    return np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)


# The four 6x6 corners of a 64 px image, where the readers look for the background.
_CORNER_MASK = np.zeros((64, 64), bool)
for _rows in (slice(0, 6), slice(-6, None)):
    for _cols in (slice(0, 6), slice(-6, None)):
        _CORNER_MASK[_rows, _cols] = True


def _corner_colour(array: np.ndarray) -> np.ndarray:
    """The median RGB of the four 6x6 corners: the background, on toy renders."""
    return np.median(array[_CORNER_MASK], 0)


def sd_color_scenes(seed: int = EVAL_SEED, n: int = 32) -> list[Scene]:
    """`n` scenes of a large plain centred shape of one colour on a plain background of
    another (shape i is `SHAPES[i % len(SHAPES)]`); their dense captions are the prompts."""
    rng = np.random.default_rng([seed, 17])
    names = list(COLORS)
    scenes = []
    for i in range(n):
        color, background = (names[int(k)] for k in rng.choice(len(names), 2, replace=False))
        shape = SHAPES[i % len(SHAPES)]
        scenes.append(Scene(shape=shape, color=color, background=background, size="large"))
    return scenes


SHAPE_SIDE = 32  # side of the normalised masks read_shape compares


def _normalised_mask(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to SHAPE_SIDE: compares outlines
    wherever they sit and whatever their size. None when there is (almost) no object."""
    if mask.sum() < 16:
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((SHAPE_SIDE, SHAPE_SIDE))
    return np.asarray(image) > 127


# The world draws shapes turned by up to MAX_ROTATION degrees, so each shape is matched
# against its outline at several turns.
TEMPLATE_ROTATIONS = tuple(range(-20, 21, 5))


def _shape_templates() -> dict[str, list[np.ndarray]]:
    templates = {}
    for shape in SHAPES:
        templates[shape] = []
        for rotation in TEMPLATE_ROTATIONS:
            scene = Scene(shape, "white", "black", size="large", rotation=float(rotation))
            templates[shape].append(_normalised_mask(np.asarray(render(scene))[..., 0] > 127))
    return templates


_TEMPLATES: dict[str, list[np.ndarray]] = {}


def shape_of_mask(mask: np.ndarray) -> str | None:
    """The world shape whose outline best overlaps (IoU) the object mask, compared cropped to
    their boxes (so position and size do not matter) and at several turns. None: no object."""
    if not _TEMPLATES:
        _TEMPLATES.update(_shape_templates())
    mask = _normalised_mask(mask)
    if mask is None:
        return None

    def iou(template: np.ndarray) -> float:
        return float((mask & template).sum() / max((mask | template).sum(), 1))

    return max(_TEMPLATES, key=lambda shape: max(iou(t) for t in _TEMPLATES[shape]))


def read_shape(image: Image.Image, background: str, color: str) -> str | None:
    """The shape of the object of colour `color` on `background` (both named by the prompt):
    a pixel is object when it is nearer the object colour than the background colour. Exact on
    renders of plain shapes, wherever they sit, however large and turned."""
    array = _pixels(image)
    to_object = ((array - np.array(COLORS[color])) ** 2).sum(-1)
    to_background = ((array - np.array(COLORS[background])) ** 2).sum(-1)
    return shape_of_mask(to_object < to_background)


# How far (RGB distance) a pixel must be from the background to count as object when nothing
# names the colours; the nearest two world colours are ~95 apart.
OBJECT_DISTANCE = 60.0


def _distance_to_segment(array: np.ndarray, first, second) -> np.ndarray:
    """Per-pixel RGB distance to the nearest blend of two colours (a texture's two colours and
    every mix of them: a gradient's rows, the antialiased edges of checks)."""
    a, b = np.asarray(first, np.float32), np.asarray(second, np.float32)
    along = np.clip(((array - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
    return np.sqrt(((array - (a + along[..., None] * (b - a))) ** 2).sum(-1))


def background_distance(array: np.ndarray) -> np.ndarray:
    """Each pixel's RGB distance to the background, whichever kind the corners show: one colour
    (their median) or one of the world's two-colour textures (checkered, gradient), the one
    whose colours the corners lie nearest."""
    plain = np.sqrt(((array - _corner_colour(array)) ** 2).sum(-1))
    candidates = [plain] + [_distance_to_segment(array, *colors) for colors in TEXTURES.values()]
    fit = [float(np.median(d[_CORNER_MASK])) for d in candidates]
    return candidates[int(np.argmin(fit))]


def read_shape_unnamed(image: Image.Image) -> str | None:
    """The object's shape when no prompt names its colours (class-conditional models): the
    background is read from the four corners (a plain colour or a texture), the object is every
    pixel far from it. Exact on world renders of every kind (patterns, textured backgrounds, any
    size and place: `tests/test_toy_pixart.py` reads 300 of them)."""
    return shape_of_mask(background_distance(_pixels(image)) > OBJECT_DISTANCE)


def load_scoring_pipeline(folder):
    """A toy pipeline folder as the documented figures sample it: DDIM for DDPM models (a flow
    model keeps its own sampler), no progress bars."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from t2ilab.flow import is_flow_config

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None)
    if not is_flow_config(pipe.scheduler.config):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def batched_images(call, items: list, batch_size: int = 32) -> list[Image.Image]:
    """`call(batch)` (a pipeline call over a slice of `items`) for every slice, concatenated:
    one generator passed to each call keeps the images the same for any batch size <= n."""
    images = []
    for start in range(0, len(items), batch_size):
        images += call(items[start : start + batch_size]).images
    return images


def prompt_following_images(
    pipe,
    scenes: list[Scene],
    seed: int,
    steps: int,
    guidance: float,
    batch_size: int = 32,
    size: int | None = None,
) -> list[Image.Image]:
    """One image per scene's dense caption, seeded once from `seed`, `size` pixels square (None:
    the pipeline's default, which SD and PixArt take from the model; FluxPipeline's is 1024)."""
    from t2ilab.models.pipelines import pipeline_call_kwargs

    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    if size is not None:
        kwargs.update(height=size, width=size)
    kwargs.update(pipeline_call_kwargs(pipe))
    return batched_images(
        lambda batch: pipe([dense_caption(s) for s in batch], **kwargs), scenes, batch_size
    )


def prompt_following(scenes: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    """Background colour, object colour and shape accuracy of images made from the scenes'
    dense captions (chance 1/11, 1/11 and 1/8), read from the pixels with no model involved,
    each also read on the renders themselves (`render_*`: 1.0 unless a reader is broken).
    The shape is read with the prompt's colours, so it is scored on its own."""

    def scores(found: list[Image.Image]) -> dict[str, float]:
        colours = [read_colors(image) for image in found]
        shapes = [
            read_shape(im, s.background, s.color) for im, s in zip(found, scenes, strict=True)
        ]
        pairs = list(zip(scenes, colours, shapes, strict=True))
        return {
            "background_acc": float(np.mean([c[0] == s.background for s, c, _ in pairs])),
            "object_color_acc": float(np.mean([c[1] == s.color for s, c, _ in pairs])),
            "shape_acc": float(np.mean([shape == s.shape for s, _, shape in pairs])),
        }

    rendered = scores(to_pil(render_batch(scenes)))
    return {**scores(images), **{f"render_{k}": v for k, v in rendered.items()}}


@torch.no_grad()
def sd_quality(
    pipe,
    seed: int = EVAL_SEED,
    n: int = 32,
    steps: int = 25,
    guidance: float = 4.0,
    size: int | None = None,
):
    """How well a toy pipeline (Stable Diffusion, PixArt or Flux) follows the colours and shape of
    `n` dense prompts of a large plain centred shape on a plain background (`prompt_following`);
    `size`: the image side to render at (None: the pipeline's default)."""
    scenes = sd_color_scenes(seed, n)
    images = prompt_following_images(pipe, scenes, seed, steps, guidance, size=size)
    return prompt_following(scenes, images)
