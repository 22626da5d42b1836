"""Training losses. The task loss is cross-entropy: over classes for images, over the next
token at every position for text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def task_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "text":
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits, targets)


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Correct classes for images; correct next tokens for text."""
    return int((logits.argmax(dim=-1) == targets).sum())


# ---- early exits: cross-entropy on every exit, self-distillation from the deepest -------------


def early_exit_loss(kind: str, exit_logits: Sequence[torch.Tensor], targets: torch.Tensor,
                    temperature: float | None) -> torch.Tensor:
    """CE on every exit + T^2 * sum over the shallower exits of KL(deepest || shallower), the
    distributions softened by T (Co-S2P's self-distillation); temperature None: CE only.

    The teacher (the deepest exit) is detached: it learns from the labels alone, so a shallow
    exit's mistakes never pull the deepest exit (the model's output) towards them; the KL term
    moves only the shallower exits and the blocks below them. T^2 keeps the soft term's
    gradients on the scale of the CE term's as T grows (Hinton et al.)."""
    loss = sum((task_loss(kind, logits, targets) for logits in exit_logits),
               torch.zeros((), dtype=exit_logits[-1].dtype))
    if temperature is None or len(exit_logits) < 2:
        return loss
    classes = exit_logits[-1].shape[-1]
    teacher = F.log_softmax(exit_logits[-1].detach().reshape(-1, classes) / temperature, dim=-1)
    for student_logits in exit_logits[:-1]:
        student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
        loss = loss + temperature**2 * F.kl_div(student, teacher, reduction="batchmean",
                                                log_target=True)
    return loss
