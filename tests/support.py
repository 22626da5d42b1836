"""Helpers shared by the test modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peerd
from peerd.models import ModelSpec, Plan


def random_plan(spec: ModelSpec, generator: torch.Generator) -> Plan:
    """A random non-empty subset of every group: sorted unique int64 unit indices."""
    plan: Plan = {}
    for name, group in spec.groups.items():
        size = int(torch.randint(1, group.units + 1, (1,), generator=generator))
        chosen = torch.randperm(group.units, generator=generator)[:size]
        plan[name] = torch.sort(chosen).values.to(torch.int64)
    return plan


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread, as a daemon trains: on a loaded machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_user_accuracy(state_path: Path) -> float:
    """What a user does with an exported digits model: the task's model class, a strict load,
    argmax accuracy over the global test set (digits evaluates all of it)."""
    from peerd.data import load_task_data
    from peerd.models.base import full_units
    from peerd.tasks import get_task

    data = load_task_data("digits")
    spec = get_task("digits").model(data)
    model = spec.build(full_units(spec))
    model.load_state_dict(load_file(str(state_path)), strict=True)
    model.eval()
    with torch.no_grad():
        predictions = model(data.test.inputs).argmax(dim=-1)
    return float((predictions == data.test.targets).sum()) / len(data.test.targets)


def task_user_accuracy(task: peerd.Task, state_path: Path) -> float:
    """What a user does with a model exported from their own peerd.Task: their own model
    factory, a strict load, argmax accuracy over their own test set."""
    model = task.model()
    model.load_state_dict(load_file(str(state_path)), strict=True)
    model.eval()
    inputs, targets = task.test.tensors
    with torch.no_grad():
        return float((model(inputs).argmax(dim=-1) == targets).sum()) / len(targets)


def last_global_acc(run_dir: Path) -> tuple[int, float]:
    """metrics.jsonl's last evaluated round and its global_acc."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if r["global_acc"] is not None]
    return evaluated[-1]["round"], evaluated[-1]["global_acc"]
