"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest
import torch

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
