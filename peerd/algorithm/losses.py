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


# ---- balanced softmax (logit adjustment by the local label prior) ------------------------------


def log_label_prior(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """log p(class) over a peer's training targets (every position for text), each class
    counted once more than it occurs so that an absent class has a finite, small prior."""
    counts = torch.bincount(targets.flatten(), minlength=classes).to(torch.float32) + 1.0
    return torch.log(counts / counts.sum())


class BalancedSoftmax:
    """The training objective CE(logits + log prior) with the peer's own label prior (balanced
    softmax, Ren et al. 2020; logit adjustment, Menon et al. 2021): the model fits p(x | class)
    instead of the peer's skewed p(class), so the units and head rows a peer trains stop
    pushing down the classes it never sees. Evaluation uses the raw logits."""

    frozen_forwards = 0  # no forwards besides the trained module's

    def __init__(self, kind: str, targets: torch.Tensor) -> None:
        self.kind = kind
        self.targets = targets
        self.log_prior: torch.Tensor | None = None  # the class count comes with the logits

    def __call__(self, module: torch.nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        logits = module(inputs)
        if self.log_prior is None:
            self.log_prior = log_label_prior(self.targets, logits.shape[-1])
        return task_loss(self.kind, logits + self.log_prior, targets)


# ---- model-contrastive term (MOON-style) -------------------------------------------------------


def representation(features: torch.Tensor) -> torch.Tensor:
    """One vector per sample: the CNN's pooled features as they are, the transformer's final
    hidden states [batch, steps, d] averaged over positions."""
    return features.mean(dim=1) if features.dim() == 3 else features


def contrastive_loss(
    local: torch.Tensor, aggregated: torch.Tensor, previous: torch.Tensor, tau: float
) -> torch.Tensor:
    """-log(e^{cos(z, z_agg)/tau} / (e^{cos(z, z_agg)/tau} + e^{cos(z, z_prev)/tau})), batch mean:
    pulls z toward the post-aggregation representation, pushes it from the previous one."""
    positive = F.cosine_similarity(local, aggregated, dim=-1) / tau
    negative = F.cosine_similarity(local, previous, dim=-1) / tau
    logits = torch.stack([positive, negative], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))


class ModelContrastive:
    """The training objective with the contrastive term: task loss + weight * contrastive loss.
    `aggregated` and `previous` are frozen sub-models of the same plan as the trained one."""

    # Forwards per sample besides the trained module's: the two frozen representations.
    frozen_forwards = 2

    def __init__(self, kind: str, aggregated: torch.nn.Module, previous: torch.nn.Module,
                 weight: float, tau: float) -> None:
        self.kind = kind
        self.aggregated = aggregated.eval().requires_grad_(False)
        self.previous = previous.eval().requires_grad_(False)
        self.weight = weight
        self.tau = tau

    def __call__(self, module: torch.nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        features = module.features(inputs)
        with torch.no_grad():
            aggregated = representation(self.aggregated.features(inputs))
            previous = representation(self.previous.features(inputs))
        contrast = contrastive_loss(representation(features), aggregated, previous, self.tau)
        return task_loss(self.kind, module.logits(features), targets) + self.weight * contrast
