"""Physically smaller sub-models cut from the full parameters by a plan, and written back.

The full parameters live in a flat dict name -> tensor. A plan keeps, per unit group, a sorted
set of unit indices; the slice of a parameter is the product of the kept entries along its
grouped axes. Extraction builds a module with only those entries (so compute, gradients and
optimizer state shrink with the slice) and write-back is its exact inverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from peerd.models.base import (
    ModelSpec,
    Plan,
    UnitGroup,
    holds_param,
    plan_units,
    table_tensors,
)

Params = dict[str, torch.Tensor]


def init_params(spec: ModelSpec, seed: int) -> Params:
    """The full model's initial parameters (and tabled buffers): every peer of a cluster
    derives the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        module = spec.build({name: group.units for name, group in spec.groups.items()})
    # The module's own storage, not a copy: a second full set, even a passing one, is what a
    # device short of memory cannot afford (invariant 9).
    return {name: p.detach() for name, p in table_tensors(spec, module).items()}


def param_bytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def clone_params(params: Params) -> Params:
    return {name: tensor.clone() for name, tensor in params.items()}


def copy_into(params: Params, values: Params) -> None:
    """`values` into `params`, in place."""
    for name, tensor in params.items():
        tensor.copy_(values[name])


def entry_indices(group: UnitGroup, units: torch.Tensor) -> torch.Tensor:
    """Entry positions along an axis for the given units (a unit spans `group.span` entries)."""
    if group.span == 1:
        return units
    return (units[:, None] * group.span + torch.arange(group.span)).reshape(-1)


def axis_indices(spec: ModelSpec, plan: Plan, name: str) -> list[torch.Tensor | None]:
    """Per axis of parameter `name`: the kept entry positions, or None for an unsliced axis."""
    return [
        None if group is None else entry_indices(spec.groups[group], plan[group])
        for group in spec.axes[name]
    ]


def slice_tensor(tensor: torch.Tensor, indices: list[torch.Tensor | None]) -> torch.Tensor:
    for axis, kept in enumerate(indices):
        if kept is not None:
            tensor = tensor.index_select(axis, kept)
    return tensor


def _open_mesh(shape: torch.Size, indices: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """Broadcastable index tensors selecting the product of per-axis positions."""
    mesh = []
    for axis, kept in enumerate(indices):
        positions = torch.arange(shape[axis]) if kept is None else kept
        view = [1] * len(shape)
        view[axis] = -1
        mesh.append(positions.view(view))
    return tuple(mesh)


def slice_params(spec: ModelSpec, params: Params, plan: Plan) -> Params:
    """The plan's slice of every parameter it holds (blocks beyond its depth are left out)."""
    return {name: slice_tensor(params[name], axis_indices(spec, plan, name))
            for name in spec.axes if holds_param(spec, plan, name)}


def extract(spec: ModelSpec, params: Params, plan: Plan) -> nn.Module:
    """A module holding exactly the plan's slice of `params` (copies, safe to train)."""
    return build_from_slice(spec, plan, slice_params(spec, params, plan))


def build_from_slice(spec: ModelSpec, plan: Plan, sliced: Params) -> nn.Module:
    """A module of the plan's widths holding `sliced` (a `slice_params` of the plan, or the
    same values pulled from elsewhere: sharded parameters)."""
    module = spec.build(plan_units(plan))
    with torch.no_grad():
        for name, parameter in table_tensors(spec, module).items():
            parameter.copy_(sliced[name])
    return module


def write_back(spec: ModelSpec, params: Params, plan: Plan, module: nn.Module) -> None:
    """Store the module's parameters into their places in the full parameters, in place."""
    with torch.no_grad():
        for name, parameter in table_tensors(spec, module).items():
            target = params[name]
            target[_open_mesh(target.shape, axis_indices(spec, plan, name))] = parameter.detach()


def slice_numel(spec: ModelSpec, params: Params, plan: Plan) -> dict[str, int]:
    """How many entries `slice_params` takes of each parameter, without taking them."""
    counts = {}
    for name in spec.axes:
        if holds_param(spec, plan, name):
            counts[name] = math.prod(
                size if kept is None else len(kept)
                for size, kept in zip(params[name].shape, axis_indices(spec, plan, name),
                                      strict=True))
    return counts


def with_slice(spec: ModelSpec, params: Params, plan: Plan, sliced: Params,
               name: str) -> torch.Tensor:
    """Parameter `name` as `params` holds it now, with the plan's entries taken from `sliced`
    (a `slice_params` of the same plan): one tensor's copy."""
    tensor = params[name].clone()
    if name in sliced:
        tensor[_open_mesh(tensor.shape, axis_indices(spec, plan, name))] = sliced[name]
    return tensor


def freeze_shallowest(spec: ModelSpec, module: nn.Module, blocks: int) -> None:
    """Stop training the first `blocks` blocks, their exits and what lies below them (stem,
    embeddings): no gradients and so no optimizer state, and since nothing below the first
    trained block needs a gradient, autograd saves no activations there either. Their values
    still change in merge, like any held entry."""
    for name, parameter in module.named_parameters():
        if spec.param_blocks.get(name, -1) < blocks:
            parameter.requires_grad_(False)


def axis_masks(spec: ModelSpec, plan: Plan, name: str) -> list[torch.Tensor | None]:
    """Per axis: a boolean vector of kept entries, or None for an unsliced axis."""
    masks: list[torch.Tensor | None] = []
    for group_name, kept in zip(spec.axes[name], axis_indices(spec, plan, name), strict=True):
        if group_name is None or kept is None:
            masks.append(None)
            continue
        mask = torch.zeros(spec.groups[group_name].entries, dtype=torch.bool)
        mask[kept] = True
        masks.append(mask)
    return masks


def entry_mask(spec: ModelSpec, plan: Plan, name: str, shape: torch.Size) -> torch.Tensor:
    """Boolean tensor of the full parameter's shape: True where the plan holds the entry.

    An outer product of the per-axis masks, broadcast to `shape` (a view where it can be:
    materialise it before writing to it); all False in a block beyond the plan's depth."""
    if not holds_param(spec, plan, name):
        return torch.zeros(shape, dtype=torch.bool)
    mask: torch.Tensor | None = None
    for axis, axis_mask in enumerate(axis_masks(spec, plan, name)):
        if axis_mask is not None:
            view = [1] * len(shape)
            view[axis] = -1
            mask = axis_mask.view(view) if mask is None else mask & axis_mask.view(view)
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return mask.expand(shape)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_forward(module: nn.Module) -> Callable[[torch.Tensor], object]:
    """The forward pass local training runs: through every kept exit with early exits."""
    return module.forward_exits if getattr(module, "early_exits", False) else module


def forward_flops_per_sample(spec: ModelSpec, units: Mapping[str, int]) -> int:
    """Forward FLOPs for one sample, counted from the ops a module of these widths (and depth)
    executes; with early exits, the training forward pass through every kept exit."""
    return _forward_flops(spec, tuple(sorted(units.items())))


@lru_cache(maxsize=4096)
def _forward_flops(spec: ModelSpec, units: tuple[tuple[str, int], ...]) -> int:
    module = spec.build(dict(units))
    counter = FlopCounterMode(display=False)
    # The fused CPU attention kernel has no FLOP formula; the math backend's matmuls do.
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        training_forward(module)(spec.example_input(1))
    return int(counter.get_total_flops())
