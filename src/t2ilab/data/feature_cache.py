"""Precomputed VAE latents and T5 features on disk, so training skips both frozen encoders (what
PixArt-alpha's `load_vae_feat` / `tools/extract_features.py` do).

A cache lives in `root/<sha256 of the canonical JSON of its key>/`: the key names everything
the features depend on (model id or config hash, resolution or bucket table, text max length,
dtype, ...), so another setting gets another folder and the same setting finds its folder
again in a later run. The folder holds:

    key.json                    the key, for people and for a consistency check
    manifest.json               the completed shards and the item ids each holds, plus the item
                                list of the last complete build (the dataset's order)
    shard_00000.safetensors     tensors `<position in shard>.<name>`, e.g. `3.latent_mean`

Items are keyed by image and caption: the image's path relative to `image_root`, its size and
its mtime_ns, and a hash of the caption, so an edited image or caption is encoded again while
everything else is reused. A build writes each shard to a temp file and renames it into place
before listing it in the manifest, so a crash loses at most the shard being written, and the
next build encodes only what no completed shard holds. One process builds a cache at a time
(with Lightning, build in `LightningDataModule.prepare_data`, which runs on one process).

Latents are stored as the VAE posterior's moments, `latent_mean` and `latent_std` (unscaled),
not as a sample: `sample_latents(mean, std, generator)` draws `mean + std * eps` with eps drawn
exactly as `DiagonalGaussianDistribution.sample(generator)` draws it, so training from the cache
gives the same latents as encoding images (same generator state, same values) and keeps fresh
VAE sampling noise every epoch. Scale them as usual afterwards:
`(latents - shift_factor) * scaling_factor`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from t2ilab.data.images import load_rgb
from t2ilab.errors import UserError
from t2ilab.utils.atomic import atomic_file, write_json_atomic

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 1
DISK_MARGIN = 1.05  # safetensors headers, the manifest, and an estimate from one batch

Item = tuple[Path, str]  # (image path, caption), as read_captioned_folder returns
Features = Mapping[str, torch.Tensor | Sequence[torch.Tensor]]  # name -> (B, ...) or B tensors
ImageEncoder = Callable[[list[Path]], Features]
TextEncoder = Callable[[list[str]], Features]


def _json_default(value: Any) -> Any:
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(
        f"feature cache key value {value!r} ({type(value).__name__}) is not JSON: "
        "use str, int, float, bool, None, lists and dicts"
    )


def canonical_json(key: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace: equal keys give equal text, whatever their insertion order."""
    return json.dumps(
        key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def _shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def default_cache_root() -> Path:
    """Where feature caches live unless data.cache.dir says otherwise: the user's cache folder
    ($XDG_CACHE_HOME, else ~/.cache) under t2ilab/features, never the data folder."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t2ilab" / "features"


class FeatureCache:
    """Encoded features of (image, caption) items under `root/<key hash>/`; see the module
    docstring for the layout. `build` fills it (once; later calls only add what is missing),
    `CachedFeatureDataset(cache)` trains from it."""

    def __init__(self, root: str | os.PathLike, key: Mapping[str, Any]):
        text = canonical_json(key)
        self.key: dict[str, Any] = json.loads(text)
        self.hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.root = Path(root).expanduser()
        self.path = self.root / self.hash

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r})"

    # --- item ids ------------------------------------------------------------------------------

    @staticmethod
    def _image_root(items: Sequence[Item], image_root: str | os.PathLike | None) -> Path:
        if image_root is not None:
            return Path(image_root).expanduser().resolve()
        if not items:
            return Path.cwd()
        return Path(os.path.commonpath([Path(p).resolve().parent for p, _ in items]))

    def item_ids(
        self, items: Sequence[Item], image_root: str | os.PathLike | None = None
    ) -> list[str]:
        """`<path relative to image_root>|<size>|<mtime_ns>|<caption sha256[:16]>` per item.

        `image_root` defaults to the deepest folder holding every item's image, so a dataset
        folder that moves (with its mtimes kept) still finds its cache. The caption is part of
        the id because the text features depend on it (and one image may have several)."""
        base = self._image_root(items, image_root)
        ids = []
        for path, caption in items:
            path = Path(path).expanduser().resolve()
            try:
                stat = path.stat()
            except OSError as err:
                raise UserError(
                    f"{path} cannot be read ({err.__class__.__name__}): "
                    "restore the image or remove it from the data"
                ) from None
            try:
                relative = path.relative_to(base).as_posix()
            except ValueError:
                raise ValueError(f"image {path} is not under image_root {base}") from None
            text = hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]
            ids.append(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}|{text}")
        return ids

    # --- manifest ------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest, less any shard whose file is gone (its items are encoded again)."""
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            return {"format": FORMAT, "shards": [], "items": None}
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(
                f"{manifest_path} is unreadable ({err.__class__.__name__}): "
                f"delete the folder {self.path} to rebuild the cache"
            ) from None
        if manifest.get("format") != FORMAT:
            raise UserError(
                f"{manifest_path} has format {manifest.get('format')!r}, this version reads "
                f"{FORMAT}: delete the folder {self.path} to rebuild the cache"
            )
        present = [s for s in manifest["shards"] if (self.path / s["file"]).is_file()]
        if len(present) < len(manifest["shards"]):
            log.warning(
                "feature cache %s: %d shard file(s) missing, their items will be encoded again",
                self.path,
                len(manifest["shards"]) - len(present),
            )
            manifest["shards"] = present
        return manifest

    @staticmethod
    def _locations(manifest: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
        """item id -> (shard file, position in the shard); a later shard wins."""
        return {
            item_id: (shard["file"], position)
            for shard in manifest["shards"]
            for position, item_id in enumerate(shard["ids"])
        }

    def _prepare_folder(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        key_path = self.path / KEY_FILE
        if key_path.is_file():
            try:
                stored = json.loads(key_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                stored = None
            if stored != self.key:
                raise UserError(
                    f"{key_path} does not match this cache's key (edited by hand?): "
                    f"delete the folder {self.path} to rebuild the cache"
                )
        else:
            write_json_atomic(key_path, self.key)

    @property
    def complete(self) -> bool:
        """Whether the last build finished (every item of it is in a completed shard)."""
        manifest = self._read_manifest()
        if manifest.get("items") is None:
            return False
        locations = self._locations(manifest)
        return all(item_id in locations for item_id in manifest["items"])

    def missing(
        self, items: Sequence[Item], image_root: str | os.PathLike | None = None
    ) -> list[Item]:
        """Items no completed shard holds: when empty, `build` needs no encoder, so a caller can
        skip loading the VAE and text encoder."""
        locations = self._locations(self._read_manifest())
        ids = self.item_ids(items, image_root)
        return [item for item, item_id in zip(items, ids, strict=True) if item_id not in locations]

    # --- building ------------------------------------------------------------------------------

    def build(
        self,
        items: Sequence[Item],
        encode_image: ImageEncoder,
        encode_text: TextEncoder,
        batch_size: int = 8,
        shard_size: int = 256,
        image_root: str | os.PathLike | None = None,
    ) -> None:
        """Encode every item no completed shard holds and record `items` as the cache's content.

        `encode_image(paths)` and `encode_text(captions)` return dicts of per-item features,
        each a (B, ...) tensor or a list of B tensors (a list lets one batch hold images of
        different buckets), e.g. `vae_image_encoder` -> latent_mean, latent_std and
        `t5_text_encoder` -> prompt_embeds (B, L, D), prompt_mask (B, L). Feature names must be
        distinct across the two encoders.

        After the first batch, the free disk space is checked against that batch's size times
        the number of items left (a one-line UserError when short).
        """
        if int(batch_size) < 1 or int(shard_size) < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1: {batch_size}, {shard_size}")
        items = [(Path(path), caption) for path, caption in items]
        ids = self.item_ids(items, image_root)
        self._prepare_folder()
        manifest = self._read_manifest()
        locations = self._locations(manifest)

        todo: list[tuple[Item, str]] = []
        queued: set[str] = set()
        for item, item_id in zip(items, ids, strict=True):
            if item_id not in locations and item_id not in queued:
                todo.append((item, item_id))
                queued.add(item_id)
        if todo:
            unique = len(set(ids))
            log.info("feature cache %s: encoding %d of %d items", self.path, len(todo), unique)
            self._encode(manifest, todo, encode_image, encode_text, batch_size, shard_size, unique)
        if manifest.get("items") != ids:
            manifest["items"] = ids
            write_json_atomic(self.path / MANIFEST_FILE, manifest)

    def _encode(
        self,
        manifest: dict[str, Any],
        todo: list[tuple[Item, str]],
        encode_image: ImageEncoder,
        encode_text: TextEncoder,
        batch_size: int,
        shard_size: int,
        total: int,
    ) -> None:
        numbers = [int(s["file"][len("shard_") : -len(".safetensors")]) for s in manifest["shards"]]
        next_number = max(numbers, default=-1) + 1
        pending: list[tuple[str, dict[str, torch.Tensor]]] = []
        with tqdm(
            total=total,
            initial=total - len(todo),
            desc=f"feature cache {self.hash[:8]}",
            unit="img",
            disable=None,  # off when not a terminal (logs of cluster jobs)
        ) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                paths = [path for (path, _), _ in chunk]
                captions = [caption for (_, caption), _ in chunk]
                features = _per_item(len(chunk), encode_image(paths), encode_text(captions))
                if start == 0:
                    self._check_disk_space(features, len(todo))
                pending.extend(
                    (item_id, f) for (_, item_id), f in zip(chunk, features, strict=True)
                )
                while len(pending) >= shard_size:
                    self._write_shard(manifest, next_number, pending[:shard_size])
                    pending = pending[shard_size:]
                    next_number += 1
                bar.update(len(chunk))
            if pending:
                self._write_shard(manifest, next_number, pending)

    def _check_disk_space(self, features: list[dict[str, torch.Tensor]], count: int) -> None:
        per_item = sum(t.nbytes for f in features for t in f.values()) / max(1, len(features))
        needed = per_item * count * DISK_MARGIN
        free = shutil.disk_usage(self.path).free
        if needed > free:
            raise UserError(
                f"the feature cache needs about {_gigabytes(needed)} for {count} items in "
                f"{self.path} but only {_gigabytes(free)} is free there: free disk space or "
                "put the cache root on a larger disk"
            )

    def _write_shard(
        self,
        manifest: dict[str, Any],
        number: int,
        entries: list[tuple[str, dict[str, torch.Tensor]]],
    ) -> None:
        name = _shard_name(number)
        tensors = {
            f"{position}.{feature}": tensor
            for position, (_, features) in enumerate(entries)
            for feature, tensor in features.items()
        }
        item_ids = [item_id for item_id, _ in entries]
        with atomic_file(self.path / name) as tmp:
            # The ids in the shard's own metadata keep it self-describing.
            save_file(tensors, tmp, metadata={"format": str(FORMAT), "ids": json.dumps(item_ids)})
        manifest["shards"].append({"file": name, "ids": item_ids})
        write_json_atomic(self.path / MANIFEST_FILE, manifest)


def _per_item(count: int, *sources: Features) -> list[dict[str, torch.Tensor]]:
    """Split encoder outputs into one dict per item, each tensor its own contiguous CPU copy
    (safetensors refuses tensors that share storage, as slices of one batch do)."""
    items: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for source in sources:
        for name, values in source.items():
            if name in items[0]:
                raise ValueError(f"both encoders return a feature named {name!r}: rename one")
            if len(values) != count:
                raise ValueError(f"encoder returned {len(values)} {name!r} for {count} items")
            for features, value in zip(items, values, strict=True):
                features[name] = (
                    value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                )
    return items


class CachedFeatureDataset(Dataset):
    """The items of a built `FeatureCache`, in the order of its last build: each a dict of its
    tensors (e.g. latent_mean, latent_std (C, h, w), prompt_embeds (L, D), prompt_mask (L,)).

    `bucket_ids` gives each item its tensor shapes, so items of different latent sizes (from
    aspect-ratio buckets) batch with `AspectRatioBucketSampler(dataset.bucket_ids, ...)`, and
    the default collate function stacks each one-bucket batch. Shards are memory-mapped, and
    opened lazily in each DataLoader worker.
    """

    def __init__(self, cache: FeatureCache):
        manifest = cache._read_manifest()
        if manifest.get("items") is None:
            raise UserError(
                f"the feature cache {cache.path} has not been built: run FeatureCache.build "
                "before training from it"
            )
        locations = cache._locations(manifest)
        absent = [item_id for item_id in manifest["items"] if item_id not in locations]
        if absent:
            raise UserError(
                f"the feature cache {cache.path} lacks {len(absent)} items of its last build "
                f"(first {absent[0]}): run FeatureCache.build again to complete it"
            )
        self.path = cache.path
        self.ids: list[str] = list(manifest["items"])
        self.entries = [locations[item_id] for item_id in self.ids]
        shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
        for file in sorted({file for file, _ in self.entries}):
            with safe_open(self.path / file, framework="pt") as shard:
                for key in shard.keys():
                    position, name = key.split(".", 1)
                    shape = tuple(shard.get_slice(key).get_shape())
                    shapes.setdefault((file, int(position)), {})[name] = shape
        self._shapes = [shapes[entry] for entry in self.entries]
        self.bucket_ids: list[tuple] = [tuple(sorted(s.items())) for s in self._shapes]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        file, position = self.entries[index]
        shard = self._handles.get(file)
        if shard is None:
            shard = self._handles[file] = safe_open(self.path / file, framework="pt")
        return {name: shard.get_tensor(f"{position}.{name}") for name in self._shapes[index]}

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles do not pickle (DataLoader workers may be spawned): reopen there.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def sample_latents(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """A sample of the cached VAE posterior: the same eps draw and arithmetic as diffusers'
    `DiagonalGaussianDistribution.sample(generator)`, hence the same tensor for the same
    generator state. Unscaled, like `latent_dist.sample()`."""
    eps = randn_tensor(
        latent_mean.shape, generator=generator, device=latent_mean.device, dtype=latent_mean.dtype
    )
    return latent_mean + latent_std * eps


def vae_image_encoder(
    vae: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor]
) -> ImageEncoder:
    """An `encode_image` for `FeatureCache.build`: load each image upright in RGB, `transform`
    it to a (3, H, W) tensor in [-1, 1] (an `ImageTransform`, or `resize_to_bucket` with a table
    for aspect-ratio buckets), and return the VAE posterior's `latent_mean` and `latent_std`.
    Images of one size are encoded together."""

    @torch.no_grad()
    def encode(paths: list[Path]) -> dict[str, list[torch.Tensor]]:
        vae.eval()  # cached features must not depend on dropout
        pixels = [transform(load_rgb(path)) for path in paths]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(pixels):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        means: list[torch.Tensor | None] = [None] * len(paths)
        stds: list[torch.Tensor | None] = [None] * len(paths)
        parameter = next(vae.parameters())
        for indices in by_shape.values():
            batch = torch.stack([pixels[i] for i in indices])
            dist = vae.encode(batch.to(parameter.device, parameter.dtype)).latent_dist
            for i, mean, std in zip(indices, dist.mean, dist.std, strict=True):
                means[i], stds[i] = mean, std
        return {"latent_mean": means, "latent_std": stds}

    return encode


def condition_text_encoder(backbone, tokenizer) -> TextEncoder:
    """An `encode_text` for `FeatureCache.build`: the backbone's own condition from its frozen
    text encoders (PixArt: T5 states and mask; SD3: the joint CLIP + T5 sequence and pooled
    projections; Flux: T5 states and CLIP's pooled output), as `backbone.cached_condition`
    names it, for captions tokenized as a batch carries them (`tokenizer`'s ids and the text)."""

    @torch.no_grad()
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        for encoder in backbone.text_encoders:
            encoder.eval()  # T5 has dropout: cached features must not depend on it
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(backbone.text_encoders[0].parameters()).device
        condition = backbone.encode_condition({"input_ids": ids.to(device), "prompt": captions})
        return backbone.cached_condition(condition)

    return encode


def t5_text_encoder(tokenizer, text_encoder: torch.nn.Module, max_length: int = 120) -> TextEncoder:
    """An `encode_text` for `FeatureCache.build`: T5 features and attention mask exactly as
    `PixArtAlphaPipeline.encode_prompt` computes them (padded to `max_length`, truncated), as
    `prompt_embeds` (B, max_length, D) and `prompt_mask` (B, max_length)."""

    @torch.no_grad()
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        text_encoder.eval()  # T5 has dropout: cached features must not depend on it
        tokens = tokenizer(
            captions,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = next(text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    return encode
