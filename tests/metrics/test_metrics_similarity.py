"""Cosine reductions against explicit numpy loops."""

import math

import numpy as np
import pytest
import torch

from t2ilab.metrics import mean_matched_cosine, mean_pairwise_cosine, mean_pairwise_cosine_within


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / (math.sqrt(u @ u) * math.sqrt(v @ v)))


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    # rows of very different norms: the functions must normalise, not just take dot products
    a = rng.normal(size=(5, 7)) * rng.uniform(0.1, 10, size=(5, 1))
    b = rng.normal(size=(4, 7)) * rng.uniform(0.1, 10, size=(4, 1))
    return a, b


def test_pairwise_matches_loops(embeddings):
    a, b = embeddings
    ref = np.mean([_cos(a[i], b[j]) for i in range(len(a)) for j in range(len(b))])
    got = mean_pairwise_cosine(torch.from_numpy(a), torch.from_numpy(b))
    assert got.ndim == 0
    assert float(got) == pytest.approx(ref, abs=1e-6)


def test_within_excludes_diagonal(embeddings):
    a, _ = embeddings
    n = len(a)
    ref = np.mean([_cos(a[i], a[j]) for i in range(n) for j in range(n) if i != j])
    assert float(mean_pairwise_cosine_within(torch.from_numpy(a))) == pytest.approx(ref, abs=1e-6)
    # including the diagonal would give a different (larger) value
    with_diag = np.mean([_cos(a[i], a[j]) for i in range(n) for j in range(n)])
    assert not math.isclose(ref, with_diag, abs_tol=1e-3)


def test_matched_pairs_row_i_with_row_i(embeddings):
    a, _ = embeddings
    rng = np.random.default_rng(1)
    c = rng.normal(size=a.shape)
    ref = np.mean([_cos(a[i], c[i]) for i in range(len(a))])
    got = mean_matched_cosine(torch.from_numpy(a), torch.from_numpy(c))
    assert float(got) == pytest.approx(ref, abs=1e-6)


def test_identical_and_scaled_rows_are_fully_similar():
    x = torch.randn(3, 8)
    assert float(mean_matched_cosine(x, 5 * x)) == pytest.approx(1.0, abs=1e-6)
    same = x[:1].repeat(4, 1)
    assert float(mean_pairwise_cosine(same, 2 * same)) == pytest.approx(1.0, abs=1e-6)
    assert float(mean_pairwise_cosine_within(same)) == pytest.approx(1.0, abs=1e-6)
    assert float(mean_pairwise_cosine(x, -x[:1])) < 0  # opposite directions score negative


def test_half_precision_input_is_upcast():
    x = torch.randn(6, 16)
    ref = mean_pairwise_cosine(x, x.flip(0))
    got = mean_pairwise_cosine(x.half(), x.flip(0).half())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), abs=2e-3)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        mean_pairwise_cosine(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine_within(torch.randn(1, 3))
    with pytest.raises(ValueError, match="equal shapes"):
        mean_matched_cosine(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="non-empty"):
        mean_pairwise_cosine(torch.randn(0, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mean_pairwise_cosine(torch.randn(3), torch.randn(2, 3))
