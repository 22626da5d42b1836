"""Data-aware width (Co-S2P): how many units of each group a peer keeps, learned on its data.

A peer with width ratio mu can afford the forward FLOPs of its uniform sub-model (ceil(mu * K)
units in every group). Instead of spending that budget uniformly, it scores every unit on its
own training data: a sigmoid gate per unit scales the unit's activation wherever a layer reads
it (the input axis of every weight that consumes the group; sampled, see _GateSample), and
only the gates train. The
weights stay frozen, so there are no weight gradients and no optimizer state for them; the
memory that scoring needs is the full-width forward's activations at one batch.

The loss is the task loss plus `penalty * relu(E / B - 1)`: E is the gated model's expected
forward FLOPs (each weight's FLOPs times the mean gate of every group on its axes), B the same
sum at the uniform widths. A unit the task does not need feels only the penalty and sinks.

From the scores, per-group widths follow by one threshold over all units: a group keeps its
units scored at or above it (at least one). The threshold is the lowest whose widths fit the
exact FLOPs budget (forward_flops_per_sample of the uniform sub-model), so the widths are a
non-uniform split of the same budget. They travel as the peer's capacity (Member.widths); the
planners take them instead of ceil(mu * K) and msfusion still shifts the windows over them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from peerd.algorithm.engine import model_loss
from peerd.algorithm.plan import Member, MSFusionPlanner, Widths, width_groups
from peerd.algorithm.submodel import (
    Params,
    forward_flops_per_sample,
    slice_params,
    training_forward,
)
from peerd.config import TrainConfig, check_width_options
from peerd.data import Split
from peerd.models.base import DEPTH, ModelSpec, plan_units


@dataclass(frozen=True)
class WidthConfig:
    """How a peer scores its units: epochs over its shard, the budget penalty's weight, and the
    gate optimizer (Adam on the gate logits)."""

    epochs: int = 10
    penalty: float = 0.1
    lr: float = 0.1
    batch_size: int = 32
    initial_logit: float = 2.0  # every gate starts at sigmoid(2) = 0.88: nearly all kept

    def __post_init__(self) -> None:
        check_width_options(self.epochs, self.penalty)


class _GateSample:
    """One relaxed-Bernoulli sample of every unit's gate per training step (a binary concrete
    with keep probability sigmoid(logit), temperature 2/3 as in L0 regularisation), shared by
    every weight that reads the group. Sampled gates, unlike a plain multiplier, cannot be
    scaled away by a norm that follows: dropping a unit the task needs costs loss."""

    temperature = 2 / 3

    def __init__(self, logits: Mapping[str, nn.Parameter]) -> None:
        self.logits = logits
        # Until the first draw (registering a parametrization runs it once): keep probabilities.
        self.values = {name: torch.sigmoid(value.detach()) for name, value in logits.items()}

    def draw(self, generator: torch.Generator) -> None:
        self.values = {}
        for name, logits in self.logits.items():
            noise = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
            self.values[name] = torch.sigmoid(
                (logits + noise.log() - (-noise).log1p()) / self.temperature)


class _UnitGates(nn.Module):
    """Parametrization of one weight: scale its entries along each gated input axis by the
    sampled gate of the unit they read (a unit spans `span` entries)."""

    def __init__(self, sample: _GateSample, gated: list[tuple[int, str, int]]) -> None:
        super().__init__()
        self.sample = sample
        self.gated = gated  # (axis, group, span)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for axis, group, span in self.gated:
            shape = [1] * weight.dim()
            shape[axis] = -1
            weight = weight * self.sample.values[group].repeat_interleave(span).view(shape)
        return weight


def _uniform_units(spec: ModelSpec, mu: float, depth: int | None) -> dict[str, int]:
    plan = MSFusionPlanner(seed=0).plan(0, [Member("uniform", mu, depth)], spec.groups)
    return plan_units(plan["uniform"])


def flops_budget(spec: ModelSpec, mu: float, depth: int | None = None) -> int:
    """Forward FLOPs per sample of the uniform mu sub-model (at `depth` blocks)."""
    return forward_flops_per_sample(spec, _uniform_units(spec, mu, depth))


def widths_flops(spec: ModelSpec, widths: Widths, depth: int | None = None) -> int:
    """Exact forward FLOPs per sample of a sub-model with these widths (at `depth` blocks)."""
    units = dict(widths)
    if DEPTH in spec.groups:
        units[DEPTH] = spec.groups[DEPTH].units if depth is None else depth
    return forward_flops_per_sample(spec, units)


def _weight_flops(module: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs per sample of every linear and convolution weight, by parameter name
    (2 x weight entries x output positions)."""
    flops: dict[str, int] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            def count(layer: nn.Module, _: object, out: torch.Tensor, name: str = name) -> None:
                positions = out.numel() // (out.shape[0] * out.shape[-1 if isinstance(
                    layer, nn.Linear) else 1])
                flops[f"{name}.weight"] = flops.get(f"{name}.weight", 0) + (
                    2 * layer.weight.numel() * positions)
            hooks.append(layer.register_forward_hook(count))
    with torch.no_grad():
        training_forward(module)(example)
    for hook in hooks:
        hook.remove()
    return flops


@dataclass
class _GatedModel:
    module: nn.Module
    logits: dict[str, nn.Parameter]  # group -> one logit per unit
    sample: _GateSample
    costs: list[tuple[int, list[str]]]  # (FLOPs of a weight, the groups on its axes)

    def expected_flops(self) -> torch.Tensor:
        means = {name: torch.sigmoid(logits).mean() for name, logits in self.logits.items()}
        total = torch.zeros(())
        for flops, groups in self.costs:
            term = torch.tensor(float(flops))
            for group in groups:
                term = term * means[group]
            total = total + term
        return total

    def uniform_flops(self, spec: ModelSpec, mu: float, depth: int | None) -> float:
        kept = _uniform_units(spec, mu, depth)
        return float(sum(flops * math.prod(kept[g] / spec.groups[g].units for g in groups)
                         for flops, groups in self.costs))


def _gated_model(spec: ModelSpec, params: Params, depth: int | None,
                 initial_logit: float) -> _GatedModel:
    """The full-width model (at `depth` blocks) with frozen weights and a gate per unit."""
    units = {name: group.units for name, group in spec.groups.items()}
    plan = {name: torch.arange(count) for name, count in units.items()}
    if depth is not None:
        units[DEPTH] = depth
        plan[DEPTH] = torch.arange(depth)
    module = spec.build(units)
    held = slice_params(spec, params, plan)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(held[name])
            parameter.requires_grad_(False)
    weight_flops = _weight_flops(module, spec.example_input(1))
    logits = {group.name: nn.Parameter(torch.full((group.units,), initial_logit))
              for group in width_groups(spec.groups)}
    costs = [(flops, [g for g in spec.axes[name] if g is not None])
             for name, flops in weight_flops.items() if name in spec.axes]
    sample = _GateSample(logits)
    for name in list(dict(module.named_parameters())):
        gated = [(axis, group, spec.groups[group].span)
                 for axis, group in enumerate(spec.axes[name]) if axis >= 1 and group is not None]
        if gated:
            owner, _, leaf = name.rpartition(".")
            parametrize.register_parametrization(module.get_submodule(owner), leaf,
                                                 _UnitGates(sample, gated))
    return _GatedModel(module, logits, sample, costs)


def unit_scores(spec: ModelSpec, params: Params, data: Split, train: TrainConfig, mu: float,
                depth: int | None = None, config: WidthConfig | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep-score in (0, 1) of every unit of every sliceable group, learned on `data` with the
    weights frozen under the FLOPs budget penalty of the uniform mu sub-model; an epoch takes
    at most train.max_local_steps batches."""
    config = config if config is not None else WidthConfig()
    gated = _gated_model(spec, params, depth, config.initial_logit)
    budget = gated.uniform_flops(spec, mu, depth)
    optimizer = torch.optim.Adam(list(gated.logits.values()), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    gated.module.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        # An epoch is capped like a round of local training (max_local_steps, large shards).
        starts = range(0, len(order), config.batch_size)[:train.max_local_steps]
        for start in starts:
            batch = order[start:start + config.batch_size]
            gated.sample.draw(generator)
            loss = model_loss(spec.kind, train, gated.module, data.inputs[batch],
                              data.targets[batch])
            loss = loss + config.penalty * torch.relu(gated.expected_flops() / budget - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {name: torch.sigmoid(logits.detach()) for name, logits in gated.logits.items()}


def _widths_at(spec: ModelSpec, scores: Mapping[str, torch.Tensor], threshold: float) -> Widths:
    return tuple((group.name, max(1, int((scores[group.name] >= threshold).sum())))
                 for group in width_groups(spec.groups))


def derive_widths(spec: ModelSpec, scores: Mapping[str, torch.Tensor], budget: int,
                  depth: int | None = None) -> Widths:
    """Per-group widths from the scores: units scored at or above one threshold (at least one
    a group), at the lowest threshold whose exact forward FLOPs fit `budget`."""
    candidates = np.unique(torch.cat([scores[g.name] for g in width_groups(spec.groups)]).numpy())
    # Widths shrink as the threshold rises: bisect for the lowest candidate that fits.
    low, high = 0, len(candidates) - 1
    if widths_flops(spec, _widths_at(spec, scores, float(candidates[high])), depth) > budget:
        raise ValueError(f"a budget of {budget} forward FLOPs is below the narrowest sub-model")
    while low < high:
        middle = (low + high) // 2
        if widths_flops(spec, _widths_at(spec, scores, float(candidates[middle])), depth) <= budget:
            high = middle
        else:
            low = middle + 1
    return _widths_at(spec, scores, float(candidates[low]))


def learn_widths(spec: ModelSpec, params: Params, data: Split, train: TrainConfig, mu: float,
                 depth: int | None = None, config: WidthConfig | None = None,
                 seed: int = 0) -> Widths:
    """A peer's learned widths: unit scores on its data, then the split of its uniform
    sub-model's FLOPs budget that they give."""
    scores = unit_scores(spec, params, data, train, mu, depth, config, seed)
    return derive_widths(spec, scores, flops_budget(spec, mu, depth), depth)
