"""Training losses. The task loss is cross-entropy: over classes for images, over the next
token at every position for text."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "text":
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits, targets)


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Correct classes for images; correct next tokens for text."""
    return int((logits.argmax(dim=-1) == targets).sum())
