"""`peerd.Task`, the public API: a user's model and data, and `--task FILE.py:FUNCTION`.

A task names a model factory, train and test datasets of (input, target) items and a metric.
Its model is sliced automatically (peerd/models/autoslice.py: `slicing=None`, or a `Slicing`
declaring what the graph cannot know), or by a table of its own (`slicing=` a peerd ModelSpec,
as peerd/models/ declares its built-in models; the factory's module must then have exactly the
parameters of the declaration's full-width model). A custom metric and a task-level partition
are refused by name until they are built (issue 22).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from peerd.data import Split, TaskData
    from peerd.models.base import ModelSpec

METRICS = ("accuracy", "perplexity")


class TaskError(ValueError):
    """A task that cannot be loaded or trained; the message names the part at fault."""


@dataclass(frozen=True)
class Slicing:
    """What a model's graph cannot tell peerd's automatic slicing (peerd/models/autoslice.py).
    Module names take fnmatch patterns (`blocks.*.attn`)."""

    whole: tuple[str, ...] = ()  # modules kept entire in every sub-model (still averaged)
    spans: Mapping[str, int] = field(default_factory=dict)  # module -> entries per output unit
    scale_inputs: bool = True  # scale sliced inputs by full/kept (the classifier: its sqrt)
    # module -> a function that sets the widths its forward reads from attributes (e.g. a head
    # count) from its shrunk layers; called on every sub-module matching the pattern
    fit: Mapping[str, Callable[[nn.Module], None]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Task:
    """What peerd trains: built with keywords, returned by the FUNCTION of `--task`."""

    name: str
    model: Callable[[], nn.Module]  # the full model, as the user's own code builds it
    train: Dataset  # items (input, target); a TensorDataset works
    test: Dataset  # the held-out set the global model is scored on
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None  # None: cross-entropy
    metric: str | Callable[[nn.Module, Any], tuple[float, int]] = "accuracy"
    batch_size: int | None = None  # None: peerd's default (TrainConfig)
    local_steps: int | None = None  # cap on a round's local steps; None: one epoch
    lr: float | None = None
    partition: str | Callable[..., Any] | None = None
    # None: derived from the model's graph; a Slicing: derived, with what the graph cannot know;
    # a ModelSpec: the model's own table of unit groups and axes
    slicing: ModelSpec | Slicing | None = None


def is_task_reference(text: str) -> bool:
    """`FILE.py:FUNCTION` or `package.module:FUNCTION`, not a built-in task's name."""
    return ":" in text


def _module_of(location: str, reference: str) -> Any:
    if location.endswith(".py"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise TaskError(f"--task {reference}: no such file: {path}")
        spec = importlib.util.spec_from_file_location(f"peerd_user_task_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise TaskError(f"--task {reference}: no module named {error.name!r}") from None


def load_task(reference: str) -> Task:
    """Call `FUNCTION` of FILE.py or package.module and check that it returned a usable Task."""
    location, _, function_name = reference.rpartition(":")
    if not location or not function_name.isidentifier():
        raise TaskError(f"--task {reference}: give FILE.py:FUNCTION or package.module:FUNCTION")
    module = _module_of(location, reference)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError(f"--task {reference}: {location} has no function {function_name!r}")
    task = function()
    if not isinstance(task, Task):
        raise TaskError(f"--task {reference}: {function_name}() returned "
                        f"{type(task).__name__}, not a peerd.Task")
    check_task(task, reference)
    return task


def check_task(task: Task, where: str) -> None:
    """What this part of the API supports, refused by name otherwise."""
    unsupported = {
        "partition": task.partition is not None,
        "metric": not isinstance(task.metric, str),
    }
    reasons = {
        "partition": "a task-level partition is not supported yet: pass --partition",
        "metric": f"a callable metric is not supported yet: give one of {', '.join(METRICS)}",
    }
    for field_name, refused in unsupported.items():
        if refused:
            raise TaskError(f"task {task.name!r} ({where}): {reasons[field_name]}")
    if task.metric not in METRICS:
        raise TaskError(f"task {task.name!r}: metric {task.metric!r} is not one of "
                        f"{', '.join(METRICS)}")
    wanted_kind = task_kind(task)
    declared = declared_table(task)
    if declared is not None and declared.kind != wanted_kind:
        raise TaskError(f"task {task.name!r}: metric {task.metric!r} needs a slicing declaration "
                        f"of kind {wanted_kind!r}, not {declared.kind!r}")


class TaskLoss:
    """A task's own loss as the engine's training objective: (module, inputs, targets) -> the
    loss of `task.loss(module, (inputs, targets))`."""

    frozen_forwards = 0  # forwards per sample besides the trained module's

    def __init__(self, loss: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        self.loss = loss

    def __call__(self, module: nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        return self.loss(module, (inputs, targets))


def check_loss(task: Task, inputs: torch.Tensor, targets: torch.Tensor) -> TaskLoss | None:
    """The task's own loss once it gives a finite scalar with a gradient on one batch of its
    training items; None for the default (cross-entropy)."""
    import torch

    if task.loss is None:
        return None
    model = task.model()
    model.train()
    where = f"task {task.name!r}: loss(model, batch) on {len(targets)} training items"
    try:
        value = task.loss(model, (inputs, targets))
    except Exception as error:  # the user's code: any failure becomes one line naming it
        raise TaskError(f"{where} failed: {type(error).__name__}: {error}") from None
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TaskError(f"{where} returned {shape}, not a scalar tensor")
    if not value.is_floating_point() or not bool(torch.isfinite(value)):
        raise TaskError(f"{where} returned {value.item()!r}, not a finite number")
    if not value.requires_grad:
        raise TaskError(f"{where} has no gradient: it does not depend on the model's parameters")
    return TaskLoss(task.loss)


def task_kind(task: Task) -> str:
    """Which loss and metric apply: next-token ("text") for perplexity, else classes."""
    return "text" if task.metric == "perplexity" else "image"


def declared_table(task: Task) -> ModelSpec | None:
    """The task's own table of unit groups and axes, or None where peerd derives it."""
    return None if task.slicing is None or isinstance(task.slicing, Slicing) else task.slicing


def task_spec(task: Task, example: torch.Tensor) -> ModelSpec:
    """The task's slicing: its declared table once it fits the factory's module, or the table
    derived from the module's graph (`example`: one input item)."""
    import torch
    from torch import nn

    from peerd.models.autoslice import AutoSpec, SlicingError

    try:
        model = task.model()
    except Exception as error:  # the user's code: any failure becomes one line naming it
        raise TaskError(f"task {task.name!r}: model() failed: {type(error).__name__}: "
                        f"{error}") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: model() returned {type(model).__name__}, not a "
                        f"torch.nn.Module")
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise TaskError(f"task {task.name!r}: model() parameter {name} is not finite")
    spec = declared_table(task)
    if spec is None:
        declaration = task.slicing if isinstance(task.slicing, Slicing) else None
        try:
            return AutoSpec(task.model, example, task_kind(task), declaration)
        except SlicingError as error:
            raise TaskError(f"task {task.name!r}: {error}") from None
    return _check_declared(task, spec, model)


def _check_declared(task: Task, spec: ModelSpec, model: nn.Module) -> ModelSpec:
    from torch import nn

    from peerd.models.base import full_shapes_module, table_tensors

    declared = {name: tuple(p.shape)
                for name, p in table_tensors(spec, full_shapes_module(spec)).items()}
    built = {name: tuple(p.shape) for name, p in table_tensors(spec, model).items()}
    if declared != built:
        differing = sorted(name for name in declared.keys() | built.keys()
                           if declared.get(name) != built.get(name))
        raise TaskError(f"task {task.name!r}: model() and slicing disagree on parameters "
                        f"{', '.join(differing[:5])} (name or shape)")
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                and f"{name}.running_mean" not in spec.axes):
            raise TaskError(f"task {task.name!r}: module {name} ({type(module).__name__}) keeps "
                            f"running statistics that the declared table does not list: add "
                            f"{name}.running_mean and .running_var to its axes, or leave "
                            f"slicing unset to derive the table")
    return spec


def _split(dataset: Dataset, task: Task, which: str) -> Split:
    """Every (input, target) item of `dataset`, stacked into one tensor each."""
    import torch

    from peerd.data import Split

    try:
        items = [dataset[index] for index in range(len(dataset))]  # type: ignore[arg-type]
        inputs = torch.stack([item[0] for item in items])
        targets = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
    except (TypeError, IndexError, RuntimeError) as error:
        raise TaskError(f"task {task.name!r}: {which} items must be (input tensor, target) "
                        f"pairs of one shape: {error}") from None
    if len(items) == 0:
        raise TaskError(f"task {task.name!r}: the {which} dataset is empty")
    return Split(inputs, targets, None)


def task_data(task: Task) -> TaskData:
    """The task's datasets in the shape peerd's data pipeline takes."""
    from peerd.data import TaskData

    train, test = _split(task.train, task, "train"), _split(task.test, task, "test")
    kind = task_kind(task)
    classes = int(max(train.targets.max(), test.targets.max())) + 1
    return TaskData(task.name, kind, train, test, classes, None,
                    train.inputs.shape[1] if kind == "text" else None)
