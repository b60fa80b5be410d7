"""DINO and CLIP embedders for the DreamBooth metrics, built on transformers.

Each embedder wraps an already-built model (so tests can pass tiny random ones) and can be loaded
from a hub id or a local folder with `from_pretrained`. When no image processor is available the
resize + normalise step is done in torch, which keeps torchvision out of the CPU path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from t2ilab.errors import UserError
from t2ilab.metrics.images import Images, check_image_tensor, num_images, pil_to_tensor, to_pil_list

log = logging.getLogger(__name__)

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

EmbedderKind = Literal["dino", "clip"]
_DEFAULTS: dict[str, str] = {"dino": DEFAULT_DINO_MODEL, "clip": DEFAULT_CLIP_MODEL}


class MetricModelNotFound(UserError):
    """An evaluation model's weights could not be found (offline, or not a model folder)."""


def _not_found(name: str, kind: str, config_key: str | None) -> MetricModelNotFound:
    hub_id = _DEFAULTS[kind] if _looks_like_path(name) else name
    key = config_key or f"eval.{kind}_model"
    return MetricModelNotFound(
        f"eval model '{name}' could not be loaded (no network or not a model folder): "
        f"download it once with `hf download {hub_id} --local-dir DIR` and set {key}=DIR"
    )


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "weights not reachable / not a model" rather than a bug in our code."""
    # OSError: transformers wraps hub failures in it, and hub HTTP errors subclass it.
    # ValueError: a folder without a usable config ("Unrecognized model"), or a bad repo id.
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import EntryNotFoundError  # not an OSError in hub >= 1.0

        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub always ships with transformers
        pass
    # httpx transport errors (connection refused, DNS) are not OSErrors either
    for module in ("httpx", "httpx2"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a folder on disk
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).expanduser().is_dir()
    )


def _check_local(name: str, kind: str, config_key: str | None) -> str:
    """Resolve a local folder, failing fast instead of asking the hub for a bad path."""
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise _not_found(name, kind, config_key)
        return str(path)
    return name


@contextmanager
def _reraise_not_found(name: str, kind: str, config_key: str | None) -> Iterator[None]:
    try:
        yield
    except _load_errors() as err:
        log.debug("loading eval model '%s' failed", name, exc_info=err)
        # `from None`: the user gets one actionable line, not a chain of hub tracebacks
        raise _not_found(name, kind, config_key) from None


def _pretrained(loader: Any, name: str, local_files_only: bool, **kwargs: Any) -> Any:
    return loader.from_pretrained(name, local_files_only=local_files_only, **kwargs)


class _TorchPreprocess:
    """Resize to a square and normalise in torch; used when no image processor is given."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def _resize(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (self.size, self.size):
            return images
        # antialias avoids aliasing when shrinking large generations to the model's input size
        out = F.interpolate(
            images, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
        )
        return out.clamp(0.0, 1.0)

    def __call__(self, images: Images) -> Tensor:
        if isinstance(images, Tensor):
            batch = self._resize(check_image_tensor(images))
        else:  # PIL images may differ in size, so resize each before stacking
            batch = torch.cat([self._resize(pil_to_tensor(img)[None]) for img in images])
        return (batch - self.mean) / self.std


def _batches(images: Images, batch_size: int) -> Iterator[Images]:
    for start in range(0, num_images(images), batch_size):
        yield images[start : start + batch_size]


def _features(output: Any) -> Tensor:
    """Projected CLIP features from get_image_features / get_text_features.

    transformers 4.x returns the tensor; 5.x returns a BaseModelOutputWithPooling whose
    pooler_output holds the projected features (or a tuple with it second when return_dict=False).
    """
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(output, tuple) and len(output) > 1:
        return output[1]
    raise TypeError(f"unexpected CLIP feature output of type {type(output).__name__}")


class _ImageEmbedder:
    """Batching, device placement and preprocessing shared by the DINO and CLIP embedders."""

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any | None,
        fallback: _TorchPreprocess,
        device: str | torch.device,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_processor = image_processor
        self._fallback = fallback

    def _autocast(self) -> Any:
        # fp16 halves memory and time on GPU; CPU stays in fp32 (CPU autocast is slow and lossy)
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    def _pixel_values(self, batch: Images) -> Tensor:
        if self.image_processor is None:
            return self._fallback(batch)
        # hub processors expect PIL/uint8 input; tensors are rounded to 8 bits, as when saved to disk
        out = self.image_processor(images=to_pil_list(batch), return_tensors="pt")
        return out["pixel_values"]

    def _forward_images(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Images, batch_size: int = 32, progress: bool = False) -> Tensor:
        """Embed images (PIL list or float (N, 3, H, W) in [0, 1]) -> float32 (N, D) on CPU."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks: list[Tensor] = []
        name = type(self).__name__
        with tqdm(total=num_images(images), disable=not progress, desc=name, unit="img") as bar:
            for batch in _batches(images, batch_size):
                pixels = self._pixel_values(batch).to(self.device)
                with self._autocast():
                    chunks.append(self._forward_images(pixels).float().cpu())
                bar.update(num_images(batch))
        if not chunks:
            raise ValueError(f"{name}: no images to embed")
        return torch.cat(chunks)


def image_embedding(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """One vector per image: a ViT's CLS token (DINO's choice), or a conv net's pooled output
    (the toy DINO stand-in is a small ResNet)."""
    output = model(pixel_values=pixel_values)
    hidden = output.last_hidden_state
    return hidden[:, 0] if hidden.dim() == 3 else output.pooler_output.flatten(1)


class DinoEmbedder(_ImageEmbedder):
    """DINO image embeddings: the CLS token of a ViT's last hidden state (or a conv net's
    pooled output, see `image_embedding`)."""

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        size = int(getattr(model.config, "image_size", 224))  # conv nets take any size
        super().__init__(
            model, image_processor, _TorchPreprocess(size, IMAGENET_MEAN, IMAGENET_STD), device
        )

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str] = DEFAULT_DINO_MODEL,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        config_key: str | None = None,
    ) -> DinoEmbedder:
        from transformers import AutoImageProcessor, AutoModel

        model_id_or_path = str(model_id_or_path)
        name = _check_local(model_id_or_path, "dino", config_key)
        # transformers 5.x's AutoModel looks for a PEFT adapter_config.json on the hub even with
        # local_files_only=True (minutes of retries offline) unless adapter_kwargs repeats it
        adapter_kwargs = {"local_files_only": True} if local_files_only else None
        with _reraise_not_found(model_id_or_path, "dino", config_key):
            model = _pretrained(AutoModel, name, local_files_only, adapter_kwargs=adapter_kwargs)
        processor = _optional_processor(AutoImageProcessor, name, local_files_only)
        return cls(model, processor, device)

    def _forward_images(self, pixel_values: Tensor) -> Tensor:
        return image_embedding(self.model, pixel_values)


class ClipEmbedder(_ImageEmbedder):
    """CLIP image and text embeddings (the projected features that CLIP compares)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_processor: Any | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        size = int(model.config.vision_config.image_size)
        super().__init__(
            model, image_processor, _TorchPreprocess(size, CLIP_MEAN, CLIP_STD), device
        )
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str] = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        config_key: str | None = None,
    ) -> ClipEmbedder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model_id_or_path = str(model_id_or_path)
        name = _check_local(model_id_or_path, "clip", config_key)
        with _reraise_not_found(model_id_or_path, "clip", config_key):
            model = _pretrained(CLIPModel, name, local_files_only)
            tokenizer = _pretrained(AutoTokenizer, name, local_files_only)
        processor = _optional_processor(AutoImageProcessor, name, local_files_only)
        return cls(model, tokenizer, processor, device)

    def _forward_images(self, pixel_values: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> Tensor:
        """Embed prompts -> float32 (N, D) on CPU; prompts longer than CLIP's context are cut."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, not a single string")
        if not texts:
            raise ValueError("ClipEmbedder: no texts to embed")
        chunks: list[Tensor] = []
        with tqdm(total=len(texts), disable=not progress, desc="ClipEmbedder text") as bar:
            for start in range(0, len(texts), batch_size):
                batch = list(texts[start : start + batch_size])
                tokens = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                with self._autocast():
                    out = self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                chunks.append(_features(out).float().cpu())
                bar.update(len(batch))
        return torch.cat(chunks)


def _optional_processor(loader: Any, name: str, local_files_only: bool) -> Any | None:
    # a folder with weights but no preprocessor_config.json still works via the torch fallback
    try:
        return _pretrained(loader, name, local_files_only)
    except _load_errors():
        log.warning("no image processor found for '%s'; resizing and normalising in torch", name)
        return None


def load_embedder(
    kind: EmbedderKind,
    model_id_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    config_key: str | None = None,
) -> DinoEmbedder | ClipEmbedder:
    """Load the `dino` or `clip` embedder; missing weights raise a one-line MetricModelNotFound."""
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown embedder kind '{kind}', expected one of {sorted(_DEFAULTS)}")
    name = str(model_id_or_path) if model_id_or_path is not None else _DEFAULTS[kind]
    cls = DinoEmbedder if kind == "dino" else ClipEmbedder
    return cls.from_pretrained(
        name, device=device, local_files_only=local_files_only, config_key=config_key
    )
