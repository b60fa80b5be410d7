"""The DreamBooth objective on fixed tensors, computed by hand."""

from __future__ import annotations

import pytest
import torch

from t2ilab.modules.losses import per_sample_mse, prior_preservation_loss

PRED = torch.tensor(
    [[[[1.0, 2.0]]], [[[0.0, 0.0]]], [[[3.0, 1.0]]], [[[2.0, 2.0]]]]
)  # (4, 1, 1, 2): 2 instance samples then 2 class samples
TARGET = torch.zeros_like(PRED)


def test_per_sample_mse():
    # (1+4)/2, 0, (9+1)/2, (4+4)/2
    assert per_sample_mse(PRED, TARGET).tolist() == [2.5, 0.0, 5.0, 4.0]


def test_prior_preservation_loss_by_hand():
    loss, parts = prior_preservation_loss(per_sample_mse(PRED, TARGET), 2, prior_loss_weight=0.5)
    instance, prior = (2.5 + 0.0) / 2, (5.0 + 4.0) / 2
    assert parts["instance_loss"].item() == pytest.approx(instance)
    assert parts["prior_loss"].item() == pytest.approx(prior)
    assert loss.item() == pytest.approx(instance + 0.5 * prior)


def test_snr_weights_stay_with_their_own_samples():
    weights = torch.tensor([1.0, 2.0, 0.5, 0.25])
    loss, parts = prior_preservation_loss(per_sample_mse(PRED, TARGET), 2, 1.0, weights)
    instance = (2.5 * 1.0 + 0.0 * 2.0) / 2
    prior = (5.0 * 0.5 + 4.0 * 0.25) / 2
    assert parts["instance_loss"].item() == pytest.approx(instance)
    assert parts["prior_loss"].item() == pytest.approx(prior)
    assert loss.item() == pytest.approx(instance + prior)
    # diffusers #6481: the instance half weighted by the whole batch's weights gives another value.
    buggy = (per_sample_mse(PRED, TARGET)[:2].mean() * weights).mean()
    assert buggy.item() != pytest.approx(instance)


def test_without_class_samples_the_loss_is_the_instance_loss():
    loss, parts = prior_preservation_loss(per_sample_mse(PRED[:2], TARGET[:2]), 2, 1.0)
    assert "prior_loss" not in parts
    assert loss.item() == pytest.approx(1.25)


def test_mismatched_weights_are_rejected():
    with pytest.raises(ValueError):
        prior_preservation_loss(torch.ones(4), 2, 1.0, torch.ones(2))
