"""The tasks peerd trains: which data, which model and which training defaults go together.

The built-in ones by name; a user's `peerd.Task` by reference (`FILE.py:FUNCTION` or
`package.module:FUNCTION`, peerd/task.py), loaded once per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

from peerd.config import ConfigError, TrainConfig
from peerd.data import TaskData, load_task_data
from peerd.models import CNNConfig, CNNSpec, ModelSpec, TransformerConfig, TransformerSpec
from peerd.models.mlp import mlp_spec
from peerd.task import TaskLoss, check_loss, is_task_reference, load_task, task_data, task_spec

BLOCK_SIZE = 64
LARGE_LOCAL_EVAL_SAMPLES = 64


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: Callable[..., ModelSpec]  # (data, early_exits=False)
    train: TrainConfig
    eval_samples: int | None  # global test samples per evaluation (None: all)
    load_data: Callable[..., TaskData]  # (data_dir, label_column="label")
    local_eval_samples: int | None = None  # a peer's own test samples per evaluation (None: all)
    loss: TaskLoss | None = None  # a user's own loss; None: cross-entropy


# The image tasks' CNNs take their size and channels from the data (an image folder may hold
# RGB images of any one size).
def _digits_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return CNNSpec(CNNConfig(image_size=data.image_size or 8, num_classes=data.num_classes,
                             in_channels=data.train.inputs.shape[1], stage_widths=(32, 64),
                             early_exits=early_exits))


def _fmnist_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return CNNSpec(
        CNNConfig(image_size=data.image_size or 28, num_classes=data.num_classes,
                  in_channels=data.train.inputs.shape[1], stage_widths=(16, 32, 64),
                  channels_per_unit=2, early_exits=early_exits)
    )


def _tabular_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    if early_exits:
        raise ConfigError("task 'tabular': --early-exits is not supported (its MLP is sliced "
                          "automatically, without depth)")
    return mlp_spec(data.train.inputs.shape[1], data.num_classes)


def _kjv_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    return TransformerSpec(TransformerConfig(vocab_size=data.num_classes, block_size=BLOCK_SIZE,
                                             early_exits=early_exits))


def _kjv_large_model(data: TaskData, early_exits: bool = False) -> ModelSpec:
    # 104M parameters: GPT-2 small's width (768) and depth (12) with a wider FFN (4096), so
    # that the model passes 100M while its sub-models at mu 0.25 (6.5M) still train on a CPU.
    return TransformerSpec(TransformerConfig(
        vocab_size=data.num_classes, block_size=BLOCK_SIZE, n_layer=12, n_head=12, head_dim=64,
        d_model=768, d_ffn=4096, early_exits=early_exits))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("digits", "scikit-learn's 8x8 digits, ResNet-style CNN", _digits_model,
             TrainConfig(lr=0.05, batch_size=32, local_epochs=4), None,
             partial(load_task_data, "digits")),
        Task("fmnist", "Fashion-MNIST 28x28, ResNet-style CNN", _fmnist_model,
             TrainConfig(lr=0.05, batch_size=64, local_epochs=1, max_local_steps=50), 2000,
             partial(load_task_data, "fmnist")),
        Task("kjv", "King James Bible, character-level transformer LM", _kjv_model,
             TrainConfig(lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=32,
                         max_local_steps=20, grad_clip=1.0), 256,
             partial(load_task_data, "kjv", block_size=BLOCK_SIZE)),
        # A model no small device trains alone (issue 21): small batches and few local steps
        # keep a round at mu 0.25 near a minute on 2 cores, and every local evaluation reads
        # the first LARGE_LOCAL_EVAL_SAMPLES of the peer's test split.
        Task("kjv-large", "King James Bible, 104M-parameter character-level transformer LM",
             _kjv_large_model,
             TrainConfig(lr=0.02, momentum=0.9, weight_decay=0.0, batch_size=8,
                         max_local_steps=8, grad_clip=1.0), 64,
             partial(load_task_data, "kjv", block_size=BLOCK_SIZE), LARGE_LOCAL_EVAL_SAMPLES),
        Task("tabular", "a CSV table (--data-dir, --label-column; default: the digits' 64 "
             "pixel columns), MLP", _tabular_model,
             TrainConfig(lr=0.05, batch_size=32, local_epochs=2), None,
             partial(load_task_data, "tabular")),
    )
}


def get_task(name: str) -> Task:
    """A built-in task by name, or a user's by `FILE.py:FUNCTION` / `package.module:FUNCTION`."""
    if is_task_reference(name):
        return _user_task(name)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


@lru_cache(maxsize=8)
def _user_task(reference: str) -> Task:
    """A user's peerd.Task as peerd trains it: its declaration, data and training defaults."""
    user = load_task(reference)
    data = task_data(user)
    spec = task_spec(user, data.train.inputs[0])
    batch = slice(None, user.batch_size or TrainConfig().batch_size)
    loss = check_loss(user, data.train.inputs[batch], data.train.targets[batch])

    def model(data: TaskData, early_exits: bool = False) -> ModelSpec:
        if early_exits:
            raise ConfigError(f"task {user.name!r}: --early-exits is not supported for a "
                              f"user's task yet")
        return spec

    def load_data(data_dir: str | Path | None, label_column: str = "label") -> TaskData:
        if data_dir is not None:
            raise ConfigError(f"task {user.name!r} brings its own data: drop --data-dir")
        return data

    defaults = TrainConfig()
    train = replace(defaults, lr=user.lr or defaults.lr,
                    batch_size=user.batch_size or defaults.batch_size,
                    max_local_steps=user.local_steps)
    return Task(user.name, f"{reference} ({user.name})", model, train, None, load_data, loss=loss)
