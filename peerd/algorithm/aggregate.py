"""Overlap aggregation: merge the slices peers share, entry by entry.

Outbox rule (DESIGN invariant 4): a sender sends a receiver the entries of its own slice that
the receiver holds this round (to average) or will hold next round (to stay fresh). Both sides
derive that entry set from the plans, so a message carries only values, in row-major order of
the full tensor.

Merge rule: every entry becomes the weighted mean over its holders among self + the neighbours
that sent it; the receiver's own value counts only if it holds the entry this round. Entries
nobody sent keep the local value. A block (and its exit head) beyond a plan's depth holds no
entries: it is sent only between peers that keep it, and a peer none of whose neighbours keeps
one of its blocks leaves that block as it is.

Late slices (semi-asynchronous rounds): a slice built in an earlier round t carries the entries
of the round-t exchange mask. They are placed back onto full-parameter entries with the round-t
plans, and only those the receiver holds now enter the mean, with the sender's weight scaled by
`staleness_weight`: where the receiver holds an entry now, its own fresh value is always part of
the mean, so a stale value can pull an entry but never replace it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from peerd.algorithm.submodel import Params, axis_masks, entry_mask
from peerd.models.base import ModelSpec, Plan, holds_param

Tensors = dict[str, torch.Tensor]


def exchange_mask(
    spec: ModelSpec, name: str, shape: torch.Size, sender_now: Plan, receiver_now: Plan,
    receiver_next: Plan,
) -> torch.Tensor:
    """Entries of parameter `name` that the sender sends the receiver this round."""
    held_by_receiver = entry_mask(spec, receiver_now, name, shape) | entry_mask(
        spec, receiver_next, name, shape
    )
    return entry_mask(spec, sender_now, name, shape) & held_by_receiver


def exchange_count(
    spec: ModelSpec, name: str, shape: torch.Size, sender_now: Plan, receiver_now: Plan,
    receiver_next: Plan,
) -> int:
    """How many entries `exchange_mask` selects, from the per-axis masks alone.

    A plan's entries are a product of per-axis index sets, so |S & (A | B)| is
    |S & A| + |S & B| - |S & A & B|, each a product of per-axis counts (none where a plan does
    not keep the parameter's block).
    """
    def held_masks(plan: Plan) -> list[torch.Tensor | None] | None:
        return axis_masks(spec, plan, name) if holds_param(spec, plan, name) else None

    sender, now, nxt = held_masks(sender_now), held_masks(receiver_now), held_masks(receiver_next)

    def product(*plans: list[torch.Tensor | None] | None) -> int:
        if any(masks is None for masks in plans):
            return 0
        count = 1
        for axis, size in enumerate(shape):
            kept = [masks[axis] for masks in plans if masks[axis] is not None]
            if kept:
                both = kept[0]
                for mask in kept[1:]:
                    both = both & mask
                count *= int(both.sum())
            else:
                count *= size
        return count

    return product(sender, now) + product(sender, nxt) - product(sender, now, nxt)


def _partial_exchange_mask(
    spec: ModelSpec, name: str, shape: torch.Size, sender_now: Plan, receiver_now: Plan,
    receiver_next: Plan,
) -> torch.Tensor | None:
    """`exchange_mask`, or None when it selects every entry: building a mask and indexing by
    it costs far more than the dense operation it stands for (at mu = 1, always)."""
    if exchange_count(spec, name, shape, sender_now, receiver_now, receiver_next) == shape.numel():
        return None
    return exchange_mask(spec, name, shape, sender_now, receiver_now, receiver_next)


def outbox(
    spec: ModelSpec, params: Params, sender_now: Plan, receiver_now: Plan, receiver_next: Plan
) -> Tensors:
    """Flat value vectors, one per parameter, in the order the receiver expects them."""
    out: Tensors = {}
    for name, tensor in params.items():
        mask = _partial_exchange_mask(spec, name, tensor.shape, sender_now, receiver_now,
                                      receiver_next)
        out[name] = tensor.reshape(-1).clone() if mask is None else tensor[mask]
    return out


def staleness_weight(staleness: int, exponent: float) -> float:
    """The factor on a late slice's weight: (1 + staleness)^-exponent (1 for an on-time one).
    Polynomial decay, as FedAsync's: a slice a round late still counts, an old one little."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative: a slice from a future round")
    return (1.0 + staleness) ** -exponent


@dataclass(frozen=True)
class Arrival:
    """A neighbour's slice as received: its plan in the slice's round, its weight (already
    scaled by staleness), its values. `receiver_then` is None for a slice of the round being
    merged; for a late slice it is the receiver's plans (now, next) of the slice's round, which
    fixed the slice's entry set."""

    sender_plan: Plan
    weight: float
    values: Tensors
    receiver_then: tuple[Plan, Plan] | None = None


def merge(
    spec: ModelSpec, params: Params, own_now: Plan, own_next: Plan, own_weight: float,
    arrivals: Sequence[Arrival],
) -> None:
    """Replace every entry sent by neighbours with the weighted mean over its holders.

    Dense arithmetic over whole tensors (zero outside a mask, which changes no sum) beats
    indexing by masks, and where a plan holds or sends every entry of a parameter (at mu = 1,
    always) no mask is built at all: weights stay one float32 scalar.
    """
    for name, tensor in params.items():
        shape = tensor.shape
        held: torch.Tensor | None = None  # None: this peer holds every entry now
        if holds_all(spec, own_now, name, shape):
            total = tensor * own_weight
            weight_sum = torch.tensor(own_weight, dtype=tensor.dtype)
        else:
            held = entry_mask(spec, own_now, name, shape)
            total = torch.where(held, tensor * own_weight, torch.zeros_like(tensor))
            weight_sum = held.to(tensor.dtype) * own_weight
        received: torch.Tensor | None = None  # None: nothing yet; all True: everything
        for arrival in arrivals:
            values = arrival.values[name].to(tensor.dtype)
            if arrival.receiver_then is not None:
                usable, placed = _late_entries(spec, name, shape, arrival, values, held)
                total += placed * arrival.weight
                weight_sum = weight_sum + usable * arrival.weight
                received = usable if received is None else received | usable
                continue
            mask = _partial_exchange_mask(spec, name, shape, arrival.sender_plan, own_now,
                                          own_next)
            if mask is None:
                total += values.view(shape) * arrival.weight
                weight_sum = weight_sum + arrival.weight
                received = torch.ones((), dtype=torch.bool)
            else:
                total += torch.zeros_like(tensor).masked_scatter_(mask, values) * arrival.weight
                weight_sum = weight_sum + mask * arrival.weight
                received = mask if received is None else received | mask
        if received is not None:
            merged = total.div_(weight_sum)
            tensor.copy_(merged if received.dim() == 0 else torch.where(received, merged, tensor))


def _late_entries(
    spec: ModelSpec, name: str, shape: torch.Size, arrival: Arrival, values: torch.Tensor,
    held_now: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A late slice's values on full-parameter entries: (the entries it may update, a dense
    tensor with its values there and zero elsewhere). Its values fill the round-t exchange
    mask in row-major order; of those, only entries this peer holds now are usable."""
    assert arrival.receiver_then is not None
    then_now, then_next = arrival.receiver_then
    sent = exchange_mask(spec, name, shape, arrival.sender_plan, then_now, then_next)
    usable = sent if held_now is None else sent & held_now
    placed = torch.zeros(shape, dtype=values.dtype).masked_scatter_(sent, values)
    return usable, torch.where(usable, placed, torch.zeros_like(placed))


def holds_all(spec: ModelSpec, plan: Plan, name: str, shape: torch.Size) -> bool:
    return holds_param(spec, plan, name) and all(
        mask is None or bool(mask.all()) for mask in axis_masks(spec, plan, name))


def assemble(
    spec: ModelSpec, peer_params: Mapping[str, Params], plans: Mapping[str, Plan]
) -> Params:
    """The full model for evaluation: each entry is the mean over the peers holding it this
    round; an entry nobody holds takes the mean over all peers."""
    assembly = Assembly(spec)
    for peer_id, params in peer_params.items():
        assembly.add(params, plans[peer_id])
    return assembly.result()


class Assembly:
    """`assemble`, one peer at a time: it holds three running sums the size of the full model,
    whatever the number of peers, so a caller that receives the peers' parameters one after
    the other (`peerd export --addr`) may drop each as soon as it is added."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.peers = 0
        self.total: Params = {}  # sum of the holders' values
        self.holders: Params = {}  # how many peers hold each entry
        self.everyone: Params = {}  # sum over every peer, for entries nobody holds
        self.taken = False  # `result` consumes the sums

    def add(self, params: Params, plan: Plan) -> None:
        if self.taken:
            raise ValueError("the assembly's result was taken already: nothing more to add")
        for name, tensor in params.items():
            if name not in self.total:
                self.total[name] = torch.zeros_like(tensor)
                self.holders[name] = torch.zeros_like(tensor)
                self.everyone[name] = torch.zeros_like(tensor)
            mask = entry_mask(self.spec, plan, name, tensor.shape).to(tensor.dtype)
            self.total[name] += tensor * mask
            self.holders[name] += mask
            self.everyone[name] += tensor
        self.peers += 1

    def result(self) -> Params:
        """The assembled parameters, once: each parameter's sums are dropped as soon as its
        result is built, so the sums and the result are never both whole in memory."""
        if not self.peers:
            raise ValueError("nothing to assemble: no peer's parameters were added")
        if self.taken:
            raise ValueError("the assembly's result was taken already")
        self.taken = True
        assembled = {}
        for name in list(self.total):
            total, holders = self.total.pop(name), self.holders.pop(name)
            everyone = self.everyone.pop(name)
            assembled[name] = torch.where(holders > 0, total.div_(holders.clamp(min=1)),
                                          everyone.div_(self.peers))
        return assembled
