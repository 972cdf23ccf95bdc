"""Tests for counting.losses."""

import pytest
import torch

from counting.losses import make_loss


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def fit_linear(head: str, label_smoothing: float, steps: int = 100) -> tuple[float, float, float]:
    """Train a linear model on 3 separable classes; returns the first loss, the last loss and the accuracy."""
    centres = torch.tensor([[-3.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    targets = torch.arange(3).repeat(20)
    features = centres[targets] + 0.3 * torch.randn(len(targets), 2)
    model = torch.nn.Linear(2, 3 if head == "classification" else 2)
    loss_fn = make_loss(head, label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(features)
    predicted = logits.argmax(1) if head == "classification" else (logits > 0).sum(1)
    return losses[0], losses[-1], (predicted == targets).float().mean().item()


@pytest.mark.parametrize("head", ["classification", "ordinal"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_decreases_on_a_learnable_problem(head, label_smoothing):
    first, last, accuracy = fit_linear(head, label_smoothing)
    assert last < 0.75 * first
    assert accuracy == 1.0


def test_ordinal_loss_is_binary_cross_entropy_of_cumulative_targets():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    targets = torch.tensor([2, 0])
    cumulative = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # 1[y > k] for k = 0, 1, 2
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, cumulative, reduction="sum") / 2
    torch.testing.assert_close(make_loss("ordinal")(logits, targets), expected)


def test_label_smoothing_moves_ordinal_targets_towards_one_half():
    logits = torch.tensor([[0.7, -0.4]])
    targets = torch.tensor([1])
    smoothed = torch.tensor([[0.95, 0.05]])  # (1, 0) smoothed by 0.1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, smoothed, reduction="sum")
    torch.testing.assert_close(make_loss("ordinal", 0.1)(logits, targets), expected)


def test_classification_loss_applies_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([0])
    log_probs = logits.log_softmax(1)[0]
    expected = -(0.9 * log_probs[0] + 0.1 / 3 * log_probs.sum())
    torch.testing.assert_close(make_loss("classification", 0.1)(logits, target), expected)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="regression"):
        make_loss("regression")
    with pytest.raises(ValueError, match="label_smoothing"):
        make_loss("classification", 1.0)
    with pytest.raises(ValueError, match="ordinal loss expects"):
        make_loss("ordinal")(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
