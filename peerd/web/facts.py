"""What the page shows, derived from status replies and plans: pure functions and small state.

Plans are a pure function of (seed, round, members, capacities, method), so the windows of every
member are computed here from the members a status reply lists, as every peer computes them:
nothing about windows travels.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.json_format import MessageToDict

from peerd.algorithm.plan import Member, Planner, decode_widths, width_group_names, width_groups
from peerd.algorithm.topology import Topology
from peerd.models.base import UnitGroup
from peerd.v1 import peer_pb2

TRAINING, WAITING, LATE, GONE = "training", "waiting", "late", "gone"
# Handshakes come every 0.5 s: a member unheard for this long has missed several.
LATE_AFTER_S = 2.0
# A neighbour merged without in half of this many last rounds is marked a straggler.
STRAGGLER_ROUNDS = 5
# Rounds of windows added to the coverage per request: a page opened late catches up over a
# few polls instead of stalling the loop.
COVERAGE_ROUNDS_PER_CALL = 256
WARNINGS_KEPT = 50


def status_json(reply: peer_pb2.StatusReply) -> dict:
    """A status reply as `peerd status --json` prints it."""
    return MessageToDict(reply, preserving_proto_field_name=True)


def stragglers(records: Sequence[dict]) -> set[str]:
    """Neighbours a daemon merged without in at least half of the given rounds.jsonl records
    (semi-asynchronous rounds close without the odd late slice of anyone)."""
    missed = Counter(peer for record in records for peer in record.get("merged_without") or ())
    return {peer for peer, rounds in missed.items() if 2 * rounds >= len(records)}


@dataclass(frozen=True)
class MemberFacts:
    peer_id: str
    address: str
    position: int  # in the view; -1: known but not a member
    capacity: peer_pb2.Capacity
    round: int  # the round it is in (0-based), as its handshakes say
    last_seen_unix: float
    bytes_sent: int  # to it, from the daemon that reports (its own total for itself)
    bytes_received: int
    neighbour: bool  # of the daemon that reports

    def member(self, groups: Mapping[str, UnitGroup]) -> Member:
        """As the planner takes it."""
        widths = self.capacity.widths
        return Member(self.peer_id, self.capacity.mu, self.capacity.depth or None,
                      decode_widths(width_group_names(groups), widths) if widths else None)


def reply_members(reply: peer_pb2.StatusReply, now: float) -> list[MemberFacts]:
    """The daemon itself and every peer it knows, by peer id."""
    me = reply.self
    view = list(me.members)
    # Its own row carries its totals; a peer's, what went between the two.
    facts = [MemberFacts(me.peer_id, me.address, view.index(me.peer_id) if me.peer_id in view
                         else -1, me.capacity, me.round, now, reply.bytes_sent,
                         reply.bytes_received, False)]
    facts += [MemberFacts(p.peer_id, p.address, p.position, p.capacity, p.round,
                          p.last_seen_unix, p.bytes_sent, p.bytes_received, p.neighbour)
              for p in reply.peers]
    return sorted(facts, key=lambda fact: fact.peer_id)


def member_state(fact: MemberFacts, leader_round: int, committed: bool, now: float,
                 dead_after_s: float, last_round: int | None) -> str:
    """gone: not in the view, or unheard for the dead-member time; waiting: no view yet, or
    its last round done; late: more than a round behind the furthest member, or unheard for a
    while; training otherwise."""
    silent_s = now - fact.last_seen_unix
    if committed and (fact.position < 0 or silent_s >= dead_after_s):
        return GONE
    if not committed or (last_round is not None and fact.round >= last_round):
        return WAITING
    if fact.round + 1 < leader_round or silent_s >= LATE_AFTER_S:
        return LATE
    return TRAINING


def describe_members(facts: Sequence[MemberFacts], committed: bool, now: float,
                     dead_after_s: float, last_round: int | None,
                     merged_without: set[str]) -> list[dict]:
    """The members table of the page and of /api/status."""
    leader = max((f.round for f in facts if f.position >= 0), default=0)
    rows = []
    for fact in facts:
        state = member_state(fact, leader, committed, now, dead_after_s, last_round)
        rows.append({
            "peer_id": fact.peer_id, "address": fact.address, "position": fact.position,
            "mu": fact.capacity.mu, "depth": fact.capacity.depth,
            "frozen_blocks": fact.capacity.frozen_blocks, "widths": list(fact.capacity.widths),
            "round": fact.round, "last_seen_unix": fact.last_seen_unix,
            "bytes_sent": fact.bytes_sent, "bytes_received": fact.bytes_received,
            "neighbour": fact.neighbour, "state": state,
            "straggler": state == LATE or (state != GONE and fact.peer_id in merged_without),
        })
    return rows


def topology_edges(topology: Topology, member_ids: Sequence[str]) -> list[list[str]]:
    """Every pair of members that exchange slices, each pair once."""
    edges = {tuple(sorted((me, other))) for me in member_ids
             for other in topology.neighbours(member_ids, me)}
    return [list(edge) for edge in sorted(edges)]


def unit_runs(units: np.ndarray) -> list[list[int]]:
    """Sorted unit indices as [start, length] runs of consecutive units."""
    if len(units) == 0:
        return []
    breaks = np.flatnonzero(np.diff(units) != 1) + 1
    return [[int(run[0]), len(run)] for run in np.split(units, breaks)]


class Windows:
    """Every member's window over each unit group, and how often each unit has been held."""

    def __init__(self, planner: Planner, groups: Mapping[str, UnitGroup]) -> None:
        self.planner = planner
        self.groups = groups
        self.held = {group.name: np.zeros(group.units, dtype=np.int64)
                     for group in width_groups(groups)}
        self.counted_through: int | None = None  # rounds before this one are counted

    def count(self, members: Sequence[Member], round_index: int) -> None:
        """Count the windows of the rounds up to `round_index` not counted yet, with these
        members (a view change between two calls counts the rounds in between with the new
        one), at most COVERAGE_ROUNDS_PER_CALL of them."""
        start = round_index if self.counted_through is None else self.counted_through
        end = min(round_index + 1, start + COVERAGE_ROUNDS_PER_CALL)
        for past in range(start, end):
            for plan in self.planner.plan(past, members, self.groups).values():
                for name, held in self.held.items():
                    held[plan[name].numpy()] += 1
        self.counted_through = max(end, start)

    def describe(self, members: Sequence[Member], round_index: int) -> dict:
        """The windows of `round_index` and the coverage so far, for /api/status (no groups
        before there are members)."""
        if not members:
            return {"round": round_index, "counted_through": self.counted_through, "groups": []}
        self.count(members, round_index)
        plans = self.planner.plan(round_index, members, self.groups)
        groups = []
        for group in width_groups(self.groups):
            held = self.held[group.name]
            groups.append({
                "name": group.name, "units": group.units,
                "windows": [{"peer_id": peer_id,
                             "runs": unit_runs(plan[group.name].numpy()),
                             "width": len(plan[group.name])}
                            for peer_id, plan in plans.items()],
                "held_rounds": held.tolist(),
                "coverage": float(np.count_nonzero(held)) / group.units,
            })
        return {"round": round_index, "counted_through": self.counted_through,
                "groups": groups}


class ViewChanges:
    """Notes members that left or entered the view between two looks at it."""

    def __init__(self) -> None:
        self.members: frozenset[str] | None = None

    def notes(self, members: Iterable[str], round_index: int) -> list[str]:
        now = frozenset(members)
        before, self.members = self.members, now
        if before is None or before == now or not now:
            return []
        return ([f"{peer} dropped from the view (round {round_index})"
                 for peer in sorted(before - now)]
                + [f"{peer} joined the view (round {round_index})"
                   for peer in sorted(now - before)])


class RecentWarnings(logging.Handler):
    """The last warnings logged under a logger (refused messages, failed pushes, members
    dropped), plus notes added directly; a bounded list, safe from any thread."""

    def __init__(self, kept: int = WARNINGS_KEPT) -> None:
        super().__init__(logging.WARNING)
        self.entries: deque[dict] = deque(maxlen=kept)

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append({"time_unix": record.created, "level": record.levelname,
                             "source": record.name, "message": record.getMessage()})

    def note(self, message: str, source: str) -> None:
        with self.lock:  # the handler's own, which logging holds around emit()
            self.entries.append({"time_unix": time.time(), "level": "NOTE", "source": source,
                                 "message": message})

    def latest(self) -> list[dict]:
        """Newest first."""
        with self.lock:
            return list(reversed(self.entries))
