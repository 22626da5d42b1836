"""The round driver: the steps of one round that do not depend on how slices travel.

    context (plan) -> train -> outbox -> send -> collect -> merge -> snapshot -> checkpoint

`peerd sim` runs one driver per peer over the in-memory transport; a daemon runs one over gRPC
(peerd/net/slices.py). Both go through `RoundDriver.run_round`, which is what makes a
synchronous run of daemons equal the simulator bit for bit.

Blocking steps (training, outbox, merge, copies, file writes) go through `offload`: to the
engine's worker thread in a daemon, inline in the simulator. The driver's own state (contexts,
inbox, snapshots, counters) is changed only on the event loop. Each arriving slice is checked
once, when it arrives (`accept`); the merge trusts that check.

With `sync` a round closes when every neighbour's slice of it has arrived (or the round timeout
passes, or the neighbour is being dropped from the view). Semi-asynchronous rounds also close at
an adaptive deadline once a quorum of neighbours is in; slices that come later are merged in a
later round with a staleness weight, and sends run in the background.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from peerd.algorithm.deadline import ArrivalDelays
from peerd.algorithm.engine import Engine, LateSlice, RoundContext, TrainStats
from peerd.algorithm.evaluate import Evaluation
from peerd.algorithm.numerics import valid_weight
from peerd.algorithm.plan import Member
from peerd.algorithm.reduce import PartExchange, PartTransport
from peerd.algorithm.submodel import Params, slice_params
from peerd.algorithm.transport import SliceMessage, SliceTransport
from peerd.checkpoints import view_entry
from peerd.looplag import LagFigures
from peerd.models.base import Plan
from peerd.rss import peak_rss_bytes

log = logging.getLogger("peerd.algorithm.driver")

COLLECT_POLL_S = 0.25

T = TypeVar("T")


class Roster(Protocol):
    """Who the members are in each round, and who is leaving (the daemon's membership)."""

    def members_at(self, round_index: int) -> Sequence[Member] | None: ...

    def leaving(self) -> frozenset[str]:
        """Members nobody waits for any more."""
        ...

    def dropped(self) -> bool:
        """True when this peer itself is out of the view."""
        ...


@dataclass(frozen=True)
class StaticRoster:
    """The same members in every round (the simulator)."""

    members: tuple[Member, ...]

    def members_at(self, round_index: int) -> Sequence[Member]:
        return self.members

    def leaving(self) -> frozenset[str]:
        return frozenset()

    def dropped(self) -> bool:
        return False


async def run_inline(function: Callable[..., T], *args: Any) -> T:
    """`offload` of the simulator: nothing else shares its thread."""
    return function(*args)


Offload = Callable[..., Awaitable[Any]]


class SliceRefused(Exception):
    """A slice this peer does not take; `reason` says which rule refused it: later (not in
    that round yet: retry), receiving (a twin stream of it is arriving: retry), stale (beyond
    the late window), stranger (not a neighbour), duplicate, invalid (does not fit the
    plans)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RoundRules:
    """How rounds close (see the module's text)."""

    sync: bool = True
    quorum: float = 0.5
    round_timeout_s: float = math.inf
    deadline_mads: float = 4.0
    deadline_floor_s: float = 0.25
    max_staleness: int = 4

    @property
    def late_window(self) -> int:
        """How many rounds back slices are still taken: strict rounds take only their own."""
        return 0 if self.sync else self.max_staleness


@dataclass(frozen=True)
class RoundOutcome:
    ctx: RoundContext
    stats: TrainStats
    merged_without: list[str]
    late_staleness: list[int]  # the staleness of each late slice merged
    on_time: int  # slices of this round merged
    round_s: float
    checkpoint_s: float | None
    local: Evaluation | None


@dataclass(frozen=True)
class Snapshot:
    """This peer's own slice after a round and the plan that cut it: what pulls of that round
    are served from (assembly takes each entry from the peers that held it). Slice-sized, so
    that keeping many rounds costs far less than one full copy (invariant 9)."""

    plan: Plan
    sliced: Params

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sliced.values())


# Snapshots kept whatever their size: the last round's and the one before (a joiner pulls the
# round before its join while its members may have finished one more).
SNAPSHOTS_ALWAYS_KEPT = 2


def snapshot_bytes_held(slice_bytes: int, kept: int, budget_bytes: float) -> float:
    """The most the snapshot rule (RoundDriver.keep_snapshot) holds for slices of this size."""
    return min(kept * slice_bytes, max(SNAPSHOTS_ALWAYS_KEPT * slice_bytes, budget_bytes))


@dataclass
class _Round:
    """This peer's context of one round and the counts each sender's slice must have."""

    ctx: RoundContext
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


class RoundDriver:
    def __init__(
        self, engine: Engine, roster: Roster, transport: SliceTransport,
        rules: RoundRules = RoundRules(), offload: Offload = run_inline,
        snapshots_kept: int = 0, evaluate_local: bool = False, slowdown: float = 1.0,
        checkpoint: Callable[[int, dict], float | None] | None = None,
        stopping: asyncio.Event | None = None, snapshot_budget_bytes: float = math.inf,
        reduce_parts: PartTransport | None = None,
    ) -> None:
        """`snapshots_kept`: this peer's slices after that many recent rounds are kept for pulls,
        the oldest dropped beyond `snapshot_budget_bytes` (but never the last
        SNAPSHOTS_ALWAYS_KEPT);
        `checkpoint(rounds, meta)` writes one after every round (worker) and returns seconds
        (None: it failed, and the next round writes the next one);
        `slowdown` > 1 makes local training take that many times as long (tests); `stopping`
        set abandons the round in progress; `reduce_parts` carries the reduce-scatter of
        entries three or more peers hold (peerd/algorithm/reduce.py; None: direct only)."""
        self.engine = engine
        self.peer_id = engine.peer_id
        self.roster = roster
        self.transport = transport
        self.rules = rules
        self.offload = offload
        self.snapshots_kept = snapshots_kept
        self.snapshot_budget_bytes = snapshot_budget_bytes
        self.evaluate_local = evaluate_local
        self.slowdown = slowdown
        self.checkpoint = checkpoint
        self.round_index = 0
        self.rounds_done = 0
        self.last_loss = float("nan")
        self.bytes_sent = 0
        self.bytes_received = 0
        self.snapshots: dict[int, Snapshot] = {}  # rounds done -> own slice
        self.stopping = stopping if stopping is not None else asyncio.Event()
        self._rounds: dict[int, _Round] = {}
        self._inbox: dict[int, dict[str, SliceMessage]] = {}
        self._arrived_at: dict[tuple[int, str], float] = {}  # (round, sender) -> monotonic time
        self._merged: set[tuple[int, str]] = set()  # (round, sender) slices already merged
        # (round, sender) slices being received: admitted, values still arriving. One stream
        # per slot: together with the round window and the neighbours, this bounds what peers
        # can make this peer hold (inbox_bound_bytes).
        self._receiving: set[tuple[int, str]] = set()
        self._delays = ArrivalDelays(rules.deadline_mads, rules.deadline_floor_s,
                                     rules.round_timeout_s)
        self._sends: set[asyncio.Task] = set()  # semi-async sends still under way
        self._arrived = asyncio.Event()
        self.parts = (None if reduce_parts is None else PartExchange(
            engine, reduce_parts, rules, self.context, offload, self.stopping))

    # ---- plans and what may arrive ---------------------------------------------------------

    def context(self, round_index: int) -> RoundContext:
        """This peer's context of a round, planned once per view of that round."""
        members = self.roster.members_at(round_index)
        assert members is not None, f"no view of round {round_index}"
        ordered = tuple(sorted(members, key=lambda member: member.peer_id))
        known = self._rounds.get(round_index)
        if known is None or known.ctx.members != ordered:
            known = self._rounds[round_index] = _Round(
                self.engine.begin_round(round_index, ordered))
        return known.ctx

    def expected_counts(self, ctx: RoundContext, sender: str) -> dict[str, int]:
        """How many values of each parameter `sender`'s slice of this round has: computed once
        per (round, sender)."""
        known = self._rounds.get(ctx.round_index)
        if known is None or known.ctx is not ctx:
            return self._direct_counts(ctx, sender)
        if sender not in known.counts:
            known.counts[sender] = self._direct_counts(ctx, sender)
        return known.counts[sender]

    def _direct_counts(self, ctx: RoundContext, sender: str) -> dict[str, int]:
        counts = self.engine.expected_counts(ctx, sender)
        return counts if self.parts is None else self.parts.direct_counts(ctx, sender, counts)

    def admit(self, round_index: int, sender: str, weight: float,
              receiving: bool = False) -> RoundContext:
        """The context a slice of `round_index` from `sender` with aggregation weight `weight`
        is checked against, or SliceRefused when this peer does not take it (cheap: before any
        value is read; both transports admit every slice here). `receiving`: the slice is the
        one whose stream holds the slot (see begin_receiving)."""
        if not valid_weight(weight):
            raise SliceRefused("invalid", f"slice from {sender}: weight {weight} invalid")
        if round_index > self.round_index + 1:
            # This peer is behind (a joiner still pulling its start, a slow peer that will skip
            # ahead): it will get there, so the sender retries.
            raise SliceRefused("later", f"slice for round {round_index}; this peer is only in "
                                        f"round {self.round_index}")
        oldest = self.round_index - self.rules.late_window
        if round_index < oldest:
            raise SliceRefused("stale", f"slice for round {round_index}; this peer is in round "
                                        f"{self.round_index} and takes rounds {oldest} to "
                                        f"{self.round_index + 1}")
        ctx = self.context(round_index)
        if sender not in ctx.neighbours:
            raise SliceRefused("stranger", f"{sender} is not a neighbour of {self.peer_id}")
        if sender in self._inbox.get(round_index, {}) or (round_index, sender) in self._merged:
            raise SliceRefused("duplicate",
                               f"round {round_index} slice from {sender} already arrived")
        if not receiving and (round_index, sender) in self._receiving:
            # Not final: the stream in flight may still be cut, and then a retry is welcome.
            raise SliceRefused("receiving",
                               f"round {round_index} slice from {sender} is being received")
        return ctx

    def begin_receiving(self, round_index: int, sender: str) -> None:
        """An admitted slice's stream starts: no twin stream is admitted until it ends."""
        self._receiving.add((round_index, sender))

    def end_receiving(self, round_index: int, sender: str) -> None:
        self._receiving.discard((round_index, sender))

    def inbox_bound_bytes(self, ctx: RoundContext) -> int:
        """The most slice bytes peers can make this peer hold in `ctx`'s round, received and
        being received: one slice per neighbour for each round it takes (the late window, this
        round and the next), none larger than what the plans give that neighbour to send.
        Counted with this round's plans (a later round's may differ by a peer's capacity, not
        by what it can send: at most its own slice)."""
        rounds = self.rules.late_window + 2
        per_round = sum(sum(self.expected_counts(ctx, sender).values())
                        for sender in ctx.neighbours)
        return rounds * per_round * self.engine.wire_dtype.itemsize

    def held_slice_bytes(self) -> int:
        """Slice bytes in the inbox now (received, not yet merged)."""
        return sum(values.numel() * values.element_size()
                   for messages in self._inbox.values() for message in messages.values()
                   for values in message.values.values())

    def accept(self, message: SliceMessage, payload_bytes: int, checked: bool = False) -> None:
        """Queue an arrived slice for merging. `checked`: the transport already checked every
        value against `expected_counts` (the gRPC decoder does, off the event loop); else it is
        checked here, once."""
        ctx = self.admit(message.round_index, message.sender, message.weight,
                         receiving=True)
        if not checked:
            try:
                self.engine.check_message(ctx, message,
                                          self.expected_counts(ctx, message.sender))
            except ValueError as error:
                raise SliceRefused("invalid", str(error)) from None
        self._inbox.setdefault(message.round_index, {})[message.sender] = message
        self._arrived_at[(message.round_index, message.sender)] = time.monotonic()
        self.bytes_received += payload_bytes
        self._arrived.set()

    # ---- one round -------------------------------------------------------------------------

    async def run_round(self) -> RoundOutcome | None:
        """Run round `round_index` to its end; None when it was abandoned (stopping, or this
        peer was dropped from the view)."""
        ctx = self.context(self.round_index)
        started = time.monotonic()
        stats = await self.offload(self.engine.train, ctx)
        if self.slowdown > 1:
            # A device this many times slower at training, without using the CPU.
            await asyncio.sleep((self.slowdown - 1) * (time.monotonic() - started))
        outgoing = await self.offload(self.engine.outbox, ctx)
        if self.parts is not None:
            outgoing = await self.offload(self.parts.trim_outbox, ctx, outgoing)
        if self.rules.sync:
            await self._send_all(ctx, outgoing)
        else:
            # Semi-async: a slow receiver must not hold this peer's round.
            send = asyncio.ensure_future(self._send_all(ctx, outgoing))
            self._sends.add(send)
            send.add_done_callback(self._sends.discard)
        missing = await self.collect(ctx)
        if missing is None:
            return None
        if self.parts is not None:
            await self.parts.finish(ctx)
        on_time, late = self._take_slices(ctx)
        if self.parts is not None:
            on_time, late = await self.offload(self.parts.expand_all, ctx, on_time, late)
        staleness = await self.offload(self.engine.merge_checked, ctx, on_time, late)
        if self.parts is not None:
            await self.parts.apply(ctx)
            sent, received = self.parts.drain_counts()
            self.bytes_sent, self.bytes_received = (self.bytes_sent + sent,
                                                    self.bytes_received + received)
        self.last_loss = stats.loss
        self.rounds_done += 1
        if self.snapshots_kept:
            self.keep_snapshot(ctx.round_index + 1, await self.offload(
                self.take_snapshot, self.engine.params, ctx.plans_now[self.peer_id]))
        checkpoint_s = None
        if self.checkpoint is not None:
            checkpoint_s = await self.offload(self.checkpoint, ctx.round_index + 1,
                                              self.checkpoint_meta(ctx.members))
        local = None
        if self.evaluate_local:
            local = await self.offload(self.engine.evaluate_local, ctx)
        self._forget_before(self.round_index)
        self.round_index += 1
        return RoundOutcome(ctx, stats, missing, staleness, len(on_time),
                            time.monotonic() - started, checkpoint_s, local)

    async def finish_sends(self) -> None:
        """Semi-async: wait for the last slices to reach the neighbours (each send ends at its
        own deadline)."""
        await asyncio.gather(*self._sends, return_exceptions=True)

    async def cancel_sends(self) -> None:
        for send in list(self._sends):
            send.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)

    async def _send_all(self, ctx: RoundContext, outgoing: list[SliceMessage]) -> None:
        acknowledged = await asyncio.gather(*(self.transport.push(ctx, message)
                                              for message in outgoing))
        self.bytes_sent += sum(acknowledged)
        if self.parts is not None:
            await self.parts.send_values(ctx)

    async def collect(self, ctx: RoundContext) -> list[str] | None:
        """Wait for every neighbour's slice of this round, but not for neighbours being dropped
        from the view; semi-async, only until the adaptive deadline once a quorum is in.
        Returns the neighbours merged without; None if stopping or dropped."""
        rules = self.rules
        ready_at = time.monotonic()
        timeout_at = ready_at + rules.round_timeout_s
        deadline_at = ready_at + self._delays.deadline_s()
        quorum = math.ceil(rules.quorum * len(ctx.neighbours))
        while True:
            if self.roster.dropped():
                log.warning("round %d abandoned: this peer is being dropped from the view",
                            ctx.round_index)
                return None
            arrived = self._inbox.get(ctx.round_index, {})
            leaving = self.roster.leaving()
            missing = [p for p in ctx.neighbours if p not in arrived]
            now = time.monotonic()
            if all(p in leaving for p in missing):
                if missing:
                    log.warning("round %d: merging without %s (being dropped from the view)",
                                ctx.round_index, ", ".join(missing))
                break
            if not rules.sync and now >= deadline_at and len(arrived) >= quorum:
                log.info("round %d: closing at the %.2f s deadline without %s",
                         ctx.round_index, deadline_at - ready_at, ", ".join(missing))
                break
            remaining = timeout_at - now
            if remaining <= 0:
                log.warning("round %d: no slice from %s after %.0f s; merging without",
                            ctx.round_index, ", ".join(missing), rules.round_timeout_s)
                break
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            stopper = asyncio.ensure_future(self.stopping.wait())
            # Woken at least every poll interval (a neighbour may start being dropped) and at
            # the deadline.
            wake = min(remaining, COLLECT_POLL_S)
            if not rules.sync and deadline_at > now:
                wake = min(wake, deadline_at - now)
            await asyncio.wait({waiter, stopper}, timeout=wake,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self.stopping.is_set():
                log.info("round %d abandoned: stopping", ctx.round_index)
                return None
        delays = sorted(self._arrived_at[(ctx.round_index, peer)] - ready_at for peer in arrived)
        if delays and len(delays) >= quorum:
            self._delays.record(delays[max(quorum, 1) - 1])
        return missing

    def _take_slices(self, ctx: RoundContext) -> tuple[list[SliceMessage], list[LateSlice]]:
        """Take this round's slices and the late ones of earlier rounds out of the inbox (what
        arrives from now on waits for the next merge); late ones beyond the window are
        dropped here."""
        round_index = ctx.round_index
        window = self.rules.late_window
        on_time = list(self._inbox.pop(round_index, {}).values())
        late: list[LateSlice] = []
        for old in sorted(r for r in self._inbox if r < round_index):
            for message in self._inbox.pop(old).values():
                self._merged.add((old, message.sender))
                if round_index - old <= window:
                    late.append(LateSlice(self.context(old), message))
                else:
                    log.info("round %d: dropping %s's slice of round %d (more than %d rounds "
                             "late)", round_index, message.sender, old, window)
        self._merged.update((round_index, message.sender) for message in on_time)
        self._merged = {(r, p) for r, p in self._merged if r >= round_index - window}
        self._arrived_at = {key: at for key, at in self._arrived_at.items()
                            if key[0] > round_index}
        return on_time, late

    def take_snapshot(self, params: Params, plan: Plan) -> Snapshot:
        """Worker: the plan's slice of `params`, copied."""
        return Snapshot(plan, slice_params(self.engine.spec, params, plan))

    def keep_snapshot(self, rounds_done: int, snapshot: Snapshot) -> None:
        self.snapshots[rounds_done] = snapshot
        kept = sorted(self.snapshots)
        while len(kept) > self.snapshots_kept or (
                len(kept) > SNAPSHOTS_ALWAYS_KEPT
                and sum(self.snapshots[r].nbytes for r in kept) > self.snapshot_budget_bytes):
            del self.snapshots[kept.pop(0)]

    def _forget_before(self, round_index: int) -> None:
        """Contexts of rounds whose slices may no longer arrive (the inbox empties as slices
        are merged)."""
        for old in [r for r in self._rounds if r < round_index - self.rules.late_window]:
            del self._rounds[old]

    def forget_rounds(self) -> None:
        """Everything about rounds in flight (this peer was dropped and joins again); streams
        still arriving give their slots back when they end."""
        self._rounds.clear()
        self._inbox.clear()
        self._arrived_at.clear()
        self._merged.clear()

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint_meta(self, members: Sequence[Member]) -> dict:
        return {"view": [view_entry(m) for m in members], "rounds_done": self.rounds_done,
                "train_loss": self.last_loss, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received}


def round_record(outcome: RoundOutcome, driver: RoundDriver, wall_s: float,
                 lag: LagFigures) -> dict:
    """A daemon's line in rounds.jsonl for one round."""
    ctx, stats, local = outcome.ctx, outcome.stats, outcome.local
    assert local is not None, "a daemon's driver evaluates every round"
    return {
        "round": ctx.round_index + 1, "peer_id": driver.peer_id, "train_loss": stats.loss,
        "local_acc": local.accuracy, "local_loss": local.loss, "local_ppl": local.perplexity,
        "samples": stats.samples, "forward_flops_per_sample": stats.forward_flops_per_sample,
        "train_flops": stats.train_flops, "bytes_sent_cum": driver.bytes_sent,
        "bytes_received_cum": driver.bytes_received, "neighbours": list(ctx.neighbours),
        "members": len(ctx.members), "round_s": outcome.round_s, "wall_s": wall_s,
        "checkpoint_s": outcome.checkpoint_s, "merged_without": outcome.merged_without,
        "late_merged_staleness": outcome.late_staleness,
        "loop_lag_p99_s": lag.p99_s, "loop_lag_max_s": lag.max_s,
        "params_full": sum(t.numel() for t in driver.engine.params.values()),
        "rss_peak_bytes": peak_rss_bytes(),
    }
