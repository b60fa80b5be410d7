"""Captioned images for PixArt stages 2 and 3: optional multi-aspect buckets (one bucket per
batch, with the resolution / aspect-ratio conditioning of the MS models) and optional VAE-latent
+ T5-feature caches that training then reads instead of images."""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch.utils.data import DataLoader, Dataset

from t2ilab.data.base import CacheSettings, T2IDataModule
from t2ilab.data.buckets import (
    AspectRatioBucketSampler,
    BucketedCaptionDataset,
    bucket_table,
    collate_bucketed,
    resize_to_bucket,
    size_conditioning,
)
from t2ilab.data.captioned import read_captioned_folder
from t2ilab.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    condition_text_encoder,
    default_cache_root,
    vae_image_encoder,
)
from t2ilab.data.loader import draw_rng, resumable_loader
from t2ilab.errors import UserError

log = logging.getLogger(__name__)


class _DropCaptions(Dataset):
    """Caption dropout over cached features or images with token ids: with probability p, keyed
    by the draw (t2ilab.data.loader), an item's caption features are those of the empty caption
    (what the pipeline uses as unconditional)."""

    def __init__(self, dataset: Dataset, null: dict[str, torch.Tensor], p: float, seed: int):
        self.dataset, self.null, self.p, self.seed = dataset, null, p, seed
        self.bucket_ids = dataset.bucket_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[draw % len(self)])
        if self.p and draw_rng(self.seed, draw).random() < self.p:
            item.update(self.null)
        return item


def collate_cached(examples: list[dict[str, torch.Tensor]], vae_factor: int) -> dict:
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    h, w = (s * vae_factor for s in batch["latent_mean"].shape[-2:])
    batch.update(size_conditioning([h] * len(examples), [w] * len(examples)))
    batch["num_instance"] = len(examples)
    return batch


class PixArtCaptionDataModule(T2IDataModule):
    """Latents and T5 states are cached together on disk (one FeatureCache per model key)."""

    CACHE = CacheSettings(latents=True, text=True)
    CACHES = ("latents", "text", "dir")

    def __init__(
        self,
        train_dir: str,
        caption_column: str = "text",
        resolution: int = 512,
        multi_aspect: bool = False,
        cache: dict | None = None,
        caption_dropout: float = 0.1,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        **_ignored,
    ):
        super().__init__(cache, **_ignored)
        self.train_dir = train_dir
        self.caption_column = caption_column
        self.resolution = resolution
        self.multi_aspect = multi_aspect
        self.caption_dropout = caption_dropout
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.items = []
        self.divisor = 16  # VAE factor x patch size; set by bind_model
        self.vae_factor = 8
        self.dataset: Dataset | None = None

    def check(self) -> None:
        super().check()
        if self.cache.latents != self.cache.text:
            raise UserError(
                f"data.cache.latents={str(self.cache.latents).lower()} but data.cache.text="
                f"{str(self.cache.text).lower()}: PixArt's feature cache holds both or neither: "
                "set both to the same value"
            )
        self.items = read_captioned_folder(self.train_dir, self.caption_column, self.resolution)

    def bind(self, tokenizer, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        return super().bind(tokenizer, seed, prompt_transform or (lambda caption: caption))

    def validation_prompts(self, n: int = 4) -> list[str]:
        # Captions are sample-prompt templates: escape braces so .format leaves them as written.
        return [c.replace("{", "{{").replace("}", "}}") for _, c in self.items[:n]]

    def table(self) -> dict[str, tuple[int, int]]:
        if self.multi_aspect:
            return bucket_table(self.resolution, self.divisor)
        return {"1.0": (self.resolution, self.resolution)}

    def _tokenize(self, caption: str) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            self.prompt_transform(caption),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        return {"input_ids": ids, "prompt": caption}  # the text too: SD3's and Flux's T5 read it

    @property
    def text_from_cache(self) -> bool:
        """Whether training reads every T5 state from the feature cache (no T5 needed)."""
        return self.cache.text

    @property
    def latents_from_cache(self) -> bool:
        """Whether training reads every latent from the feature cache (no VAE needed)."""
        return bool(self.cache.latents)

    def prepare_features(
        self, components, model_key: dict, vae_factor: int, patch_size: int, **_unused
    ) -> None:
        """Build (or reuse) the feature cache once the model is loaded; no-op without caching."""
        self.vae_factor, self.divisor = vae_factor, vae_factor * patch_size
        if not self.cache.latents:
            return
        table = self.table()
        key = {
            **model_key,
            "resolution": self.resolution,
            "buckets": sorted(table.values()) if self.multi_aspect else None,
            # The longest tokenizer's length (T5's, where there is one): what the features hold.
            "max_length": max(int(t.model_max_length) for t in components.tokenizers),
            "vae": hashlib.sha256(
                json.dumps(dict(components.vae.config), sort_keys=True, default=str).encode()
            ).hexdigest()[:16],
        }
        # Never inside the user's data folder: a per-user cache unless data.cache.dir says where.
        cache = FeatureCache(self.cache.dir or default_cache_root(), key)

        # The same resize/crop as the image path (BucketedCaptionDataset): both give one loss.
        def transform(image):
            return resize_to_bucket(image, table)

        encode_text = condition_text_encoder(components, self.tokenizer)
        cache.build(self.items, vae_image_encoder(components.vae, transform), encode_text)
        null = {k: v[0] for k, v in encode_text([""]).items()}
        self.dataset = _DropCaptions(
            CachedFeatureDataset(cache), null, self.caption_dropout, self.seed
        )
        log.info("training from the feature cache in %s", cache.path)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            if not self.items:
                self.check()
            images = BucketedCaptionDataset(self.items, self.table(), self._tokenize)
            self.dataset = _DropCaptions(
                images, self._tokenize(""), self.caption_dropout, self.seed
            )

    def train_dataloader(self) -> DataLoader:
        sampler = AspectRatioBucketSampler(
            self.dataset.bucket_ids,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
        )
        if isinstance(self.dataset.dataset, CachedFeatureDataset):

            def collate(examples):
                return collate_cached(examples, self.vae_factor)
        else:
            collate = collate_bucketed
        return resumable_loader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate
        )
