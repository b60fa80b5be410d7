"""Evaluation metrics: the DreamBooth protocol (dino, clip_i, clip_t, pres, div) and FID/KID."""

from t2ilab.metrics.dreambooth import (
    ROW_COLUMNS,
    DreamBoothResult,
    PairDistance,
    PromptEmbeddings,
    PromptRow,
    clip_i_score,
    clip_t_score,
    dino_score,
    div_score,
    dreambooth_scores,
    pres_score,
    remove_identifier,
)
from t2ilab.metrics.embedders import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    ClipEmbedder,
    DinoEmbedder,
    MetricModelNotFound,
    load_embedder,
)
from t2ilab.metrics.fid import fid_kid, fid_kid_from_folder
from t2ilab.metrics.images import Images, load_image_folder
from t2ilab.metrics.lpips import LpipsDistance, lpips_available
from t2ilab.metrics.scoring import evaluate_dreambooth
from t2ilab.metrics.similarity import (
    mean_matched_cosine,
    mean_pairwise_cosine,
    mean_pairwise_cosine_within,
)

# the metric names logged and configured elsewhere; keep them stable
METRIC_NAMES = ("dino", "clip_i", "clip_t", "pres", "div", "prior_div", "fid", "kid")

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "METRIC_NAMES",
    "ROW_COLUMNS",
    "ClipEmbedder",
    "DinoEmbedder",
    "DreamBoothResult",
    "Images",
    "LpipsDistance",
    "MetricModelNotFound",
    "PairDistance",
    "PromptEmbeddings",
    "PromptRow",
    "clip_i_score",
    "clip_t_score",
    "dino_score",
    "div_score",
    "dreambooth_scores",
    "evaluate_dreambooth",
    "fid_kid",
    "fid_kid_from_folder",
    "load_embedder",
    "load_image_folder",
    "lpips_available",
    "mean_matched_cosine",
    "mean_pairwise_cosine",
    "mean_pairwise_cosine_within",
    "pres_score",
    "remove_identifier",
]
