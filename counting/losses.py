"""Training losses for the counting heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from counting.models import HEADS


class OrdinalLoss(nn.Module):
    """CORAL loss: binary cross-entropy of the K-1 cumulative logits against the targets 1[y > k].

    Summed over thresholds and averaged over the batch. Label smoothing moves each binary target towards 1/2:
    t * (1 - label_smoothing) + label_smoothing / 2.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or targets.dim() != 1 or len(logits) != len(targets):
            raise ValueError(f"ordinal loss expects logits (N, K-1) and targets (N,); got {tuple(logits.shape)} "
                             f"and {tuple(targets.shape)}")
        thresholds = torch.arange(logits.shape[1], device=logits.device)
        levels = (targets.unsqueeze(1) > thresholds).float()
        if self.label_smoothing:
            levels = levels * (1 - self.label_smoothing) + self.label_smoothing / 2
        losses = F.binary_cross_entropy_with_logits(logits.float(), levels, reduction="none")
        return losses.sum(dim=1).mean()


def make_loss(head: str, label_smoothing: float = 0.0) -> nn.Module:
    """Loss(logits, class-index targets) for a head: cross-entropy ("classification") or `OrdinalLoss`."""
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1):
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if head == "classification":
        return nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))
    if head == "ordinal":
        return OrdinalLoss(float(label_smoothing))
    raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
