"""Overlap aggregation: merge the slices peers share, entry by entry.

Outbox rule (DESIGN invariant 4): a sender sends a receiver the entries of its own slice that
the receiver holds this round (to average) or will hold next round (to stay fresh). Both sides
derive that entry set from the plans, so a message carries only values, in row-major order of
the full tensor.

Merge rule: every entry becomes the weighted mean over its holders among self + the neighbours
that sent it; the receiver's own value counts only if it holds the entry this round. Entries
nobody sent keep the local value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from peerd.models.base import ModelSpec, Plan
from peerd.submodel import Params, entry_mask

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


def outbox(
    spec: ModelSpec, params: Params, sender_now: Plan, receiver_now: Plan, receiver_next: Plan
) -> Tensors:
    """Flat value vectors, one per parameter, in the order the receiver expects them."""
    return {
        name: tensor[exchange_mask(spec, name, tensor.shape, sender_now, receiver_now,
                                   receiver_next)]
        for name, tensor in params.items()
    }


@dataclass(frozen=True)
class Arrival:
    """A neighbour's slice as received: its plan this round, its weight, its values."""

    sender_plan: Plan
    weight: float
    values: Tensors


def merge(
    spec: ModelSpec, params: Params, own_now: Plan, own_next: Plan, own_weight: float,
    arrivals: Sequence[Arrival],
) -> None:
    """Replace every entry sent by neighbours with the weighted mean over its holders."""
    for name, tensor in params.items():
        own_mask = entry_mask(spec, own_now, name, tensor.shape)
        total = torch.where(own_mask, tensor * own_weight, torch.zeros_like(tensor))
        weight_sum = own_mask.to(tensor.dtype) * own_weight
        received = torch.zeros_like(own_mask)
        for arrival in arrivals:
            mask = exchange_mask(spec, name, tensor.shape, arrival.sender_plan, own_now, own_next)
            total[mask] += arrival.weight * arrival.values[name].to(tensor.dtype)
            weight_sum[mask] += arrival.weight
            received |= mask
        tensor[received] = total[received] / weight_sum[received]


def assemble(
    spec: ModelSpec, peer_params: Mapping[str, Params], plans: Mapping[str, Plan]
) -> Params:
    """The full model for evaluation: each entry is the mean over the peers holding it this
    round; an entry nobody holds takes the mean over all peers."""
    any_peer = next(iter(peer_params.values()))
    assembled: Params = {}
    for name, reference in any_peer.items():
        total = torch.zeros_like(reference)
        holders = torch.zeros_like(reference)
        everyone = torch.zeros_like(reference)
        for peer_id, params in peer_params.items():
            mask = entry_mask(spec, plans[peer_id], name, reference.shape).to(reference.dtype)
            total += params[name] * mask
            holders += mask
            everyone += params[name]
        assembled[name] = torch.where(
            holders > 0, total / holders.clamp(min=1), everyone / len(peer_params)
        )
    return assembled
