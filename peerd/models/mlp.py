"""A multilayer perceptron for tables of numeric features, sliced automatically: its table of
unit groups is derived from its graph (peerd/models/autoslice.py), as a user's model's is."""

from __future__ import annotations

import torch
from torch import nn

from peerd.models.autoslice import AutoSpec


class MLP(nn.Module):
    def __init__(self, features: int, classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp_spec(features: int, classes: int, hidden: tuple[int, ...] = (256, 256)) -> AutoSpec:
    return AutoSpec(lambda: MLP(features, classes, hidden), torch.zeros(features), "image")
