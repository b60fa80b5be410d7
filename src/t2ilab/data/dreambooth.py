"""DreamBooth data: instance images of the subject, plus class images for prior preservation.

A batch holds B instance examples followed by B class examples (when prior preservation is on),
so the shared diffusion step can split the per-sample loss at `num_instance`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.base import CacheSettings, T2IDataModule
from t2ilab.data.identifier import (
    check_identifier_tokens,
    check_prompt_fits,
    pick_rare_identifier,
    validate_identifier_in_prompt,
)
from t2ilab.data.images import (
    ImageTransform,
    check_image_folder,
    check_images,
    list_images,
    load_rgb,
)
from t2ilab.data.loader import draw_rng, resumable_loader
from t2ilab.errors import UserError


@dataclass(frozen=True)
class DreamBoothPrompts:
    identifier: str
    class_noun: str | None
    instance_prompt: str
    class_prompt: str | None


def resolve_prompts(
    *,
    identifier: str | None,
    class_noun: str | None,
    instance_prompt: str | None,
    instance_prompt_template: str,
    class_prompt: str | None,
    with_prior_preservation: bool,
    tokenizer=None,
    seed: int = 0,
    identifier_id_range: tuple[int, int] = (5000, 10000),
) -> DreamBoothPrompts:
    """The instance and class prompts, with a rare-token identifier picked by seed if none is
    given (DreamBooth sec. 4.1). Raises UserError on inconsistent prompts."""
    if with_prior_preservation and not (class_noun or class_prompt):
        raise UserError(
            "prior preservation needs a class: set data.class_noun=NOUN (e.g. dog) or "
            "data.class_prompt='a photo of a dog', or turn it off with method.prior_preservation=false"
        )
    if not identifier:
        if tokenizer is None:
            raise UserError(
                "data.identifier is empty: set data.identifier=sks or another rare token"
            )
        identifier = pick_rare_identifier(tokenizer, seed=seed, id_range=tuple(identifier_id_range))
    if instance_prompt is None:
        if "{identifier}" not in instance_prompt_template:
            raise UserError(
                f"data.instance_prompt_template={instance_prompt_template!r} has no {{identifier}}: "
                "add it, e.g. 'a {identifier} {class_noun}'"
            )
        if "{class_noun}" in instance_prompt_template and not class_noun:
            raise UserError(
                "data.instance_prompt_template uses {class_noun} but data.class_noun is not set: "
                "set data.class_noun=NOUN (e.g. dog)"
            )
        try:
            instance_prompt = instance_prompt_template.format(
                identifier=identifier, class_noun=class_noun
            )
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(
                f"data.instance_prompt_template={instance_prompt_template!r} cannot be filled "
                f"({type(err).__name__}: {err}): it may use only {{identifier}} and "
                "{class_noun}; write other braces as {{ and }}"
            ) from None
    try:
        validate_identifier_in_prompt(instance_prompt, identifier)
    except ValueError as err:
        raise UserError(str(err)) from None
    if with_prior_preservation and class_prompt is None:
        class_prompt = f"a {class_noun}"
    if tokenizer is not None:
        check_identifier_tokens(tokenizer, identifier)
        check_prompt_fits(tokenizer, instance_prompt, "data.instance_prompt")
        if class_prompt:
            check_prompt_fits(tokenizer, class_prompt, "data.class_prompt")
    return DreamBoothPrompts(identifier, class_noun, instance_prompt, class_prompt)


def prompt_slug(prompt: str) -> str:
    """A folder name for a class prompt: class images are keyed by the prompt that made them."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "prompt"


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids[0]


class DreamBoothDataset(Dataset):
    """Cycles instance images (and class images, independently) for max(n_instance, n_class).
    Items are read by draw (t2ilab.data.loader): random crops and flips are keyed by it.

    With `image_features` (path -> cached VAE posterior) and `text_features` (prompt -> the
    backbone's condition from frozen text encoders: a tensor, or a dict of them), examples carry
    those instead of pixels and token ids."""

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        tokenizer,
        transform: ImageTransform,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        image_features: dict[Path, dict[str, torch.Tensor]] | None = None,
        text_features: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.seed = seed
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.transform = transform
        self.image_features = image_features
        self.text_features = text_features
        self.instance = self._text(instance_prompt, tokenizer)
        self.class_ = self._text(class_prompt, tokenizer) if self.class_images else None

    def _text(self, prompt: str, tokenizer) -> dict[str, torch.Tensor]:
        if self.text_features is not None:
            return {"condition": self.text_features[prompt]}
        # The text too: backbones with a second vocabulary (SD3's and Flux's T5) tokenize it.
        return {"input_ids": tokenize(tokenizer, prompt), "prompt": prompt}

    def _image(self, path: Path, rng) -> dict[str, torch.Tensor]:
        if self.image_features is not None:
            return self.image_features[path]
        return {"pixel_values": self.transform(load_rgb(path), rng)}

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, draw: int) -> dict[str, dict[str, torch.Tensor]]:
        index, rng = draw % len(self), draw_rng(self.seed, draw)
        path = self.instance_images[index % len(self.instance_images)]
        example = {"instance": {**self._image(path, rng), **self.instance}}
        if self.class_images:
            class_path = self.class_images[index % len(self.class_images)]
            example["class"] = {**self._image(class_path, rng), **self.class_}
        return example


def first_row(tree: Any) -> Any:
    """The one example of a batch-of-one condition, on the CPU."""
    if isinstance(tree, dict):
        return {key: first_row(value) for key, value in tree.items()}
    return None if tree is None else tree[0].cpu()


def stack_tree(items: list[Any]) -> Any:
    """Stack per-example tensors, also inside the dicts a backbone's condition is made of
    (SDXL: embeds, pooled, time ids; PixArt: embeds, mask, sizes that may be None)."""
    first = items[0]
    if isinstance(first, dict):
        return {key: stack_tree([item[key] for item in items]) for key in first}
    if isinstance(first, str):  # prompts
        return list(items)
    return None if first is None else torch.stack(items)


def collate_dreambooth(examples: list[dict]) -> dict[str, torch.Tensor | int]:
    """B instance examples first, then their B class examples (prior preservation)."""
    parts = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    batch = {key: stack_tree([p[key] for p in parts]) for key in parts[0]}
    batch["num_instance"] = len(examples)
    return batch


class DreamBoothDataModule(T2IDataModule):
    """Subject images plus, with prior preservation, class images generated before training.

    The orchestration calls `check()` (cheap, before any weights load), `bind(tokenizer, seed)`
    (resolves the identifier and prompts), then fills `class_dir` up to `num_class_images`.
    Caches live in memory (a few images and two prompts): data.cache.dir does not apply."""

    CACHE = CacheSettings(latents=True, text=True)
    CACHES = ("latents", "text")

    def __init__(
        self,
        instance_dir: str,
        class_dir: str | None = None,
        identifier: str | None = "sks",
        class_noun: str | None = None,
        instance_prompt: str | None = None,
        instance_prompt_template: str = "a {identifier} {class_noun}",
        class_prompt: str | None = None,
        identifier_id_range: tuple[int, int] = (40000, 49406),
        with_prior_preservation: bool = True,
        num_class_images: int = 200,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        cache: dict | None = None,
    ):
        super().__init__(cache)
        self.image_features: dict[Path, dict[str, torch.Tensor]] | None = None
        self.text_features: dict[str, torch.Tensor] | None = None
        self.instance_dir = Path(instance_dir).expanduser() if instance_dir else None
        self.class_dir = Path(class_dir).expanduser() if class_dir else None
        self.prompt_config = dict(
            identifier=identifier,
            class_noun=class_noun,
            instance_prompt=instance_prompt,
            instance_prompt_template=instance_prompt_template,
            class_prompt=class_prompt,
            with_prior_preservation=with_prior_preservation,
        )
        self.identifier_id_range = tuple(identifier_id_range)
        self.with_prior_preservation = with_prior_preservation
        self.num_class_images = num_class_images if with_prior_preservation else 0
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.prompts: DreamBoothPrompts | None = None
        self.seed = 0

    def check(self) -> None:
        """Everything the user gave, checked without loading a model."""
        super().check()
        resolution = self.transform.resolution
        check_image_folder(self.instance_dir, "data.instance_dir", resolution)
        if self.num_class_images > 0 and self.class_dir is not None and self.class_dir.is_dir():
            # The user's own class images (the ones _class_images will take); generated ones
            # join them later.
            check_images(list_images(self.class_dir)[: self.num_class_images], resolution)
        c = self.prompt_config
        if self.with_prior_preservation and not (c["class_noun"] or c["class_prompt"]):
            raise UserError(
                "prior preservation needs a class: set data.class_noun=NOUN (e.g. dog) or "
                "data.class_prompt='a photo of a dog', or turn it off with "
                "method.prior_preservation=false"
            )
        if c["instance_prompt"] and c["identifier"]:
            try:
                validate_identifier_in_prompt(c["instance_prompt"], c["identifier"])
            except ValueError as err:
                raise UserError(f"data.instance_prompt: {err}") from None

    def bind(self, tokenizer, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        """Resolve the prompts with the model's tokenizer; returns the prompt variables
        ({identifier}, {class_noun}) that sample and evaluation prompts are filled with.
        `prompt_transform` rewrites prompts before tokenizing (e.g. multi-vector placeholders)."""
        super().bind(tokenizer, seed, prompt_transform)
        self.seed = int(seed)  # also keys the data order
        self.prompts = resolve_prompts(
            **self.prompt_config,
            tokenizer=tokenizer,
            seed=seed,
            identifier_id_range=self.identifier_id_range,
        )
        return {"identifier": self.prompts.identifier, "class_noun": self.prompts.class_noun or ""}

    @property
    def class_prompt(self) -> str | None:
        return self.prompts.class_prompt if self.prompts and self.with_prior_preservation else None

    def subject(self) -> dict[str, str | None]:
        """What evaluation needs to measure this subject (and what the export records)."""
        p = self.prompts
        return {
            "identifier": p.identifier,
            "class_noun": p.class_noun,
            "instance_prompt": p.instance_prompt,
            "class_prompt": p.class_prompt,
            "instance_dir": str(self.instance_dir.resolve()),
        }

    def _class_images(self) -> list[Path] | None:
        if self.class_prompt is None or self.num_class_images <= 0:
            return None
        return list_images(self.class_dir)[: self.num_class_images]

    @property
    def text_from_cache(self) -> bool:
        """Whether training reads every prompt state from the cache (no text encoder needed)."""
        return self.text_features is not None

    @property
    def latents_from_cache(self) -> bool:
        """Whether training reads every image's latents from the cache (no VAE needed)."""
        return self.image_features is not None

    @torch.no_grad()
    def prepare_features(self, components, *, text_frozen: bool, **_unused) -> None:
        """Encode what does not change during training once: VAE posteriors of the images when
        the transform is deterministic (no random crop/flip), the two prompts' condition (the
        backbone's encoding: CLIP states, SDXL's two encoders + pooled + time ids, T5 + mask)
        when the text encoders are frozen. The training step then skips the VAE and text encoder and
        gives the same loss for the same seed (tests/test_caching.py)."""
        from t2ilab.data.feature_cache import vae_image_encoder

        if self.cache.latents and self.transform.is_deterministic:
            paths = list_images(self.instance_dir) + (self._class_images() or [])
            encode = vae_image_encoder(components.vae, self.transform)
            self.image_features = {}
            for start in range(0, len(paths), 8):
                chunk = paths[start : start + 8]
                out = encode(chunk)
                for i, path in enumerate(chunk):
                    self.image_features[path] = {
                        "latent_mean": out["latent_mean"][i].cpu(),
                        "latent_std": out["latent_std"][i].cpu(),
                    }
        if self.cache.text and text_frozen:
            transform = self.prompt_transform or (lambda prompt: prompt)
            prompts = [transform(p) for p in (self.prompts.instance_prompt, self.class_prompt) if p]
            device = components.vae.device
            self.text_features = {}
            for prompt in prompts:
                ids = tokenize(self.tokenizer, prompt)[None].to(device)
                condition = components.encode_condition({"input_ids": ids, "prompt": [prompt]})
                self.text_features[prompt] = first_row(condition)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None or self.prompts is None:
            raise RuntimeError("DreamBoothDataModule.bind(tokenizer) must run before setup")
        transform = self.prompt_transform or (lambda prompt: prompt)
        class_images = self._class_images()
        self.dataset = DreamBoothDataset(
            list_images(self.instance_dir),
            transform(self.prompts.instance_prompt),
            self.tokenizer,
            self.transform,
            class_images,
            transform(self.prompts.class_prompt) if class_images else None,
            image_features=self.image_features,
            text_features=self.text_features,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        # Unshuffled, rank r of N takes items r, r + N, ... (see t2ilab.data.loader).
        return resumable_loader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=collate_dreambooth,
        )
