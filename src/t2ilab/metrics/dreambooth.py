"""The DreamBooth evaluation protocol (Ruiz et al., CVPR 2023) on precomputed embeddings.

- dino:   subject fidelity, mean pairwise cosine of DINO embeddings, generated vs real subject.
- clip_i: the same with CLIP image embeddings.
- clip_t: prompt fidelity, cosine between each prompt's CLIP text embedding (identifier removed)
          and the CLIP image embeddings of that prompt's generations.
- pres:   prior preservation, DINO similarity of class-prompt generations ("a dog") to the real
          subject; lower is better (the class prior did not collapse onto the subject).
- div:    diversity, mean pairwise LPIPS distance between generations of one prompt, averaged
          over prompts; higher is better.
- prior_div: the same diversity for the class-prompt generations; language drift lowers it.

dino, clip_i and clip_t are pooled over all generated images, which equals the mean over prompts
when every prompt has the same number of images (the protocol's setting).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from t2ilab.metrics.images import Images, to_image_tensor
from t2ilab.metrics.similarity import mean_matched_cosine, mean_pairwise_cosine

# distance(img_a, img_b) on float (N, 3, H, W) batches in [0, 1] -> (N,) per-pair distances
PairDistance = Callable[[Tensor, Tensor], Tensor]

ROW_COLUMNS = ("prompt", "clip_t", "dino", "clip_i")


def remove_identifier(prompt: str, identifier: str) -> str:
    """Drop the rare-token identifier: "a sks dog in the snow" -> "a dog in the snow".

    CLIP has never seen the identifier, so CLIP-T is scored against the prompt without it.
    Only whole tokens are removed (case-insensitive), and whitespace is normalised.
    """
    text = prompt
    for token in identifier.split():
        # word boundaries: "sks" and "sks," go (the comma stays), "sksdog" and "asks" stay intact
        text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def dino_score(generated_dino: Tensor, real_dino: Tensor) -> float:
    return float(mean_pairwise_cosine(generated_dino, real_dino))


def clip_i_score(generated_clip: Tensor, real_clip: Tensor) -> float:
    return float(mean_pairwise_cosine(generated_clip, real_clip))


def pres_score(prior_dino: Tensor, real_dino: Tensor) -> float:
    return float(mean_pairwise_cosine(prior_dino, real_dino))


def clip_t_score(text_embeds: Tensor, image_embeds: Sequence[Tensor]) -> float:
    """Mean cosine of every generated image with its own prompt's text embedding.

    text_embeds: (P, D), one row per prompt; image_embeds[p]: (n_p, D) for prompt p.
    """
    if text_embeds.ndim != 2 or text_embeds.shape[0] != len(image_embeds):
        raise ValueError(
            f"need one text embedding per prompt: got {tuple(text_embeds.shape)} for "
            f"{len(image_embeds)} prompts"
        )
    texts = torch.cat(
        [t.expand(len(imgs), -1) for t, imgs in zip(text_embeds, image_embeds, strict=True)]
    )
    return float(mean_matched_cosine(texts, torch.cat(list(image_embeds))))


def _distance_sum(distance: PairDistance, a: Tensor, b: Tensor) -> Tensor:
    d = torch.as_tensor(distance(a, b)).detach().float().reshape(-1).cpu()
    if d.numel() == a.shape[0]:
        return d.sum()
    if d.numel() == 1:  # the callable averaged over the batch
        return d[0] * a.shape[0]
    raise ValueError(f"distance returned {d.numel()} values for a batch of {a.shape[0]} pairs")


def div_score(
    images_per_prompt: Sequence[Images], distance: PairDistance, pair_batch_size: int = 16
) -> float:
    """Mean distance over all unordered pairs of one prompt's images, averaged over prompts.

    Prompts with fewer than 2 images have no pairs and are skipped.
    """
    per_prompt: list[Tensor] = []
    for images in images_per_prompt:
        imgs = to_image_tensor(images)
        n = imgs.shape[0]
        if n < 2:
            continue
        first, second = torch.triu_indices(n, n, offset=1)
        total = torch.zeros(())
        for start in range(0, first.numel(), pair_batch_size):
            i, j = first[start : start + pair_batch_size], second[start : start + pair_batch_size]
            total += _distance_sum(distance, imgs[i], imgs[j])
        per_prompt.append(total / first.numel())
    if not per_prompt:
        raise ValueError("div needs at least one prompt with 2 or more generated images")
    return float(torch.stack(per_prompt).mean())


@dataclass(frozen=True)
class PromptEmbeddings:
    """Embeddings of one evaluation prompt and its generations."""

    prompt: str  # as generated, identifier included; only used to label the row
    text: Tensor  # (D,) CLIP text embedding of the prompt with the identifier removed
    clip_image: Tensor  # (n, D) CLIP image embeddings of the prompt's generations
    dino: Tensor  # (n, D') DINO embeddings of the same generations


@dataclass(frozen=True)
class PromptRow:
    """Per-prompt scores, one row of the W&B table (columns: ROW_COLUMNS)."""

    prompt: str
    clip_t: float
    dino: float
    clip_i: float

    def as_dict(self) -> dict[str, str | float]:
        return asdict(self)


@dataclass(frozen=True)
class DreamBoothResult:
    metrics: dict[str, float]  # keys from {dino, clip_i, clip_t, pres, div}
    rows: list[PromptRow] = field(default_factory=list)


def dreambooth_scores(
    prompts: Sequence[PromptEmbeddings],
    real_dino: Tensor,
    real_clip: Tensor,
    prior_dino: Tensor | None = None,
) -> DreamBoothResult:
    """dino, clip_i, clip_t (and pres when prior-class generations are given) plus per-prompt rows."""
    if not prompts:
        raise ValueError("dreambooth_scores needs at least one prompt")
    rows = [
        PromptRow(
            prompt=p.prompt,
            clip_t=clip_t_score(p.text.reshape(1, -1), [p.clip_image]),
            dino=dino_score(p.dino, real_dino),
            clip_i=clip_i_score(p.clip_image, real_clip),
        )
        for p in prompts
    ]
    metrics = {
        "dino": dino_score(torch.cat([p.dino for p in prompts]), real_dino),
        "clip_i": clip_i_score(torch.cat([p.clip_image for p in prompts]), real_clip),
        "clip_t": clip_t_score(
            torch.stack([p.text.reshape(-1) for p in prompts]), [p.clip_image for p in prompts]
        ),
    }
    if prior_dino is not None:
        metrics["pres"] = pres_score(prior_dino, real_dino)
    return DreamBoothResult(metrics=metrics, rows=rows)
