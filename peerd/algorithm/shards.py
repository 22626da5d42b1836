"""Sharded parameters: where every entry of the model is stored, and one peer's store.

The model's entries are cut into blocks of equal size: every parameter flattened in row-major
order, the parameters concatenated in table order, the result cut every `block_entries`
entries (a block may span the end of one parameter and the start of the next; the last one is
shorter). The placement gives every block exactly `replicas` storers among the members, by
rendezvous hashing of (seed, block, member) with bounded loads: each block goes to the members
that rank it highest among those with room left, no member holds more than
ceil(replicas x blocks / members) blocks, and a member is skipped only when the capacity rule
forces it. The placement depends on the member set, the model and the seed, never on the
training windows, so every entry has its storers for any number of members and any width.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from peerd.algorithm.submodel import Params
from peerd.state import (
    CheckpointMismatch,
    checkpoint_rounds,
    load_checkpoint,
    save_checkpoint,
)

# Blocks of at most 2^16 float32 entries (256 KiB): small enough that a store's bound is tight
# (its slack is a block or two), large enough that the placement of a 100M-parameter model is
# about 1500 blocks. A small model is cut into about MIN_BLOCKS blocks, none under 64 entries.
MAX_BLOCK_ENTRIES = 1 << 16
MIN_BLOCKS = 256
MIN_BLOCK_ENTRIES = 64


def block_entries_for(total: int) -> int:
    """The block size of a model of `total` entries: a function of the model alone, so every
    member cuts it the same way."""
    return max(MIN_BLOCK_ENTRIES, min(MAX_BLOCK_ENTRIES, math.ceil(total / MIN_BLOCKS)))


@dataclass(frozen=True)
class BlockLayout:
    """The model's entries as one flat vector cut into blocks: parameter `names[i]` of shape
    `shapes[i]` starts at flat entry `offsets[i]`."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    total: int
    block_entries: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, params: Params, block_entries: int | None = None) -> BlockLayout:
        if block_entries is None:
            block_entries = block_entries_for(sum(t.numel() for t in params.values()))
        if block_entries < 1:
            raise ValueError(f"block_entries={block_entries} is invalid: must be >= 1")
        dtypes = {tensor.dtype for tensor in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"sharded parameters need one dtype, the model has {dtypes}")
        offsets, total = [], 0
        for tensor in params.values():
            offsets.append(total)
            total += tensor.numel()
        return cls(tuple(params), tuple(t.shape for t in params.values()), tuple(offsets),
                   total, block_entries, dtypes.pop())

    @property
    def blocks(self) -> int:
        return math.ceil(self.total / self.block_entries)

    @property
    def entry_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        return self.block_entries * self.entry_bytes

    @property
    def params_bytes(self) -> int:
        return self.total * self.entry_bytes

    def block_size(self, block: int) -> int:
        start = block * self.block_entries
        return min(self.block_entries, self.total - start)

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def block_of(self, flat: torch.Tensor, block: int) -> torch.Tensor:
        """Block `block`'s values in a flat model vector (a copy)."""
        start = block * self.block_entries
        return flat[start:start + self.block_size(block)].clone()

    def unflatten(self, flat: torch.Tensor) -> Params:
        return {name: flat[offset:offset + math.prod(shape)].view(shape).clone()
                for name, shape, offset in zip(self.names, self.shapes, self.offsets,
                                               strict=True)}


def rendezvous_score(seed: int, block: int, member: str) -> int:
    """How much `member` wants `block`: a 64-bit hash, the same on every peer."""
    digest = hashlib.blake2b(f"{seed}/{block}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Placement:
    """Which members store each block: `storers[b]` in the block's rendezvous order (the first
    is the one a pull asks first)."""

    members: tuple[str, ...]
    replicas: int
    capacity: int  # the most blocks any member stores
    storers: tuple[tuple[str, ...], ...]

    def blocks_of(self, member: str) -> list[int]:
        return [block for block, holders in enumerate(self.storers) if member in holders]

    def storer_bound_bytes(self, layout: BlockLayout) -> int:
        """What a member's store may hold: `capacity` full blocks."""
        return self.capacity * layout.block_bytes


def place(blocks: int, members: Iterable[str], replicas: int, seed: int) -> Placement:
    """Every block to exactly `replicas` members, none over capacity (see the module doc).

    Bounded loads must never leave a block short of distinct storers: with R blocks still to
    place (this one included) and `room` blocks left per member, the rest can be placed iff
    sum(min(room, R)) >= replicas x R. Each block keeps that true by taking enough of the
    members whose room reaches R (the exact condition is in the code), the rest by rank.
    """
    ordered = tuple(sorted(set(members)))
    if not 1 <= replicas <= len(ordered):
        raise ValueError(f"storage_replicas={replicas} is invalid: must be between 1 and the "
                         f"{len(ordered)} members")
    capacity = math.ceil(replicas * blocks / len(ordered))
    room = dict.fromkeys(ordered, capacity)
    storers = []
    for block in range(blocks):
        remaining = blocks - block
        ranked = sorted(ordered, key=lambda m: rendezvous_score(seed, block, m), reverse=True)
        slack = sum(min(room[m], remaining) for m in ordered) - replicas * remaining
        full_room = [m for m in ranked if room[m] >= remaining]
        chosen = full_room[:max(0, len(full_room) - slack)]
        for member in ranked:
            if len(chosen) == replicas:
                break
            if member not in chosen and room[member] > 0:
                chosen.append(member)
        if len(chosen) != replicas:
            raise AssertionError(f"placement of block {block} found {len(chosen)} storers")
        for member in chosen:
            room[member] -= 1
        storers.append(tuple(m for m in ranked if m in chosen))
    return Placement(ordered, replicas, capacity, tuple(storers))


def moved_blocks(before: Placement, after: Placement) -> dict[str, list[int]]:
    """Per member of `after`: the blocks it stores now and did not store before (what it must
    copy from a surviving replica)."""
    return {member: [block for block in after.blocks_of(member)
                     if member not in before.storers[block]]
            for member in after.members}


class ShardStore:
    """One peer's stored blocks (flat values), nothing else of the model."""

    def __init__(self, layout: BlockLayout, peer_id: str) -> None:
        self.layout = layout
        self.peer_id = peer_id
        self.blocks: dict[int, torch.Tensor] = {}

    def nbytes(self) -> int:
        return sum(values.numel() * values.element_size() for values in self.blocks.values())

    def put(self, block: int, values: torch.Tensor) -> None:
        """Store `block` (a copy of a replica's, or the initial values)."""
        expected = self.layout.block_size(block)
        if values.dtype != self.layout.dtype or values.shape != (expected,):
            raise ValueError(f"{self.peer_id}: block {block} must be {expected} "
                             f"{self.layout.dtype} values, got {tuple(values.shape)} "
                             f"{values.dtype}")
        self.blocks[block] = values.clone()

    def get(self, block: int) -> torch.Tensor:
        if block not in self.blocks:
            raise KeyError(f"{self.peer_id} does not store block {block}")
        return self.blocks[block]

    def keep_only(self, blocks: Iterable[int]) -> None:
        """Drop every block not in `blocks` (the placement moved it elsewhere)."""
        kept = set(blocks)
        for block in [b for b in self.blocks if b not in kept]:
            del self.blocks[block]


def seed_stores(layout: BlockLayout, placement: Placement, params: Params,
                stores: Mapping[str, ShardStore]) -> None:
    """Every store gets its blocks of `params` (the cluster's initial parameters)."""
    flat = layout.flatten(params)
    for member in placement.members:
        for block in placement.blocks_of(member):
            stores[member].put(block, layout.block_of(flat, block))


def block_counts(window: torch.Tensor, layout: BlockLayout) -> list[tuple[int, int, int]]:
    """A sorted vector of flat entries cut by block: (block, start, stop) positions in it."""
    if window.numel() == 0:
        return []
    block_ids = torch.div(window, layout.block_entries, rounding_mode="floor")
    blocks, counts = torch.unique_consecutive(block_ids, return_counts=True)
    spans, start = [], 0
    for block, count in zip(blocks.tolist(), counts.tolist(), strict=True):
        spans.append((block, start, start + count))
        start += count
    return spans


def assemble_stores(layout: BlockLayout, placement: Placement,
                    stores: Mapping[str, ShardStore]) -> Params:
    """The full model from the stores, each block from its first storer that has it (the
    replicas are equal after every round): what an export pulls."""
    flat = torch.empty(layout.total, dtype=layout.dtype)
    for block, holders in enumerate(placement.storers):
        source = next((stores[m] for m in holders if m in stores and block in stores[m].blocks),
                      None)
        if source is None:
            raise LookupError(f"block {block} has no storer left: {holders}")
        start = block * layout.block_entries
        flat[start:start + layout.block_size(block)] = source.get(block)
    return layout.unflatten(flat)


def replicate(before: Placement, after: Placement,
              stores: Mapping[str, ShardStore]) -> int:
    """Bring the stores from `before` to `after` once members left or joined: each new storer
    of a block copies it from a storer of `before` still present, then every store drops what
    it no longer stores. Returns the entries copied. A block whose every storer left is lost:
    LookupError, before any store changed."""
    moved = moved_blocks(before, after)
    sources: dict[int, str] = {}
    for blocks in moved.values():
        for block in blocks:
            alive = [m for m in before.storers[block] if m in stores and block in
                     stores[m].blocks]
            if not alive:
                raise LookupError(f"block {block} is lost: every storer of it "
                                  f"({', '.join(before.storers[block])}) left")
            sources[block] = alive[0]
    copied = 0
    for member, blocks in moved.items():
        for block in blocks:
            stores[member].put(block, stores[sources[block]].get(block))
            copied += stores[member].layout.block_size(block)
    for member in after.members:
        stores[member].keep_only(after.blocks_of(member))
    return copied



def block_name(block: int) -> str:
    return f"block.{block:06d}"


def store_identity(layout: BlockLayout, placement: Placement, peer_id: str,
                   seed: int) -> dict[str, object]:
    """What a store's checkpoint must match to be loaded: the peer, the placement's inputs (the
    placement is recomputed from them, never stored) and the model's cut."""
    return {"peer_id": peer_id, "members": list(placement.members),
            "replicas": placement.replicas, "seed": seed,
            "block_entries": layout.block_entries, "entries": layout.total}


def save_store(state_dir: Path, rounds_done: int, store: ShardStore, placement: Placement,
               seed: int, keep: int = 2) -> int:
    """A checkpoint of the store after `rounds_done` rounds (safetensors of its blocks, the
    placement's inputs in the record; written atomically by peerd/state.py). Returns the
    bytes written."""
    blocks = {block_name(block): values for block, values in sorted(store.blocks.items())}
    return save_checkpoint(state_dir, rounds_done, blocks,
                           store_identity(store.layout, placement, store.peer_id, seed), keep)


def load_store(state_dir: Path, layout: BlockLayout, placement: Placement, peer_id: str,
               seed: int) -> tuple[int, ShardStore] | None:
    """The newest sound checkpoint of `peer_id`'s store under `placement`: (rounds done, the
    store), or None when `state_dir` holds none. Checkpoints none of which fits this placement
    and model (peerd/state.py checks every block's name, shape and values, and the record's
    placement inputs) raise CheckpointMismatch: the store must then be rebuilt from the
    replicas of the placement it belonged to."""
    shapes = {block_name(block): (layout.block_size(block),)
              for block in placement.blocks_of(peer_id)}
    checkpoint = load_checkpoint(state_dir, shapes,
                                 store_identity(layout, placement, peer_id, seed))
    if checkpoint is None:
        rounds = checkpoint_rounds(state_dir)
        if rounds:
            raise CheckpointMismatch(
                f"{state_dir}: no store checkpoint (rounds {rounds}) fits the placement over "
                f"members {', '.join(placement.members)} with {placement.replicas} replicas "
                f"and seed {seed} (the warnings above say why)")
        return None
    store = ShardStore(layout, peer_id)
    for name, values in checkpoint.params.items():
        store.put(int(name.removeprefix("block.")), values)
    return checkpoint.round, store
