"""A user's MLP on tabular data: the 64 pixel columns of scikit-learn's 8x8 digits as a table.

Plain torch layers and no slicing declaration: peerd derives how to cut the hidden layers
(docs/MODELS.md, Automatic slicing). Run it with

    peerd sim --task examples/mlp_tabular.py:task --rounds 20 --out runs/mlp
    peerd export --from runs/mlp --out mlp.safetensors

`small_task` is the same model at a size CI trains in seconds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import peerd
from peerd.data import load_task_data


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _table(samples: int | None) -> tuple[TensorDataset, TensorDataset]:
    digits = load_task_data("digits")
    train, test = digits.train, digits.test
    limit = slice(None, samples)
    return (TensorDataset(train.inputs.flatten(1)[limit], train.targets[limit]),
            TensorDataset(test.inputs.flatten(1), test.targets))


def task(hidden: int = 512, samples: int | None = None) -> peerd.Task:
    train, test = _table(samples)
    features = train.tensors[0].shape[1]
    return peerd.Task(name="mlp-tabular", model=lambda: MLP(features, hidden, 10),
                      train=train, test=test, batch_size=32, lr=0.05)


def small_task() -> peerd.Task:
    return task(hidden=256, samples=300)
