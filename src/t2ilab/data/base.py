"""The datamodule interface train.py calls, with a default for every call.

Every `conf/data/*.yaml` instantiates a subclass of `T2IDataModule`; train.py calls each method
below on it without probing, so a datamodule overrides only what its data has (a subject, class
labels, caches, sample prompts). The same file's `data.cache` block holds the same three keys
for every datamodule (`CacheSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning as L

from t2ilab.errors import UserError

_CACHE_WHAT = {"latents": "VAE latents", "text": "prompt states"}
# Keys the data configs had before the data.cache block.
_RENAMED = {"cache_latents": "cache.latents", "cache_text": "cache.text", "cache_dir": "cache.dir"}


@dataclass(frozen=True)
class CacheSettings:
    """`data.cache`: what is encoded once before training instead of at every step.

    latents: VAE posteriors (mean, std) of the training images.
    text: prompt states of a frozen text encoder.
    dir: where on-disk caches live; None = feature_cache.default_cache_root() (never the
        user's data folder). Only datamodules with an on-disk cache use it.
    """

    latents: bool = False
    text: bool = False
    dir: Path | None = None

    def merged(self, given: Any) -> CacheSettings:
        """These defaults with the config's `data.cache` block (a dict, DictConfig or None)."""
        given = dict(given or {})
        names = [f.name for f in fields(self)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise UserError(
                f"data.cache.{unknown[0]} is not a cache setting: use "
                + ", ".join(f"data.cache.{n}" for n in names)
            )
        for name in ("latents", "text"):
            # bool("false") is True: a quoted value would silently turn caching on.
            if name in given and not isinstance(given[name], bool):
                raise UserError(f"data.cache.{name}={given[name]!r}: use true or false")
        if "dir" in given:
            given["dir"] = Path(str(given["dir"])).expanduser() if given["dir"] else None
        return replace(self, **given)


class T2IDataModule(L.LightningDataModule):
    """Base of every t2ilab datamodule: the calls train.py makes, with the answer for data that
    has no subject, no class labels, no caches and no sample prompts of its own.

    Class attributes a subclass sets:
      CACHE: its `data.cache` defaults (the same values as its conf/data/*.yaml);
      CACHES: the kinds of caching it implements ("latents", "text", "dir" for an on-disk
        cache); `check()` refuses any other that the config turns on.
      class_dir: folder of prior-preservation class images; train.py fills it (and sets it)
        when `class_prompt` is not None.
      classes: class names of class-conditional data (ids 0..K-1), else None; train.py checks
        a config-built DiT has an embedding for each.
    """

    CACHE = CacheSettings()
    CACHES: tuple[str, ...] = ()
    class_dir: Path | None = None
    classes: list[str] | None = None

    def __init__(self, cache: dict | None = None, **ignored):
        """`ignored`: keys a subclass takes and does not use (other data configs' keys); an
        old cache key among them (a config written before data.cache) fails in check()
        rather than being ignored."""
        super().__init__()
        self.tokenizer = None
        self.prompt_transform = None
        # Config mistakes are raised by check(): hydra's instantiate would bury them in a
        # traceback.
        self._config_error: UserError | None = None
        renamed = sorted(k for k in ignored if k in _RENAMED)
        if renamed:
            old = renamed[0]
            self._config_error = UserError(
                f"data.{old} is now data.{_RENAMED[old]}: rename it in your config"
            )
        try:
            self.cache = self.CACHE.merged(cache)
        except UserError as err:
            self.cache, self._config_error = self.CACHE, self._config_error or err

    def check(self) -> None:
        """Called right after instantiation, before any weights load: every setting the data
        cannot honour is a one-line UserError here. The base checks only `data.cache` against
        the caching the class implements; subclasses check their files and call this too."""
        if self._config_error is not None:
            raise self._config_error
        name = type(self).__name__
        for kind, what in _CACHE_WHAT.items():
            if getattr(self.cache, kind) and kind not in self.CACHES:
                raise UserError(
                    f"data.cache.{kind}=true: {name} does not cache {what}: "
                    f"set data.cache.{kind}=false"
                )
        if self.cache.dir is not None and "dir" not in self.CACHES:
            raise UserError(
                f"data.cache.dir={self.cache.dir}: {name} keeps no cache on disk: "
                "set data.cache.dir=null"
            )

    def bind(self, tokenizer, seed: int = 0, prompt_transform=None) -> dict[str, str]:
        """Called once the model's tokenizer exists (None for class-conditional models), with
        the run's seed and the method's prompt rewrite (e.g. textual inversion's placeholder
        tokens). Returns the prompt variables ({identifier}, ...) train.py hands the module to
        fill sample and evaluation prompts with; the base keeps the tokenizer and has none."""
        self.tokenizer = tokenizer
        self.prompt_transform = prompt_transform
        return {}

    @property
    def class_prompt(self) -> str | None:
        """The prompt of prior-preservation class images; when not None, train.py generates
        them into `class_dir` before training. None: no prior preservation."""
        return None

    def subject(self) -> dict[str, Any]:
        """The subject of subject-driven data (identifier, class_noun, instance_dir, ...):
        train.py evaluates it with the DreamBooth protocol and the export records it. {}: no
        subject, so no DreamBooth evaluation."""
        return {}

    def prepare_features(self, components, **keys) -> None:
        """Called after the weights load, with the VAE and text encoders on the encoding device
        and `keys` (model_key, vae_factor, patch_size, text_frozen): encode what the caches
        hold. The base caches nothing."""

    @property
    def text_from_cache(self) -> bool:
        """True when training reads every prompt state from a cache: train.py then lets the
        module move its text encoder off the device during training."""
        return False

    @property
    def latents_from_cache(self) -> bool:
        """True when training reads every image's latents from a cache: train.py then lets the
        module move its VAE off the device during training."""
        return False

    @property
    def id2label(self) -> dict[int, str] | None:
        """{class id: name} of class-conditional data, which train.py gives the model so the
        export names its classes; None for prompt data."""
        return None

    def validation_prompts(self) -> list[str]:
        """Sample-grid prompt templates when callbacks.samples.prompts is null (filled with
        `bind`'s prompt variables, so literal braces are doubled); []: no grid rows."""
        return []
