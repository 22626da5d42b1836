"""Evaluation of a module on a split: mean loss and accuracy (next-token accuracy for text)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peerd.algorithm.losses import correct_predictions, task_loss
from peerd.data import Split


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    samples: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate(module: nn.Module, kind: str, split: Split, batch_size: int = 256) -> Evaluation:
    if len(split) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    module.eval()
    loss_sum, correct, predictions = 0.0, 0, 0
    for start in range(0, len(split), batch_size):
        inputs = split.inputs[start:start + batch_size]
        targets = split.targets[start:start + batch_size]
        logits = module(inputs)
        loss_sum += float(task_loss(kind, logits, targets)) * targets.numel()
        correct += correct_predictions(logits, targets)
        predictions += targets.numel()
    return Evaluation(loss_sum / predictions, correct / predictions, len(split))
