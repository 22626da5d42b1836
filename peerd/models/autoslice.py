"""Automatic slicing: the unit groups and parameter axes of a model of ordinary torch layers,
derived from its graph, and physically smaller sub-modules built from them.

Torch-Pruning's DependencyGraph traces one forward pass through autograd and finds, for every
layer's output channels, every tensor axis that must keep the same indices: the next layer's
input, the norms on the way, both sides of a residual addition, a tied LM head. Each such
coupled set becomes one unit group; each parameter (and each BatchNorm running statistic) names,
per axis, the group that slices it. A group is sliced only if some layer reads it as input: an
output that nothing inside the model consumes (the classes, the vocabulary) is never cut.

What the graph cannot know is declared (`Slicing`): how many entries make one unit along a
layer's outputs (an attention head spans head_dim rows: `spans`), and which modules stay whole
(kept entire in every sub-model and still averaged: `whole`). GroupNorm's own norm groups give
their channels' span without a declaration. The width-dependent input scaling peerd's own
layers apply (peerd/models/layers.py) is added to a sub-module as a forward pre-hook on every
Linear and Conv whose inputs are sliced (`scale_inputs`), so the user's full model is unchanged.

A module peerd cannot slice safely stops the derivation with its name and the reason; a
sub-model at half width that fails to run names the module where it failed (typically a forward
that reads a width from an attribute).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from peerd.models.base import UnitGroup
from peerd.models.layers import head_scale, input_scale
from peerd.task import Slicing

SLICEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
             nn.LayerNorm, nn.Embedding)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_OUT_AXES_NORM = ("weight", "bias", "running_mean", "running_var")
# Tensor name -> the axis that holds a module's output channels, and its input channels.
_OUT_AXES: dict[type, dict[str, int]] = {
    nn.Linear: {"weight": 0, "bias": 0},
    nn.Conv1d: {"weight": 0, "bias": 0},
    nn.Conv2d: {"weight": 0, "bias": 0},
    nn.modules.batchnorm._BatchNorm: {"weight": 0, "bias": 0, "running_mean": 0,
                                      "running_var": 0},
    nn.GroupNorm: {"weight": 0, "bias": 0},
    nn.LayerNorm: {"weight": 0, "bias": 0},
    nn.Embedding: {"weight": 1},
}
_IN_AXES: dict[type, dict[str, int]] = {
    nn.Linear: {"weight": 1}, nn.Conv1d: {"weight": 1}, nn.Conv2d: {"weight": 1},
}


class SlicingError(ValueError):
    """A model peerd cannot slice as declared; the message names the module and the reason."""


def _axes_of(module: nn.Module, table: dict[type, dict[str, int]]) -> dict[str, int]:
    for layer_type, axes in table.items():
        if isinstance(module, layer_type):
            return axes
    return {}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def unsliceable_reason(module: nn.Module) -> str | None:
    """Why peerd cannot slice this module by itself, or None if it can."""
    if isinstance(module, nn.MultiheadAttention):
        return ("nn.MultiheadAttention packs q, k and v in one in_proj_weight, which no single "
                "unit group can slice; write attention with separate q, k, v Linear layers, or "
                "mark it whole")
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups != 1:
        return f"a grouped convolution (groups={module.groups}) couples its input and output "\
               "channels in blocks peerd does not slice; mark it whole"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return "a LayerNorm over more than the last axis; mark it whole"
    if isinstance(module, SLICEABLE):
        return None
    own = [name for name, _ in module.named_parameters(recurse=False)]
    own += [name for name, buffer in module.named_buffers(recurse=False)
            if buffer.is_floating_point()]
    if own:
        return (f"a {type(module).__name__} with tensors of its own ({', '.join(own)}): peerd "
                f"cannot know how its forward uses them; declare the model's table "
                f"(slicing=ModelSpec) or mark it whole")
    return None


class AutoSpec:
    """A ModelSpec derived from a model factory and one example input."""

    param_blocks: Mapping[str, int] = {}  # no early exits: every tensor is held at every depth

    def __init__(self, factory: Callable[[], nn.Module], example: torch.Tensor, kind: str,
                 declaration: Slicing | None = None) -> None:
        self.factory = factory
        self.example = example  # one input item, without the batch axis
        self.kind = kind
        self.declaration = declaration or Slicing()
        self._derive()

    @property
    def groups(self) -> Mapping[str, UnitGroup]:
        return self._groups

    @property
    def axes(self) -> Mapping[str, tuple[str | None, ...]]:
        return self._axes

    def example_input(self, batch: int) -> torch.Tensor:
        return self.example.unsqueeze(0).expand(batch, *self.example.shape).contiguous()

    # -- derivation --------------------------------------------------------------------------

    def _derive(self) -> None:
        import torch_pruning as tp

        model = self.factory()
        model.eval()
        names: dict[object, str] = {module: name for name, module in model.named_modules()}
        # A bare nn.Parameter in the graph (TP's "unwrapped" parameter) belongs to its module.
        for module_name, module in model.named_modules():
            for parameter in module.parameters(recurse=False):
                names.setdefault(parameter, module_name)
        whole = {name for name in names.values() if _matches(name, self.declaration.whole)}
        for name, module in model.named_modules():
            reason = unsliceable_reason(module)
            if reason and not _is_whole(name, whole):
                raise SlicingError(f"module {name or '(the model)'} cannot be sliced: {reason}")
        first_name: dict[int, str] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            other = first_name.setdefault(id(parameter), name)
            if other != name:
                raise SlicingError(f"parameters {other} and {name} are one tensor (tied "
                                   f"weights), which peerd does not slice yet: use the tensor "
                                   f"through the functional form, e.g. F.linear(x, {other})")
        try:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=self.example_input(1), verbose=False)
        except Exception as error:  # the user's forward: any failure is named in one line
            raise SlicingError(f"the model's forward fails on one training input of shape "
                               f"{tuple(self.example_input(1).shape)}: {type(error).__name__}: "
                               f"{error}") from None
        tensors = dict(model.named_parameters()) | {
            name: buffer for name, buffer in model.named_buffers() if buffer.is_floating_point()}
        axes: dict[str, list[str | None]] = {name: [None] * t.dim() for name, t in tensors.items()}
        groups: dict[str, UnitGroup] = {}
        self._bare_norms: dict[str, str] = {}  # norm module without tensors -> its group
        order = {name: index for index, (name, _) in enumerate(model.named_modules())}
        for group in graph.get_all_groups(root_module_types=(nn.Linear, nn.Conv1d, nn.Conv2d,
                                                              nn.Embedding)):
            members = self._group_members(graph, group, names, tensors)
            if members is None:
                continue
            root_name, entries, places, spans, touched, problem = members
            if any(_is_whole(module_name, whole) for module_name in touched):
                continue
            if problem is not None:
                raise SlicingError(problem)
            span = self._span(root_name, entries, spans)
            # Named after its first module in the model's order (the stem, the embedding).
            group_name = min((module_name for module_name, _ in places), key=order.__getitem__)
            groups[group_name] = UnitGroup(group_name, entries // span, span)
            for module_name, place in places:
                if place is None:
                    self._bare_norms[module_name] = group_name
                else:
                    axes[place[0]][place[1]] = group_name
        self._groups = dict(sorted(groups.items(), key=lambda item: order[item[0]]))
        self._axes = {name: tuple(table) for name, table in axes.items()}
        self._check_half_width(model)

    def _group_members(
        self, graph: Any, group: Any, names: Mapping[object, str],
        tensors: Mapping[str, torch.Tensor],
    ) -> tuple[str, int, list[tuple[str, tuple[str, int] | None]], dict[str, int], set[str],
               str | None] | None:
        """(root module, entries, [(module, (tensor, axis) or None for a norm without tensors)],
        spans, every module touched, why
        it cannot be sliced or None) of one coupled set, or None when nothing inside the model
        reads it (an output: classes, vocabulary)."""
        places: list[tuple[str, tuple[str, int] | None]] = []
        problem: str | None = None
        touched: set[str] = set()
        spans: dict[str, int] = {}
        read_inside = False
        root_name = None
        entries = None
        for dep, indices in group:
            module = dep.target.module
            if module not in names:
                continue
            module_name = names[module]
            touched.add(module_name)
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            if root_name is None:
                root_name, entries = module_name, len(indices)
            table = _OUT_AXES if is_out else _IN_AXES
            if not is_out and isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                read_inside = True
            if isinstance(module, NORMS) and not any(
                    f"{module_name}.{tensor_name}" in tensors for tensor_name in _OUT_AXES_NORM):
                places.append((module_name, None))  # no tensors: only its width follows
            for tensor_name, axis in _axes_of(module, table).items():
                full_name = f"{module_name}.{tensor_name}" if module_name else tensor_name
                if full_name not in tensors:
                    continue
                if tensors[full_name].shape[axis] != len(indices):
                    problem = (f"module {module_name} cannot be sliced: {tensor_name} axis "
                               f"{axis} has {tensors[full_name].shape[axis]} entries but only "
                               f"{len(indices)} are coupled to {root_name} (a concatenation or "
                               f"split of several widths); mark it whole")
                    continue
                places.append((module_name, (full_name, axis)))
            if isinstance(module, nn.GroupNorm):
                spans[module_name] = module.num_channels // module.num_groups
            if is_out:
                for pattern, span in self.declaration.spans.items():
                    if fnmatch.fnmatchcase(module_name, pattern):
                        spans[module_name] = span
        if root_name is None or entries is None or not read_inside:
            return None
        return root_name, entries, places, spans, touched, problem

    def _span(self, root_name: str, entries: int, spans: Mapping[str, int]) -> int:
        """Entries per unit: one value over the set (GroupNorm groups, declared spans)."""
        values = set(spans.values())
        if len(values) > 1:
            raise SlicingError(f"the units of {root_name}'s outputs have conflicting spans "
                               f"{dict(sorted(spans.items()))}; declare one in Slicing(spans=)")
        span = values.pop() if values else 1
        if span < 1 or entries % span:
            raise SlicingError(f"{root_name}: {entries} output entries are not a multiple of "
                               f"the span {span}")
        return span

    def _check_half_width(self, full: nn.Module) -> None:
        """Build and run a sub-model at half of every group: a forward that fails, or an output
        whose shape changes, names the module (widths read from attributes break here)."""
        half = {name: max(1, group.units // 2) for name, group in self.groups.items()}
        if not self.groups:
            raise SlicingError("no layer of the model can be sliced (no Linear or Conv output "
                               "is read inside the model)")
        sub = self.build(half)
        sub.eval()
        running: list[str] = []  # the modules whose forward has begun and not returned
        hooks = []
        for name, module in sub.named_modules():
            if name:
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, _i, name=name: running.append(name)))
                hooks.append(module.register_forward_hook(lambda *_: running.pop() and None))
        example = self.example_input(2)
        try:
            with torch.no_grad():
                expected = full(example)
                got = sub(example)
        except Exception as error:  # the user's forward: any failure is named in one line
            where = running[-1] if running else "(the model)"
            raise SlicingError(f"module {where} fails at half width ({error}); it probably "
                               f"reads a width from an attribute: declare how it fits "
                               f"(Slicing(fit=)) or mark it whole") from None
        finally:
            for hook in hooks:
                hook.remove()
        if isinstance(expected, torch.Tensor) and got.shape != expected.shape:
            raise SlicingError(f"the model's output changes shape at half width "
                               f"({tuple(expected.shape)} -> {tuple(got.shape)}): an output "
                               f"axis is coupled to a sliced group; mark its layer whole")

    # -- building ------------------------------------------------------------------------------

    @cached_property
    def _full_units(self) -> dict[str, int]:
        return {name: group.units for name, group in self.groups.items()}

    def build(self, units: Mapping[str, int]) -> nn.Module:
        """The user's module with `units[g]` units in every group g: tensors and the widths
        layers keep as attributes are shrunk in place (values are the caller's to fill)."""
        model = self.factory()
        if all(units[name] == full for name, full in self._full_units.items()):
            return model
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            changed = False
            for collection in (module._parameters, module._buffers):
                for tensor_name, tensor in collection.items():
                    axes = self._axes.get(prefix + tensor_name)
                    if tensor is None or axes is None or all(a is None for a in axes):
                        continue
                    shape = [size if group is None else units[group] * self.groups[group].span
                             for size, group in zip(tensor.shape, axes, strict=True)]
                    smaller = torch.empty(shape, dtype=tensor.dtype)
                    collection[tensor_name] = (nn.Parameter(smaller, tensor.requires_grad)
                                               if isinstance(tensor, nn.Parameter) else smaller)
                    changed = True
            if module_name in self._bare_norms:
                group = self.groups[self._bare_norms[module_name]]
                _fit_norm(module, units[group.name] * group.span)
            if changed:
                _fit_attributes(module)
                if self.declaration.scale_inputs:
                    self._scale_inputs(module, prefix, units)
        for module_name, module in model.named_modules():
            for pattern, fit in self.declaration.fit.items():
                if fnmatch.fnmatchcase(module_name, pattern):
                    fit(module)
        return model

    def _scale_inputs(self, module: nn.Module, prefix: str, units: Mapping[str, int]) -> None:
        """Keep activations at the full model's magnitude (peerd/models/layers.py): a layer's
        sliced inputs times full/kept; a layer whose outputs are not sliced (the classifier)
        times sqrt(full/kept)."""
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            return
        weight_axes = self._axes[prefix + "weight"]
        group = weight_axes[1]
        if group is None or units[group] == self.groups[group].units:
            return
        full, kept = self.groups[group].units, units[group]
        scale = (input_scale(full, kept) if weight_axes[0] is not None
                 else head_scale(full, kept))
        module.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * scale, *inputs[1:]))


def _is_whole(module_name: str, whole: set[str]) -> bool:
    return any(module_name == name or module_name.startswith(name + ".") for name in whole)


def _fit_attributes(module: nn.Module) -> None:
    """The widths a layer keeps as attributes, made to match its (shrunk) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv1d | nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[:2]
    elif isinstance(module, NORMS):
        tensor = module.weight if module.weight is not None else module.running_mean
        _fit_norm(module, tensor.shape[0])
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def _fit_norm(module: nn.Module, width: int) -> None:
    """A norm's width attributes for `width` channels (GroupNorm keeps its channels per group)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = width
    elif isinstance(module, nn.GroupNorm):
        span = module.num_channels // module.num_groups
        module.num_channels, module.num_groups = width, width // span
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (width,)
