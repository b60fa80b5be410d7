"""DreamBooth protocol maths against independent numpy computations."""

import math

import numpy as np
import pytest
import torch

from t2ilab.metrics import (
    ROW_COLUMNS,
    PromptEmbeddings,
    clip_t_score,
    div_score,
    dreambooth_scores,
    lpips_available,
    remove_identifier,
)
from t2ilab.metrics.lpips import LpipsDistance


def _cos(u, v) -> float:
    return float(u @ v / (math.sqrt(u @ u) * math.sqrt(v @ v)))


def _pairwise(a, b) -> float:
    return float(np.mean([_cos(x, y) for x in a for y in b]))


@pytest.mark.parametrize(
    ("prompt", "identifier", "expected"),
    [
        ("a sks dog in the snow", "sks", "a dog in the snow"),
        ("  a   photo of sks  dog ", "sks", "a photo of dog"),
        ("sks dog", "sks", "dog"),
        ("a photo of sks, a dog", "sks", "a photo of, a dog"),
        ("a SKS dog", "sks", "a dog"),
        ("asks the sksdog", "sks", "asks the sksdog"),  # only whole tokens go
        ("a sks xqz dog", "sks xqz", "a dog"),  # multi-token identifiers
        ("a <v1> toy on a table", "<v1>", "a toy on a table"),  # regex characters are literal
        ("a dog", "sks", "a dog"),
    ],
)
def test_remove_identifier(prompt, identifier, expected):
    assert remove_identifier(prompt, identifier) == expected


@pytest.fixture
def protocol_inputs():
    rng = np.random.default_rng(42)
    real_dino = rng.normal(size=(4, 6))
    real_clip = rng.normal(size=(4, 5))
    prior_dino = rng.normal(size=(3, 6))
    counts = [3, 2]  # unequal on purpose: the pooled means must weight by image count
    prompts = [
        {
            "prompt": f"a sks dog prompt {k}",
            "text": rng.normal(size=5),
            "clip_image": rng.normal(size=(n, 5)),
            "dino": rng.normal(size=(n, 6)),
        }
        for k, n in enumerate(counts)
    ]
    return real_dino, real_clip, prior_dino, prompts


def _as_embeddings(prompts):
    return [
        PromptEmbeddings(
            prompt=p["prompt"],
            text=torch.from_numpy(p["text"]),
            clip_image=torch.from_numpy(p["clip_image"]),
            dino=torch.from_numpy(p["dino"]),
        )
        for p in prompts
    ]


def test_dreambooth_scores_match_numpy(protocol_inputs):
    real_dino, real_clip, prior_dino, prompts = protocol_inputs
    result = dreambooth_scores(
        _as_embeddings(prompts),
        torch.from_numpy(real_dino),
        torch.from_numpy(real_clip),
        prior_dino=torch.from_numpy(prior_dino),
    )
    all_dino = np.concatenate([p["dino"] for p in prompts])
    all_clip = np.concatenate([p["clip_image"] for p in prompts])
    clip_t_terms = [_cos(p["text"], img) for p in prompts for img in p["clip_image"]]
    expected = {
        "dino": _pairwise(all_dino, real_dino),
        "clip_i": _pairwise(all_clip, real_clip),
        "clip_t": float(np.mean(clip_t_terms)),
        "pres": _pairwise(prior_dino, real_dino),
    }
    assert set(result.metrics) == set(expected)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-6), name

    assert [r.prompt for r in result.rows] == [p["prompt"] for p in prompts]
    for row, p in zip(result.rows, prompts, strict=True):
        assert row.dino == pytest.approx(_pairwise(p["dino"], real_dino), abs=1e-6)
        assert row.clip_i == pytest.approx(_pairwise(p["clip_image"], real_clip), abs=1e-6)
        ref_t = np.mean([_cos(p["text"], img) for img in p["clip_image"]])
        assert row.clip_t == pytest.approx(ref_t, abs=1e-6)
        assert tuple(row.as_dict()) == ROW_COLUMNS


def test_pres_only_with_prior_images(protocol_inputs):
    real_dino, real_clip, _, prompts = protocol_inputs
    result = dreambooth_scores(
        _as_embeddings(prompts), torch.from_numpy(real_dino), torch.from_numpy(real_clip)
    )
    assert set(result.metrics) == {"dino", "clip_i", "clip_t"}


def test_clip_t_pairs_each_image_with_its_own_prompt():
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 1.0]])]
    assert clip_t_score(texts, images) == pytest.approx(1.0)
    # swapping the prompts must hurt: every image now faces an orthogonal text
    assert clip_t_score(texts.flip(0), images) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="one text embedding per prompt"):
        clip_t_score(texts, images[:1])


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_div_matches_explicit_pair_loops():
    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(4, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)]
    groups.append(torch.rand(1, 3, 8, 8, generator=g))  # one image: no pairs, skipped
    per_prompt = []
    for imgs in groups[:2]:
        x = imgs.numpy()
        dists = [np.abs(x[i] - x[j]).mean() for i in range(len(x)) for j in range(len(x)) if i < j]
        per_prompt.append(np.mean(dists))
    expected = float(np.mean(per_prompt))
    assert div_score(groups, _mean_abs) == pytest.approx(expected, rel=1e-5)
    assert div_score(groups, _mean_abs, pair_batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_div_accepts_a_distance_that_returns_the_batch_mean():
    imgs = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    per_pair = div_score([imgs], _mean_abs, pair_batch_size=3)
    batch_mean = div_score([imgs], lambda a, b: _mean_abs(a, b).mean(), pair_batch_size=3)
    assert batch_mean == pytest.approx(per_pair, rel=1e-6)


def test_div_of_identical_generations_is_zero_and_needs_pairs():
    same = torch.rand(1, 3, 8, 8).repeat(3, 1, 1, 1)
    assert div_score([same], _mean_abs) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 or more"):
        div_score([same[:1]], _mean_abs)


@pytest.mark.skipif(lpips_available(), reason="torchvision installed: LPIPS is available")
def test_lpips_without_torchvision_says_what_to_install():
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        LpipsDistance()
