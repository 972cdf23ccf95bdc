"""Tests for counting.calibration."""

import math

import pytest
import torch

from counting.calibration import (expected_calibration_error, fit_temperature, negative_log_likelihood,
                                  reliability_bins)
from counting.models import CountingModel, probabilities_from_logits


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def sampled_labels(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Labels drawn from the probabilities the logits express: the logits are calibrated for them."""
    return torch.multinomial(probabilities_from_logits(logits, head), 1).squeeze(1)


@pytest.mark.parametrize("head,width", [("classification", 5), ("ordinal", 4)])
def test_temperature_undoes_over_confidence(head, width):
    logits = 1.5 * torch.randn(3000, width)
    if head == "ordinal":
        logits = torch.randn(3000, 1) + torch.linspace(1.5, -1.5, width)
    labels = sampled_labels(logits, head)
    over_confident = 3.0 * logits
    temperature = fit_temperature(over_confident, labels, head)
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = negative_log_likelihood(probabilities_from_logits(over_confident, head), labels)
    after = negative_log_likelihood(probabilities_from_logits(over_confident, head, temperature), labels)
    assert after < before


def test_fit_temperature_reads_the_head_from_a_model_and_checks_inputs():
    model = CountingModel("resnet18", 4, head="ordinal")
    logits = torch.randn(50, 3)
    labels = sampled_labels(logits, "ordinal")
    assert fit_temperature(logits, labels, model) == fit_temperature(logits, labels, "ordinal")
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        fit_temperature(logits, torch.full((50,), 4), "ordinal")
    with pytest.raises(ValueError, match="model_or_head"):
        fit_temperature(logits, labels, "regression")


def test_negative_log_likelihood_by_hand():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    assert negative_log_likelihood(probs, torch.tensor([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)


def calibrated_sample(n: int, over_confidence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-class probabilities whose top class is right with probability equal to its confidence."""
    confidence = 0.4 + 0.6 * torch.rand(n)
    probs = torch.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], dim=1)
    correct = torch.rand(n) < confidence - over_confidence
    labels = torch.where(correct, 0, 1 + torch.randint(0, 2, (n,)))
    return probs, labels


def test_ece_is_small_for_calibrated_and_large_for_over_confident_predictions():
    probs, labels = calibrated_sample(20000)
    assert expected_calibration_error(probs, labels) < 0.02
    probs, labels = calibrated_sample(20000, over_confidence=0.2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2, abs=0.03)


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.92, 0.08], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    bins = reliability_bins(probs, labels, n_bins=4)
    assert bins["lower"] == [0.0, 0.25, 0.5, 0.75] and bins["upper"] == [0.25, 0.5, 0.75, 1.0]
    assert bins["count"] == [0, 0, 2, 2]
    assert bins["confidence"][:2] == [None, None]
    assert bins["confidence"][2:] == [pytest.approx(0.625), pytest.approx(0.935)]
    assert bins["accuracy"][2:] == [1.0, 0.5]
    expected_ece = (2 * abs(1.0 - 0.625) + 2 * abs(0.5 - 0.935)) / 4
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(expected_ece)
