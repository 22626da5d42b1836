"""Layers that stay calibrated when their input is a slice of the full width.

A sub-model keeps a fraction of a layer's input units. Like inverted dropout, the layer scales
its output by full/kept input units so that activations keep the full model's expected
magnitude and the parameters a peer trains in its slice still fit the assembled full model.
The classifier head is the exception (`head_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def input_scale(full_inputs: int, kept_inputs: int) -> float:
    return full_inputs / kept_inputs


def head_scale(full_inputs: int, kept_inputs: int) -> float:
    """The classifier head's input scale: sqrt(full/kept), not full/kept. With scale s a step of
    SGD moves a logit by about lr * s^2 * (sum of the k kept squared features), so
    s^2 = full/kept keeps the step of the full model's; full/kept would multiply it by full/kept
    (docs/ALGORITHM.md, Scaling). Hidden layers keep full/kept."""
    return math.sqrt(full_inputs / kept_inputs)


class ScaledLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, scale: float) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return super().forward(x)
        return F.linear(x * self.scale, self.weight, self.bias)


class ScaledConv2d(nn.Conv2d):
    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, scale: float
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.scale == 1.0 else out * self.scale
