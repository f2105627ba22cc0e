"""The label losses every model trains with: cross-entropy, BCE, and BCE that skips unknown answers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, label_smoothing: float = 0.0
              ) -> torch.Tensor:
    """Cross-entropy for one label per clip (targets may be soft rows after mixup), BCE for multi-label.

    Multi-label targets may hold NaN for answers nobody gave (OpenMIC): those pairs are skipped (:func:`masked_bce`).
    """
    if multilabel:
        unknown = targets.isnan()
        if unknown.any():
            return masked_bce(logits, targets.nan_to_num(0.0), ~unknown)
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE averaged over the (clip, class) pairs whose answer is known.

    OpenMIC leaves most pairs unanswered (datasets.multilabel_targets gives the `known` mask): an
    unknown pair is neither a positive nor a negative, so it adds no loss and no gradient.
    """
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    known = known.to(losses.dtype)
    return (losses * known).sum() / known.sum().clamp_min(1.0)
