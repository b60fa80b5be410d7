"""Images in, DreamBooth metrics out: embeds with the DINO/CLIP embedders and scores the protocol."""

from __future__ import annotations

from collections.abc import Mapping

from t2ilab.metrics.dreambooth import (
    DreamBoothResult,
    PairDistance,
    PromptEmbeddings,
    div_score,
    dreambooth_scores,
    remove_identifier,
)
from t2ilab.metrics.embedders import ClipEmbedder, DinoEmbedder
from t2ilab.metrics.images import Images, num_images


def evaluate_dreambooth(
    generations: Mapping[str, Images],
    real_images: Images,
    identifier: str,
    dino: DinoEmbedder,
    clip: ClipEmbedder,
    prior_images: Images | None = None,
    distance: PairDistance | None = None,
    batch_size: int = 32,
    progress: bool = False,
    clip_t_without_identifier: bool = True,
) -> DreamBoothResult:
    """Score generations keyed by their prompt (identifier included) against the real subject.

    `pres` is added when `prior_images` (class-prompt generations) are given, `div` when a
    `distance` (e.g. LpipsDistance) is given, and `prior_div` (the diversity of the class-prompt
    generations, which drops with language drift) when both are. CLIP-T compares each image with its prompt without
    the identifier (the rare token means nothing to CLIP) unless `clip_t_without_identifier` is off.
    """
    if not generations:
        raise ValueError("evaluate_dreambooth needs generations for at least one prompt")
    empty = [p for p, imgs in generations.items() if num_images(imgs) == 0]
    if empty:
        raise ValueError(f"no generated images for prompt '{empty[0]}'")
    kw = {"batch_size": batch_size, "progress": progress}
    real_dino = dino.embed_images(real_images, **kw)
    real_clip = clip.embed_images(real_images, **kw)
    prompts = list(generations)
    text_prompts = [
        remove_identifier(p, identifier) if clip_t_without_identifier else p for p in prompts
    ]
    texts = clip.embed_texts(text_prompts, **kw)
    embedded = [
        PromptEmbeddings(
            prompt=p,
            text=text,
            clip_image=clip.embed_images(generations[p], **kw),
            dino=dino.embed_images(generations[p], **kw),
        )
        for p, text in zip(prompts, texts, strict=True)
    ]
    prior_dino = dino.embed_images(prior_images, **kw) if prior_images is not None else None
    result = dreambooth_scores(embedded, real_dino, real_clip, prior_dino)
    if distance is None:
        return result
    metrics = {**result.metrics, "div": div_score(list(generations.values()), distance)}
    if prior_images is not None and num_images(prior_images) >= 2:
        # Language drift shows as the class prompt's generations collapsing onto one look.
        metrics["prior_div"] = div_score([prior_images], distance)
    return DreamBoothResult(metrics=metrics, rows=result.rows)
