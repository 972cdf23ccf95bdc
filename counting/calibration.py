"""Probability calibration: temperature scaling, negative log-likelihood, ECE and reliability bins."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from counting.models import HEADS, probabilities_from_logits

TEMPERATURE_RANGE = (0.05, 20.0)
_GRID_POINTS = 61
_GOLDEN_STEPS = 40


def _as_float64(values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().cpu().to(torch.float64)
    if tensor.dim() != 2 or not len(tensor):
        raise ValueError(f"{name} must be a non-empty (N, K) array; got shape {tuple(tensor.shape)}")
    return tensor


def _as_labels(labels: torch.Tensor | np.ndarray, n: int, n_classes: int) -> torch.Tensor:
    tensor = torch.as_tensor(labels).detach().cpu()
    if tensor.shape != (n,):
        raise ValueError(f"labels must have shape ({n},); got {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got dtype {tensor.dtype}")
    if n and (int(tensor.min()) < 0 or int(tensor.max()) >= n_classes):
        raise ValueError(f"labels must be class indices in [0, {n_classes}); got values from {int(tensor.min())} "
                         f"to {int(tensor.max())}")
    return tensor.long()


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    chosen = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    return float(-chosen.clamp_min(1e-12).log().mean())


def negative_log_likelihood(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities clamped at 1e-12)."""
    probs = _as_float64(probs, "probs")
    return _nll(probs, _as_labels(labels, len(probs), probs.shape[1]))


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    model_or_head: nn.Module | str) -> float:
    """The temperature in TEMPERATURE_RANGE minimising the validation NLL of `probabilities(logits / T)`.

    model_or_head: a CountingModel (its spec names the head) or a head name. A log-spaced grid search is
    refined by golden-section search on log T, so the result is deterministic and bounded.
    """
    head = model_or_head if isinstance(model_or_head, str) else getattr(model_or_head, "spec", {}).get("head")
    if head not in HEADS:
        raise ValueError(f"model_or_head must be a CountingModel or one of {', '.join(HEADS)}; got {model_or_head!r}")
    logits = _as_float64(logits, "logits")
    n_classes = logits.shape[1] + (1 if head == "ordinal" else 0)
    labels = _as_labels(labels, len(logits), n_classes)

    def loss(log_t: float) -> float:
        return _nll(probabilities_from_logits(logits, head, math.exp(log_t)), labels)

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    grid = np.linspace(low, high, _GRID_POINTS)
    best = int(np.argmin([loss(float(point)) for point in grid]))
    left, right = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, _GRID_POINTS - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = right - ratio * (right - left), left + ratio * (right - left)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(_GOLDEN_STEPS):
        if loss_a < loss_b:
            right, b, loss_b = b, a, loss_a
            a = right - ratio * (right - left)
            loss_a = loss(a)
        else:
            left, a, loss_a = a, b, loss_b
            b = left + ratio * (right - left)
            loss_b = loss(b)
    return math.exp((left + right) / 2)


def _bin_statistics(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: sample count, summed confidence, summed correctness."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    probs = _as_float64(probs, "probs")
    labels = _as_labels(labels, len(probs), probs.shape[1])
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    confidence_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    return count, confidence_sum, correct_sum


def expected_calibration_error(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                               n_bins: int = 10) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width bins of top-class confidence."""
    count, confidence_sum, correct_sum = _bin_statistics(probs, labels, n_bins)
    return float((confidence_sum - correct_sum).abs().sum() / count.sum())


def reliability_bins(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                     n_bins: int = 10) -> dict:
    """Reliability-diagram data over equal-width confidence bins.

    Returns lists of length n_bins: lower, upper (bin edges), count, confidence (mean top-class probability) and
    accuracy (share of correct top-class predictions); confidence and accuracy are None for empty bins.
    """
    count, confidence_sum, correct_sum = _bin_statistics(probs, labels, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": [int(c) for c in count],
        "confidence": [float(s / c) if c else None for s, c in zip(confidence_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count)],
    }
