"""A user's ResNet-style CNN with BatchNorm on images: an image folder (one subfolder per class,
PNG or JPEG) named by the environment variable IMAGE_FOLDER, or Fashion-MNIST (28x28, 10
classes) without it.

Plain torch layers and no slicing declaration: peerd derives the channel groups, residual
additions included, and slices BatchNorm's running statistics with their channels and averages
them like parameters (docs/MODELS.md, Automatic slicing). Run it with

    peerd sim --task examples/resnet_images.py:task --rounds 20 --out runs/resnet
    IMAGE_FOLDER=photos/ peerd sim --task examples/resnet_images.py:task --out runs/photos
    peerd export --from runs/resnet --out resnet.safetensors

`small_task` is the same model at a size CI trains in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import peerd
from peerd.data import load_task_data
from peerd.data.folders import read_image_folder


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], classes: int, channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        for index, width in enumerate(widths):
            stages.append(BasicBlock(widths[max(index - 1, 0)], width, 1 if index == 0 else 2))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _fmnist(train_samples: int | None, test_samples: int) -> tuple[TensorDataset, TensorDataset]:
    fmnist = load_task_data("fmnist")
    train, test = fmnist.train, fmnist.test
    return (TensorDataset(train.inputs[:train_samples], train.targets[:train_samples]),
            TensorDataset(test.inputs[:test_samples], test.targets[:test_samples]))


def _folder(folder: Path, train_samples: int | None) -> tuple[TensorDataset, TensorDataset]:
    """A fifth of the images (a seeded draw) held out for testing; pixels standardised."""
    images, labels, _ = read_image_folder(folder)
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    inputs = (inputs - inputs.mean()) / inputs.std()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    test, train = order[:len(order) // 5], order[len(order) // 5:][:train_samples]
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[test], targets[test])


def task(widths: tuple[int, ...] = (32, 64, 128), train_samples: int | None = None,
         test_samples: int = 2000) -> peerd.Task:
    folder = os.environ.get("IMAGE_FOLDER")
    train, test = (_folder(Path(folder), train_samples) if folder
                   else _fmnist(train_samples, test_samples))
    images, labels = train.tensors
    channels, classes = images.shape[1], int(labels.max()) + 1
    return peerd.Task(name="resnet-images", model=lambda: ResNet(widths, classes, channels),
                      train=train, test=test, batch_size=64, lr=0.05, local_steps=50)


def small_task() -> peerd.Task:
    return task(widths=(8, 16), train_samples=300, test_samples=200)
