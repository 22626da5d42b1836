"""The contract every sliceable model keeps: one table of unit groups and parameter axes.

A *unit group* is a dimension that can be sliced (channels, features, heads). A unit may span
several consecutive entries along an axis (an attention head spans `head_dim` rows). Every
parameter names, per axis, the group that slices it or None for an axis that is never sliced
(input pixels, classes, vocabulary). Tensors that must share indices (a residual stream and the
norms on it) name the same group, which is how tying is declared.

Depth (models built with early exits): the group DEPTH counts the model's blocks, and a plan
keeps a prefix of them (the shallowest). No tensor has a depth axis: instead the spec maps every
parameter that lives in block k (its layers and its exit head) to k, and a group used only from
block k on names k as its `block`. A plan holds a parameter only if it keeps that block.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

# group name -> sorted int64 tensor of unit indices kept in that group
Plan = dict[str, torch.Tensor]

# The group of a model's blocks; a plan keeps blocks 0..d-1 (a peer of depth d).
DEPTH = "depth"


@dataclass(frozen=True)
class UnitGroup:
    name: str
    units: int
    span: int = 1  # entries per unit along a sliced axis
    block: int | None = None  # the shallowest block using this group; None: used at any depth

    @property
    def entries(self) -> int:
        return self.units * self.span


class ModelSpec(Protocol):
    """What the slicing machinery needs from a model family."""

    kind: str  # "image" or "text": which task loss and metrics apply

    @property
    def groups(self) -> Mapping[str, UnitGroup]: ...

    @property
    def axes(self) -> Mapping[str, tuple[str | None, ...]]: ...

    @property
    def param_blocks(self) -> Mapping[str, int]:
        """Parameter name -> the block it lives in (its exit head included); parameters not
        listed (stem, embeddings) are held at every depth."""
        ...

    def build(self, units: Mapping[str, int]) -> nn.Module:
        """A module with `units[g]` units in every group g (the full model for full counts)."""
        ...

    def example_input(self, batch: int) -> torch.Tensor: ...


def full_units(spec: ModelSpec) -> dict[str, int]:
    return {name: group.units for name, group in spec.groups.items()}


def full_plan(spec: ModelSpec) -> Plan:
    return {name: torch.arange(group.units) for name, group in spec.groups.items()}


def same_plan(first: Plan, second: Plan) -> bool:
    """Do two plans keep the same units of the same groups?"""
    return first.keys() == second.keys() and all(
        torch.equal(units, second[group]) for group, units in first.items())


def plan_units(plan: Plan) -> dict[str, int]:
    return {name: int(indices.numel()) for name, indices in plan.items()}


def plan_depth(plan: Plan) -> int | None:
    """How many blocks the plan keeps; None for a model without early exits."""
    return int(plan[DEPTH].numel()) if DEPTH in plan else None


def holds_param(spec: ModelSpec, plan: Plan, name: str) -> bool:
    """Whether the plan keeps the block parameter `name` lives in (then it holds its slice)."""
    block = spec.param_blocks.get(name)
    depth = plan_depth(plan)
    return block is None or depth is None or block < depth


def table_tensors(spec: ModelSpec, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors peerd slices, trains or averages: every parameter, and the buffers the table
    lists (BatchNorm running statistics, averaged with their channels like parameters)."""
    tensors = dict(module.named_parameters())
    tensors.update((name, buffer) for name, buffer in module.named_buffers()
                   if name in spec.axes)
    return tensors


# What each part of a model fingerprint digests, in order: a mismatch names the parts that differ.
FINGERPRINT_PARTS = ("model family", "parameter names", "parameter shapes",
                     "unit groups and axes")


def full_shapes_module(spec: ModelSpec) -> nn.Module:
    """The full module built on the meta device: its names, shapes and types, no values. A
    full model's worth of memory built after `--mu auto` measured what the daemon holds stayed
    resident beside training (BENCHMARKS.md, "mu auto under a kernel limit")."""
    with torch.device("meta"):
        return spec.build(full_units(spec))


def fingerprint(spec: ModelSpec) -> str:
    """A short digest of the architecture: peers may only exchange slices of the same model.
    Four digests joined by '-', one per FINGERPRINT_PARTS entry."""
    tensors = table_tensors(spec, full_shapes_module(spec))
    parts = (
        {"class": type(spec).__name__, "kind": spec.kind},
        sorted(tensors),
        {name: list(tensor.shape) for name, tensor in sorted(tensors.items())},
        {"groups": {name: [g.units, g.span] for name, g in sorted(spec.groups.items())},
         "axes": {name: list(axes) for name, axes in sorted(spec.axes.items())}},
    )
    return "-".join(hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:4]
                    for part in parts)


def check_table(spec: ModelSpec) -> None:
    """The axis table must describe the full module exactly: same names, matching sizes."""
    module = spec.build(full_units(spec))
    params = table_tensors(spec, module)
    if set(params) != set(spec.axes):
        missing = sorted(set(params) - set(spec.axes))
        extra = sorted(set(spec.axes) - set(params))
        raise ValueError(f"axis table mismatch: untabled {missing}, unknown {extra}")
    for name, tensor in params.items():
        axes = spec.axes[name]
        if len(axes) != tensor.dim():
            raise ValueError(f"{name}: {len(axes)} axes tabled for a {tensor.dim()}-d tensor")
        for size, group_name in zip(tensor.shape, axes, strict=True):
            if group_name is not None and spec.groups[group_name].entries != size:
                raise ValueError(f"{name}: group {group_name} does not match size {size}")
