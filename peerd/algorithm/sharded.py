"""One synchronous round with sharded parameters: pull, train, push, close.

Storage is separate from training (peerd/algorithm/shards.py places every block on `replicas`
members). In round t every member is both a trainer and a storer:

1. pull: the trainer asks one storer of every block its window touches (the first in the
   block's rendezvous order) for the window's entries of that block; values only, both sides
   derive the entry set from the round's plans.
2. train: it builds its sub-model from those values and trains it (Engine.train_submodel).
3. push: it sends every storer of those blocks the trained values of its entries there, with
   its weight (its training samples).
4. close: each storer sets every entry some trainer pushed to the weighted mean over the
   trainers that pushed it, in ascending trainer order (the order of today's merge at the
   member with the lowest id), and keeps every other entry. Replicas stay equal.

A storer serves no pull of round t once round t's pushes have begun (the values are then
partial sums): a round's pulls all come first. A storer folds each push into the stored block
on arrival (the block holds the running sum, a per-block mask which entries it has touched),
so nothing queues: one push per trainer and round, of exactly the count the plans give,
anything else is refused before it touches the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from peerd.algorithm.numerics import all_finite, valid_weight
from peerd.algorithm.shards import BlockLayout, Placement, ShardStore
from peerd.algorithm.submodel import axis_indices, axis_masks, build_from_slice
from peerd.models.base import ModelSpec, Plan, holds_param, table_tensors


class ShardRefused(ValueError):
    """A pull or push a storer will not take (what was wrong is the message)."""


class Window:
    """A plan's entries in the flat model, block by block: built once per plan and round from
    its per-axis masks (a byte per unit), so that a block's mask costs one pass over the
    block."""

    def __init__(self, spec: ModelSpec, layout: BlockLayout, plan: Plan) -> None:
        self.layout = layout
        # (flat offset, shape, per-axis masks) of every parameter the plan holds.
        self.pieces: list[tuple[int, torch.Size, list[np.ndarray | None]]] = [
            (offset, shape, [None if m is None else m.numpy()
                             for m in axis_masks(spec, plan, name)])
            for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets,
                                           strict=True)
            if holds_param(spec, plan, name)]

    def mask(self, block: int) -> torch.Tensor:
        """Which entries of `block` the plan's sub-model holds: one bool per entry."""
        start = block * self.layout.block_entries
        stop = start + self.layout.block_size(block)
        mask = np.zeros(stop - start, dtype=bool)
        for offset, shape, masks in self.pieces:
            low, high = max(start, offset), min(stop, offset + math.prod(shape))
            if low >= high:
                continue
            position = np.arange(low - offset, high - offset)
            kept = np.ones(high - low, dtype=bool)
            for axis in range(len(shape) - 1, -1, -1):
                axis_mask = masks[axis]
                if axis_mask is not None:
                    kept &= axis_mask[position % shape[axis]]
                position //= shape[axis]
            mask[low - start:high - start] = kept
        return torch.from_numpy(mask)

    def counts(self, blocks: Iterable[int] | None = None) -> dict[int, int]:
        """How many entries of each block (of `blocks`, default all) the window holds, for the
        blocks it touches only, in ascending order; one block's mask at a time."""
        counts = {}
        for block in sorted(range(self.layout.blocks) if blocks is None else blocks):
            count = int(self.mask(block).sum())
            if count:
                counts[block] = count
        return counts


def slice_shapes(spec: ModelSpec, layout: BlockLayout, plan: Plan) -> dict[str, torch.Size]:
    """The shape of every parameter's slice in the plan's sub-model (held parameters only)."""
    shapes = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if holds_param(spec, plan, name):
            kept = axis_indices(spec, plan, name)
            shapes[name] = torch.Size(size if k is None else len(k)
                                      for size, k in zip(shape, kept, strict=True))
    return shapes


@dataclass
class Push:
    """A trainer's trained values of its entries in the receiver's blocks, ascending entry
    order, in the wire dtype."""

    sender: str
    receiver: str
    round_index: int
    weight: float
    values: torch.Tensor

    def payload_bytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass
class Storer:
    """One member's storage role: its store and the state of the round being merged."""

    spec: ModelSpec
    store: ShardStore
    placement: Placement
    round_index: int = -1
    windows: dict[str, Window] = field(default_factory=dict)  # every trainer's, this round
    pushed: dict[str, float] = field(default_factory=dict)  # trainer -> weight, this round
    touched: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> entries summed

    @property
    def layout(self) -> BlockLayout:
        return self.store.layout

    def begin_round(self, round_index: int, plans: Mapping[str, Plan],
                    placement: Placement) -> None:
        self.round_index, self.placement = round_index, placement
        self.windows = {peer: Window(self.spec, self.layout, plan) for peer, plan in plans.items()}
        self.pushed, self.touched = {}, {}

    def held_bytes(self) -> int:
        return self.store.nbytes() + sum(t.numel() for t in self.touched.values())

    def _check_round(self, peer: str, round_index: int, what: str) -> None:
        if round_index != self.round_index:
            raise ShardRefused(f"{what} from {peer} is for round {round_index}; "
                               f"{self.store.peer_id} is in round {self.round_index}")
        if peer not in self.windows:
            raise ShardRefused(f"{what} from {peer}: not a member in round {round_index}")

    def serve_pull(self, requester: str, round_index: int, block: int) -> torch.Tensor:
        """The requester's window entries of `block`, as stored now."""
        self._check_round(requester, round_index, "pull")
        if self.pushed:
            raise ShardRefused(f"pull from {requester}: round {round_index}'s pushes have begun "
                               f"at {self.store.peer_id}")
        if block not in self.store.blocks:
            raise ShardRefused(f"pull from {requester}: {self.store.peer_id} does not store "
                               f"block {block}")
        return self.store.get(block)[self.windows[requester].mask(block)].clone()

    def expected_counts(self, trainer: str) -> dict[int, int]:
        """How many entries of each of this storer's blocks `trainer`'s window holds (blocks
        it touches only)."""
        return self.windows[trainer].counts(self.store.blocks)

    def accept_push(self, push: Push) -> None:
        """Fold a trainer's push into the running sums, after checking it fits the plans."""
        self._check_round(push.sender, push.round_index, "push")
        if push.receiver != self.store.peer_id:
            raise ShardRefused(f"push from {push.sender} is for {push.receiver}, not "
                               f"{self.store.peer_id}")
        if push.sender in self.pushed:
            raise ShardRefused(f"push from {push.sender}: it already pushed round "
                               f"{push.round_index} to {self.store.peer_id}")
        if not valid_weight(push.weight):
            raise ShardRefused(f"push from {push.sender}: weight {push.weight} invalid")
        if push.values.dtype != self.layout.dtype:
            raise ShardRefused(f"push from {push.sender}: values are {push.values.dtype}, the "
                               f"store holds {self.layout.dtype}")
        counts = self.expected_counts(push.sender)
        expected = sum(counts.values())
        if push.values.dim() != 1 or push.values.numel() != expected:
            raise ShardRefused(f"push from {push.sender}: {push.values.numel()} values, the "
                               f"plans say {expected} for {self.store.peer_id}'s blocks")
        if not all_finite(push.values):
            raise ShardRefused(f"push from {push.sender}: non-finite values")
        start = 0
        for block, count in counts.items():
            mask = self.windows[push.sender].mask(block)
            weighted = push.values[start:start + count] * push.weight
            start += count
            stored = self.store.get(block)
            touched = self.touched.setdefault(block, torch.zeros_like(mask))
            first = mask & ~touched
            summed = stored[mask] + weighted
            stored[mask] = torch.where(first[mask], weighted, summed)
            touched |= mask
        self.pushed[push.sender] = push.weight

    def close_round(self) -> None:
        """Every touched entry becomes its sum over the weight of the trainers that pushed it;
        the weights are summed one block at a time, from the plans."""
        for block, touched in self.touched.items():
            weight = torch.zeros(touched.shape, dtype=self.layout.dtype)
            for trainer in sorted(self.pushed):
                weight[self.windows[trainer].mask(block)] += self.pushed[trainer]
            stored = self.store.get(block)
            stored[touched] = stored[touched] / weight[touched]
        self.pushed, self.touched = {}, {}


def pulled_submodel(spec: ModelSpec, layout: BlockLayout, plan: Plan,
                    values: Mapping[int, torch.Tensor]) -> nn.Module:
    """The sub-model of `plan` from its window's values, block by block in ascending order
    (the window's entries in flat order are its parameters' slices, row-major, in table
    order)."""
    flat = torch.cat([values[block] for block in sorted(values)]) if values else torch.empty(0)
    shapes = slice_shapes(spec, layout, plan)
    sliced, start = {}, 0
    for name, shape in shapes.items():
        count = math.prod(shape)
        sliced[name] = flat[start:start + count].view(shape)
        start += count
    if start != flat.numel():
        raise ValueError(f"the window has {flat.numel()} entries, its slices {start}")
    return build_from_slice(spec, plan, sliced)


def trained_values(spec: ModelSpec, layout: BlockLayout, module: nn.Module) -> torch.Tensor:
    """The trained sub-model's entries in the window's flat order."""
    tensors = table_tensors(spec, module)
    return torch.cat([tensors[name].detach().reshape(-1).to(layout.dtype)
                      for name in layout.names if name in tensors])


def pushes_for(trainer: str, round_index: int, weight: float, placement: Placement,
               counts: Mapping[int, int], values: torch.Tensor) -> list[Push]:
    """One push per storer of the window's blocks: the window's values cut by block
    (`counts`, from `Window.counts`) and grouped by storer, ascending block order within
    each."""
    by_storer: dict[str, list[torch.Tensor]] = {}
    start = 0
    for block in sorted(counts):
        part = values[start:start + counts[block]]
        start += counts[block]
        for storer in placement.storers[block]:
            by_storer.setdefault(storer, []).append(part)
    return [Push(trainer, storer, round_index, weight, torch.cat(parts))
            for storer, parts in sorted(by_storer.items())]
