"""A user's task: scikit-learn's 8x8 digits on a CNN of its own widths, declared with peerd's
sliceable CNN table. Run it with

    peerd sim --task examples/own_digits_task.py:task --rounds 10 --out runs/own
    peerd export --from runs/own --out own.safetensors

and load the result with `task().model().load_state_dict(load_file("own.safetensors"))`.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import peerd
from peerd.models import CNNConfig, CNNSpec
from peerd.models.base import full_units

TEST_SAMPLES = 300


def task() -> peerd.Task:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:TEST_SAMPLES], order[TEST_SAMPLES:]
    slicing = CNNSpec(CNNConfig(image_size=8, num_classes=10, stage_widths=(16, 32)))
    return peerd.Task(
        name="own-digits",
        model=lambda: slicing.build(full_units(slicing)),
        train=TensorDataset(images[train], labels[train]),
        test=TensorDataset(images[test], labels[test]),
        metric="accuracy", batch_size=32, lr=0.05,
        slicing=slicing,
    )
