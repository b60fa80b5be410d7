"""The DreamBooth evaluation protocol as one object: generate the prompt set with fixed seeds,
embed, score. Shared by the end-of-fit callback and `python evaluate.py`, so "before" (the base
model) and "after" (a fine-tuned export) are measured the same way."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from t2ilab.errors import UserError
from t2ilab.metrics.dreambooth import ROW_COLUMNS
from t2ilab.metrics.embedders import ClipEmbedder, DinoEmbedder, load_embedder
from t2ilab.metrics.fid import fid_kid_from_folder
from t2ilab.metrics.images import list_image_files, load_image_folder
from t2ilab.metrics.lpips import LpipsDistance, lpips_available
from t2ilab.metrics.prompts import format_prompts, select_prompts
from t2ilab.metrics.scoring import evaluate_dreambooth
from t2ilab.metrics.tiny import EmbeddingDistance, build_tiny_evaluators
from t2ilab.models.pipelines import pipeline_call_kwargs

log = logging.getLogger(__name__)

DIV_DISTANCES = ("lpips", "dino", None)


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]  # ROW_COLUMNS per prompt
    images: dict[str, list[Image.Image]]  # prompt -> generations
    prior_images: list[Image.Image] = field(default_factory=list)


class DreamBoothProtocol:
    """`eval_cfg` is the `eval` config group (conf/eval/*.yaml); `subject_dir` holds the real
    subject images. Evaluators load lazily, once, so every-N-steps evaluation reuses them."""

    def __init__(
        self,
        eval_cfg: Mapping[str, Any],
        subject_dir: str | Path,
        identifier: str,
        class_noun: str,
        device: str | torch.device = "cpu",
    ):
        self.cfg = dict(eval_cfg)
        self.identifier = identifier
        self.class_noun = class_noun
        self.device = torch.device(device)
        self.prompts = format_prompts(select_prompts(self.cfg), identifier, class_noun)
        prior = self.cfg.get("prior_prompt")
        self.prior_prompt = format_prompts([prior], identifier, class_noun)[0] if prior else None
        self.subject_dir = Path(subject_dir).expanduser()
        self.check()
        self._evaluators: tuple[DinoEmbedder, ClipEmbedder] | None = None

    def check(self) -> None:
        """Cheap checks of the user's input, before any model loads or image is generated."""
        if not self.subject_dir.is_dir() or not list_image_files(self.subject_dir):
            raise UserError(
                f"evaluation needs the real subject images: {self.subject_dir} has none "
                "(set data.instance_dir=PATH)"
            )
        if self.cfg.get("div_distance") not in DIV_DISTANCES:
            raise UserError(
                f"eval.div_distance={self.cfg.get('div_distance')!r} is not one of lpips, dino, null"
            )
        if self.cfg.get("div_distance") == "lpips" and not lpips_available():
            raise UserError(
                "eval.div_distance=lpips needs torchvision: pip install -e '.[gpu]', or set "
                "eval.div_distance=dino (an embedding distance) or eval.div_distance=null to skip div"
            )
        reference = self.cfg.get("reference_dir")
        if reference:
            n = len(list_image_files(reference)) if Path(reference).expanduser().is_dir() else 0
            if n < 2:
                raise UserError(
                    f"eval.reference_dir={reference} has {n} images: FID/KID need a folder of at "
                    "least 2 real images (thousands for a stable FID), or set eval.reference_dir=null"
                )
        n = int(self.cfg.get("images_per_prompt", 0))
        if n < 1:
            raise UserError("eval.images_per_prompt must be >= 1 (the paper uses 4)")
        if n < 2 and self.cfg.get("div_distance") is not None:
            raise UserError(
                f"eval.images_per_prompt={n}: DIV compares images of the same prompt, so it needs "
                "at least 2 (the paper uses 4); raise it, or set eval.div_distance=null to skip div"
            )
        prior_n = self.cfg.get("prior_images")
        if prior_n is not None and int(prior_n) < 2:
            raise UserError(
                f"eval.prior_images={prior_n}: PRES and prior_div need at least 2 class-prompt "
                "images; raise it, or null for images_per_prompt"
            )

    @property
    def num_prior_images(self) -> int:
        """Class-prompt images for PRES and prior_div: more than one prompt's worth is cheap
        and steadies both (prior_div from 4 images averages 6 pairs)."""
        n = self.cfg.get("prior_images")
        return int(self.cfg["images_per_prompt"]) if n is None else int(n)

    def evaluators(self) -> tuple[DinoEmbedder, ClipEmbedder]:
        if self._evaluators is None:
            if self.cfg.get("evaluators", "pretrained") == "tiny_random":
                log.warning(
                    "eval: tiny randomly initialised evaluators: the metrics test the pipeline, "
                    "not the model (use eval=dreambooth with real models)"
                )
                self._evaluators = build_tiny_evaluators(
                    int(self.cfg.get("seed", 0)), device=self.device
                )
            else:
                local = bool(self.cfg.get("local_files_only", False))
                dino = load_embedder(
                    "dino", self.cfg["dino_model"], self.device, local, "eval.dino_model"
                )
                clip = load_embedder(
                    "clip", self.cfg["clip_model"], self.device, local, "eval.clip_model"
                )
                self._evaluators = (dino, clip)
        return self._evaluators

    @torch.no_grad()
    def generate(
        self, pipe, prompts: list[str], desc: str = "eval images", n: int | None = None
    ) -> dict[str, list[Image.Image]]:
        """`n` (default `images_per_prompt`) images per prompt; image i of every prompt uses
        seed + i."""
        cfg = self.cfg
        n = int(cfg["images_per_prompt"]) if n is None else n
        batch = max(1, int(cfg.get("batch_size", 8)))
        seed = int(cfg.get("seed", 0))
        jobs = [(p, i) for p in prompts for i in range(n)]
        out: dict[str, list[Image.Image]] = {p: [] for p in prompts}
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=pipe.device.type == "cuda")
        with tqdm(total=len(jobs), desc=desc, unit="img") as bar, autocast:
            for start in range(0, len(jobs), batch):
                chunk = jobs[start : start + batch]
                images = pipe(
                    prompt=[p for p, _ in chunk],
                    generator=[torch.Generator("cpu").manual_seed(seed + i) for _, i in chunk],
                    num_inference_steps=int(cfg["num_inference_steps"]),
                    guidance_scale=float(cfg["guidance_scale"]),
                    height=cfg.get("resolution"),
                    width=cfg.get("resolution"),
                    **pipeline_call_kwargs(pipe),
                ).images
                for (p, _), image in zip(chunk, images, strict=True):
                    out[p].append(image)
                bar.update(len(chunk))
        return out

    def run(self, pipe) -> EvalOutput:
        if self._evaluators is None:
            self.device = pipe.device
        generations = self.generate(pipe, self.prompts)
        prior = (
            self.generate(pipe, [self.prior_prompt], "prior images", self.num_prior_images)[
                self.prior_prompt
            ]
            if self.prior_prompt
            else None
        )
        return self.score(generations, prior)

    def score(
        self, generations: dict[str, list[Image.Image]], prior: list[Image.Image] | None
    ) -> EvalOutput:
        dino, clip = self.evaluators()
        # Subject photos come in any size; the evaluators resize to 224 anyway.
        real = load_image_folder(self.subject_dir, size=224)
        distance = None
        if self.cfg.get("div_distance") == "lpips":
            distance = LpipsDistance(device=self.device)
        elif self.cfg.get("div_distance") == "dino":
            distance = EmbeddingDistance(dino)
        result = evaluate_dreambooth(
            generations,
            real,
            self.identifier,
            dino,
            clip,
            prior_images=prior,
            distance=distance,
            batch_size=int(self.cfg.get("batch_size", 8)),
            clip_t_without_identifier=bool(self.cfg.get("remove_identifier_for_clip_t", True)),
        )
        metrics = dict(result.metrics)
        if self.cfg.get("reference_dir"):
            every = [img for images in generations.values() for img in images]
            feature = self.cfg.get("fid_feature", 2048)
            if feature == "dino":
                feature = _EmbedderFeatures(dino)
            fk = fid_kid_from_folder(
                self.cfg["reference_dir"], every, feature=feature, device=self.device
            )
            metrics.update(fid=fk["fid"], kid=fk["kid"])
        rows = [r.as_dict() for r in result.rows]
        assert all(set(ROW_COLUMNS) <= set(r) for r in rows)
        return EvalOutput(metrics, rows, generations, prior or [])


class _EmbedderFeatures(torch.nn.Module):
    """An embedder as a torchmetrics FID feature extractor: CPU-friendly FID in DINO space."""

    def __init__(self, embedder: DinoEmbedder):
        super().__init__()
        self.embedder = embedder
        self.num_features = int(embedder.embed_images(torch.zeros(1, 3, 32, 32)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed_images(images).to(images.device)
