"""The built-in tasks: which data, which model and which training defaults go together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peerd.config import TrainConfig
from peerd.data import TaskData
from peerd.models import CNNConfig, CNNSpec, ModelSpec, TransformerConfig, TransformerSpec

BLOCK_SIZE = 64


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: Callable[..., ModelSpec]  # (data, early_exits=False)
    train: TrainConfig
    eval_samples: int | None  # global test samples per evaluation (None: all)


def _digits_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return CNNSpec(CNNConfig(image_size=8, num_classes=data.num_classes, stage_widths=(32, 64),
                             early_exits=early_exits))


def _fmnist_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return CNNSpec(
        CNNConfig(image_size=28, num_classes=data.num_classes, stage_widths=(16, 32, 64),
                  channels_per_unit=2, early_exits=early_exits)
    )


def _kjv_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return TransformerSpec(TransformerConfig(vocab_size=data.num_classes, block_size=BLOCK_SIZE,
                                             early_exits=early_exits))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("digits", "scikit-learn's 8x8 digits, ResNet-style CNN", _digits_model,
             TrainConfig(lr=0.05, batch_size=32, local_epochs=4), None),
        Task("fmnist", "Fashion-MNIST 28x28, ResNet-style CNN", _fmnist_model,
             TrainConfig(lr=0.05, batch_size=64, local_epochs=1, max_local_steps=50), 2000),
        Task("kjv", "King James Bible, character-level transformer LM", _kjv_model,
             TrainConfig(lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=32,
                         max_local_steps=20, grad_clip=1.0), 256),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
