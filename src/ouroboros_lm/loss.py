"""The one next-token loss every number in this package is computed with.

Hugging Face's convention: `labels` are aligned with the inputs, position t is scored against
labels[t+1] (shifted once, here), and -100 is ignored. Computed in float32 whatever the
logits' precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t+1] at position t, -100 at the last position."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: mean over scored tokens, or their sum (reduction="sum")."""
    target = shift_labels(labels.to(logits.device)).reshape(-1)
    return F.cross_entropy(logits.float().flatten(0, -2), target, ignore_index=IGNORE, reduction=reduction)


def scored_tokens(labels: torch.Tensor) -> int:
    """How many positions `causal_lm_loss` scores for these labels."""
    return int((shift_labels(labels) != IGNORE).sum())


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] next-token cross-entropy of each position (0 where nothing is scored)."""
    target = shift_labels(labels.to(logits.device))
    ce = F.cross_entropy(logits.float().flatten(0, -2), target.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(target.shape)
