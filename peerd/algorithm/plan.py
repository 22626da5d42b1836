"""Planners: which units of every group each member trains in a round.

A plan is a pure function of (seed, round, members, capacities, method): every peer computes
every member's plan locally and nothing is negotiated. Members come sorted by peer id; a
member's index in that order is its *position*.

- msfusion: double shifting splitting (DSS). Windows of width ceil(mu_n * K) start spaced
  around the ring of K units in proportion to the members' widths (shift across peers, so the
  windows cover every unit whenever the widths add up to K) and drift around the ring over
  rounds (shift across rounds). Each group drifts at its own rate: the r-th width group of the
  model goes once around its ring every R / (r + 1) rounds (R, the drift period, default 64;
  docs/ALGORITHM.md) with drift rates `rank`, or with `colour` (the configured default) every
  R / (c + 1) rounds, c the group's colour in a greedy colouring of the groups that share a
  weight (peerd/algorithm/colouring.py). Any two groups that share a weight therefore slide
  past each other by at least 1/R of a ring a round, so every unit of one meets every unit of
  the other (DESIGN invariant 3), while a window moves only a little each round and what it
  holds next round is mostly what it or its neighbour holds now. When the widths add up to
  more than K, the overlap schedule sets how far apart the windows are spread
  (docs/ALGORITHM.md, adaptive overlap). The windows follow the members' ring positions in
  every group (layout `ring`); the experimental layouts `rotating` and `scattered` reorder
  them (member_order).
  Groups named in `whole_groups` are not windowed: every member keeps all their units in every
  round (e.g. a transformer's residual width `embd`, so every sub-model reads and writes the
  whole residual stream; docs/ALGORITHM.md, whole groups); they do not drift, and the other
  groups keep their windows.
- fedrolex: one rolling window, the same for every member and every layer.
- heterofl: a static prefix of each group.
- fd: Federated Dropout, a fresh random subset per member per round.
- full: every unit (decentralized FedAvg).

Learned widths (peerd/algorithm/width.py): a member may carry its own width per group, learned
on its data (Co-S2P); every method then takes that width instead of ceil(mu * K) for the group, and
msfusion still shifts the windows, so DSS decides which units and the learned width how many.

Depth (models with early exits): a member of depth d keeps blocks 0..d-1, the same in every
round and under every method. A group used only from block k on is planned among the members
that keep block k (the DSS windows are spaced over those members' widths, so the peers that
hold a deep block are the ones that cover it); every other member holds none of its units.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peerd.algorithm.colouring import greedy_colours
from peerd.config import (
    COLOUR_RATES,
    DRIFT_PERIOD,
    DRIFT_RATES,
    RANK_RATES,
    STATIC_OVERLAP,
    WINDOW_LAYOUTS,
    PeerOptions,
    parse_overlap,
    parse_whole_groups,
    planner_options,
)
from peerd.models.base import DEPTH, ModelSpec, Plan, UnitGroup

LAYOUTS = WINDOW_LAYOUTS
RING_LAYOUT, SCATTERED_LAYOUT, ROTATING_LAYOUT = LAYOUTS

Widths = tuple[tuple[str, int], ...]  # (group, units kept), in the model's group order


@dataclass(frozen=True)
class Member:
    peer_id: str
    mu: float  # width ratio this member can afford, in (0, 1]
    depth: int | None = None  # blocks it keeps (models with early exits); None: all of them
    # (group, units kept) for every sliceable group (learned widths); None: window_width(mu,
    # units) in every group.
    widths: Widths | None = None


Plans = dict[str, Plan]  # peer id -> plan


def member_depth(member: Member, blocks: int | None) -> int | None:
    """The blocks a member keeps, checked against the model's (None: a model without early
    exits, whose members all keep every block)."""
    if not 0.0 < member.mu <= 1.0:
        raise ValueError(f"peer {member.peer_id}: mu={member.mu} is outside (0, 1]")
    if member.depth is None:
        return blocks
    if blocks is None:
        raise ValueError(f"peer {member.peer_id}: depth {member.depth} needs a model with "
                         "early exits")
    if not 1 <= member.depth <= blocks:
        raise ValueError(f"peer {member.peer_id}: depth {member.depth} is outside 1..{blocks}")
    return member.depth


def width_groups(groups: Mapping[str, UnitGroup]) -> list[UnitGroup]:
    """The groups learned widths cover, in the model's table order (the order they travel in;
    depth is not a width: it travels as `depth`)."""
    return [group for group in groups.values() if group.name != DEPTH]


def width_group_names(groups: Mapping[str, UnitGroup]) -> tuple[str, ...]:
    return tuple(group.name for group in width_groups(groups))


def encode_widths(widths: Widths) -> list[int]:
    """The widths as they travel (handshake, mDNS TXT, views): the counts in group order."""
    return [width for _, width in widths]


def decode_widths(group_names: Sequence[str], counts: Sequence[int]) -> Widths:
    """Counts in the order of `group_names` (width_groups' names) back to (group, width) pairs;
    check_widths refuses bad counts, this refuses a wrong number of them now."""
    if len(counts) != len(group_names):
        raise ValueError(f"{len(counts)} learned widths for a model of {len(group_names)} groups")
    return tuple((name, int(count)) for name, count in zip(group_names, counts, strict=True))


def check_widths(member: Member, groups: Mapping[str, UnitGroup]) -> None:
    """A member's learned widths must give one count in 1..units for every sliceable group."""
    if member.widths is None:
        return
    names = width_group_names(groups)
    given = tuple(name for name, _ in member.widths)
    if given != names:
        raise ValueError(f"peer {member.peer_id}: learned widths for groups {given}, the model "
                         f"has {names}")
    for (name, width), group in zip(member.widths, width_groups(groups), strict=True):
        if type(width) is not int or not 1 <= width <= group.units:
            raise ValueError(f"peer {member.peer_id}: learned width {width!r} of group {name} "
                             f"is outside 1..{group.units}")


def member_width(member: Member, group: UnitGroup) -> int:
    """Units of `group` the member keeps: its learned width, or ceil(mu * K)."""
    if member.widths is None:
        return window_width(member.mu, group.units)
    return dict(member.widths)[group.name]


def _keeps(depth: int | None, group: UnitGroup) -> bool:
    return depth is None or group.block is None or depth > group.block


def window_width(mu: float, units: int) -> int:
    # The epsilon keeps ceil(0.25 * 16) at 4 despite float rounding.
    return max(1, min(units, math.ceil(mu * units - 1e-9)))


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


def _window(start: int, width: int, units: int) -> torch.Tensor:
    return torch.sort((start + torch.arange(width)) % units).values


class Planner(ABC):
    """Plans for all members of a round, selected by name."""

    name: str

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def check_groups(self, groups: Mapping[str, UnitGroup]) -> None:
        """Refuse settings that name groups the model lacks (a planner without such settings
        accepts every model)."""
        del groups

    def plan(
        self, round_index: int, members: Sequence[Member], groups: Mapping[str, UnitGroup]
    ) -> Plans:
        self.check_groups(groups)
        ordered = sorted(members, key=lambda member: member.peer_id)
        if len({m.peer_id for m in ordered}) != len(ordered):
            raise ValueError("duplicate peer ids among members")
        blocks = groups[DEPTH].units if DEPTH in groups else None
        depths = {member.peer_id: member_depth(member, blocks) for member in ordered}
        for member in ordered:
            check_widths(member, groups)
        plans: Plans = {member.peer_id: {} for member in ordered}
        if not ordered:
            return plans
        if DEPTH in groups:
            for member in ordered:
                plans[member.peer_id][DEPTH] = torch.arange(depths[member.peer_id]
                                                            or groups[DEPTH].units)
        for rank, group in enumerate(width_groups(groups)):
            holders = [m for m in ordered if _keeps(depths[m.peer_id], group)]
            kept = dict(zip((m.peer_id for m in holders),
                            self.group_plan(round_index, holders, group, rank) if holders else [],
                            strict=True))
            for member in ordered:
                plans[member.peer_id][group.name] = kept.get(
                    member.peer_id, torch.zeros(0, dtype=torch.long))
        return plans

    @abstractmethod
    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        """Sorted unit indices of one group for each member, in position order; `rank` is the
        group's place among the model's width groups (table order)."""


_LEVEL_DENOMINATOR = 1 << 20  # overlap levels are exact fractions of this


def overlap_level(schedule: str, round_index: int) -> float:
    """How much of the surplus width W - K overlaps neighbouring windows in a round, in [0, 1]:
    1 spreads the windows evenly around the ring (each overlaps its neighbours by the most that
    an even spread allows), 0 lays them edge to edge. `static` is 1 in every round;
    `decay:H` halves every H rounds (more overlap early, for consensus; less later)."""
    halflife = parse_overlap(schedule)
    return 1.0 if halflife is None else 0.5 ** (round_index / halflife)


class MSFusionPlanner(Planner):
    name = "msfusion"

    def __init__(self, seed: int, overlap: str = STATIC_OVERLAP,
                 drift_period: int = DRIFT_PERIOD, layout: str = RING_LAYOUT,
                 whole_groups: str | None = None, drift_rates: str = RANK_RATES,
                 spec: ModelSpec | None = None) -> None:
        super().__init__(seed)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: must be one of {', '.join(LAYOUTS)}")
        # The order of the windows around each ring (member_order). Only ring is a peerd
        # option; rotating and scattered were measured and rejected at N = 8 (docs/ALGORITHM.md,
        # a slower drift), and are kept for scripts/diagnose_assembly.py and window_holders.py.
        self.layout = layout
        if drift_period < 1:
            raise ValueError(f"drift_period={drift_period} is invalid: must be >= 1")
        # Rounds in which the first width group drifts once around its ring; the r-th goes
        # r + 1 times (docs/ALGORITHM.md, drift).
        self.drift_period = drift_period
        if drift_rates not in DRIFT_RATES:
            raise ValueError(f"drift_rates={drift_rates!r} is invalid: must be one of "
                             f"{', '.join(DRIFT_RATES)}")
        self.drift_rates = drift_rates
        # Groups every member keeps whole; checked against a model's groups by check_groups.
        self.whole_groups = frozenset(parse_whole_groups(whole_groups))
        # colour: the colour of each windowed group in the model's sharing graph (None: by
        # rank). Whole groups do not drift, so they are left out: groups that share weights
        # only with them all get the slowest rate. The option's default is colour
        # (DEFAULT_DRIFT_RATES, through planner_for); a planner made without the model cannot
        # colour, so the keyword's own default is rank.
        self.colours: dict[str, int] | None = None
        if drift_rates == COLOUR_RATES:
            if spec is None:
                raise ValueError("drift_rates=colour needs the model: its axes table says "
                                 "which groups share a weight")
            windowed = [name for name in width_group_names(spec.groups)
                        if name not in self.whole_groups]
            self.colours = greedy_colours(windowed, spec.axes)
        parse_overlap(overlap)  # refuse a bad schedule now, not in some later round
        self.overlap = overlap

    def check_groups(self, groups: Mapping[str, UnitGroup]) -> None:
        names = width_group_names(groups)
        unknown = sorted(self.whole_groups - set(names))
        if unknown:
            raise ValueError(f"whole_groups: the model has no group {', '.join(unknown)}; its "
                             f"groups are {', '.join(names)}")

    def window_starts(self, widths: Sequence[int], units: int, level: float = 1.0) -> list[int]:
        """Starts at stride s * (widths so far), s = 1 - level * (1 - K / W), s in [K/W, 1]:
        level 1 spaces them in proportion to the widths over the whole ring, level 0 edge to
        edge. The gap after a window never exceeds it and s * W >= K, so the windows cover
        every unit when W >= K. Integer arithmetic: level 1 gives floor(K * c / W) exactly.
        When W <= K the windows are disjoint at any level, spaced in proportion to the widths."""
        total = sum(widths)
        cumulative = np.concatenate([[0], np.cumsum(widths)[:-1]])
        if total <= units:  # nothing to overlap: disjoint windows spread over the ring
            return [int(units * c // total) for c in cumulative]
        level_num = round(level * _LEVEL_DENOMINATOR)
        stride_num = total * _LEVEL_DENOMINATOR - level_num * (total - units)
        return [int(c) * stride_num // (total * _LEVEL_DENOMINATOR) for c in cumulative]

    def drift_rate(self, group: UnitGroup, rank: int) -> int:
        """Times a group goes around its ring in a drift period: rank + 1, or colour + 1."""
        if self.colours is None:
            return rank + 1
        if group.name not in self.colours:
            raise ValueError(f"group {group.name!r} is not a width group of the model this "
                             "planner coloured")
        return self.colours[group.name] + 1

    def group_offset(self, round_index: int, group: UnitGroup, rank: int) -> int:
        """How far the windows of a group are rotated in a round: a seeded start per group,
        advanced by rate * K / R units a round (exact integer floor; drift_rate)."""
        start = int(_rng(self.seed, _stable_hash(group.name)).integers(group.units))
        drift = round_index * self.drift_rate(group, rank) * group.units // self.drift_period
        return (start + drift) % group.units

    def member_order(self, round_index: int, count: int, group: UnitGroup,
                     rank: int) -> list[int]:
        """The positions in the order their windows are laid around a group's ring: position
        order (ring); position order turned by one every round, so that a peer takes next round
        the windows of every group its ring neighbour holds now (rotating); or a seeded
        permutation per group (scattered) so that a peer's windows of two groups meet anywhere
        in a weight matrix, not on one diagonal band."""
        if self.layout == ROTATING_LAYOUT:
            return [(slot - round_index) % count for slot in range(count)]
        if self.layout == RING_LAYOUT or rank == 0:
            return list(range(count))
        rng = _rng(self.seed, _stable_hash(group.name), count)
        return [int(position) for position in rng.permutation(count)]

    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        if group.name in self.whole_groups:
            return [torch.arange(group.units) for _ in members]
        order = self.member_order(round_index, len(members), group, rank)
        widths = [member_width(members[position], group) for position in order]
        offset = self.group_offset(round_index, group, rank)
        starts = self.window_starts(widths, group.units,
                                    overlap_level(self.overlap, round_index))
        windows: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * len(members)
        for position, start, width in zip(order, starts, widths, strict=True):
            windows[position] = _window(start + offset, width, group.units)
        return windows


class FedRolexPlanner(Planner):
    name = "fedrolex"

    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        start = round_index % group.units
        return [_window(start, member_width(m, group), group.units) for m in members]


class HeteroFLPlanner(Planner):
    name = "heterofl"

    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        return [torch.arange(member_width(m, group)) for m in members]


class FederatedDropoutPlanner(Planner):
    name = "fd"

    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        plans = []
        for member in members:
            rng = _rng(self.seed, round_index, _stable_hash(member.peer_id),
                       _stable_hash(group.name))
            chosen = rng.choice(group.units, member_width(member, group), replace=False)
            plans.append(torch.sort(torch.from_numpy(chosen).long()).values)
        return plans


class FullPlanner(Planner):
    name = "full"

    def group_plan(
        self, round_index: int, members: Sequence[Member], group: UnitGroup, rank: int
    ) -> list[torch.Tensor]:
        return [torch.arange(group.units) for _ in members]


PLANNERS: dict[str, type[Planner]] = {
    planner.name: planner
    for planner in (
        MSFusionPlanner, FedRolexPlanner, HeteroFLPlanner, FederatedDropoutPlanner, FullPlanner
    )
}


def make_planner(method: str, seed: int, **settings: object) -> Planner:
    """The planner of `method`; `settings` are the options declared for it (peerd/config.py,
    `planner=`), e.g. msfusion's overlap schedule and drift period."""
    try:
        planner_class = PLANNERS[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(sorted(PLANNERS))}"
        ) from None
    return planner_class(seed, **settings)


def planner_for(config: PeerOptions, spec: ModelSpec) -> Planner:
    """The planner a configuration runs on a model: its method, seed and the method's declared
    options."""
    settings = planner_options(config)
    if config.method == MSFusionPlanner.name:
        settings["spec"] = spec  # drift rates `colour` read which groups share a weight
    return make_planner(config.method, config.seed, **settings)
