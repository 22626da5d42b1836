"""Reduce-scatter and all-gather over holders: each shared entry is averaged once, by one peer.

The direct exchange (aggregate.py) sends every holder's values of an entry to every other
holder, so h holders move (h - 1) x their slice each. Here, entries that three or more peers
hold this round are cut into parts, one per holder; each holder sends the *owner* of a part its
values there (reduce-scatter), the owner averages them and sends the mean back to every peer
that holds the part now or next round (all-gather): about 2 (h - 1) / h x the slice each.

Parts are a pure function of the plans (like the plans themselves, never negotiated): per
parameter, entries are grouped by the exact set of members holding them now; a group of three
or more holders is cut, in row-major order, into as many contiguous runs as it has holders, the
i-th run owned by the i-th holder in id order. It applies only where every holder reaches every
other directly (a fully connected topology); otherwise there are no parts and the direct
exchange carries everything, as before.

The mean is the one the direct exchange computes, with the same float32 operations in the same
order: the holders' values times their weights summed in id order, divided by the weights
summed in id order. So in a synchronous round every holder ends with the value the direct
exchange gives the holder first in id order, bit for bit (the direct exchange sums a peer's
own value first, so its other holders may differ from that in the last bits; here they all
agree). With a wire precision below float32 the mean comes back rounded to it.

Everything else (entries held by one or two peers, and every entry in another topology) goes
through the direct exchange with the reduced entries cut out of each message.

Semi-asynchronous rounds: an owner waits for the other holders' values until the round closes
plus the shortest deadline (`RoundRules.deadline_floor_s`), then averages what came (its own
value included); a value that comes later is dropped. A holder waits for a part's mean as
long after that; when the owner is late, the holder keeps its own value of those entries this
round (they enter the next round's mean like any other), and a mean that comes later is
dropped. Late parts are never folded in with a staleness weight: a mean already contains this
holder's older value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from peerd.algorithm.aggregate import exchange_count, exchange_mask, holds_all
from peerd.algorithm.engine import LateSlice
from peerd.algorithm.numerics import all_finite, valid_weight
from peerd.algorithm.submodel import Params, entry_mask
from peerd.algorithm.transport import SliceMessage
from peerd.models.base import ModelSpec, holds_param

if TYPE_CHECKING:
    from peerd.algorithm.driver import RoundRules
    from peerd.algorithm.engine import Engine, RoundContext
    from peerd.algorithm.plan import Member

log = logging.getLogger("peerd.algorithm.reduce")

MIN_HOLDERS = 3
# Holder sets are encoded as bits of an int64 per entry.
MAX_MEMBERS = 62
WAIT_POLL_S = 0.05

PartKind = Literal["values", "mean"]
# Flat entry indices; a slice where a run is contiguous (every entry held by every member).
Entries = torch.Tensor | slice


def entry_count(entries: Entries) -> int:
    return entries.stop - entries.start if isinstance(entries, slice) else entries.numel()


@dataclass(frozen=True)
class Part:
    """A run of entries of one parameter that `holders` hold this round, averaged by `owner`."""

    name: str
    owner: str
    holders: tuple[str, ...]  # in id order: the order of the mean's sums
    entries: Entries  # flat (row-major) indices into the parameter
    # Who gets the mean (all but the owner) -> which of the part's entries: None for all of them.
    targets: dict[str, torch.Tensor | None]


@dataclass(frozen=True)
class PartPlan:
    parts: tuple[Part, ...]
    reduced: dict[str, torch.Tensor]  # parameter -> flat mask of the entries some part holds

    def owned_by(self, owner: str) -> list[Part]:
        return [part for part in self.parts if part.owner == owner]

    def values_count(self, sender: str, owner: str) -> dict[str, int]:
        """How many values of each parameter `sender` sends `owner` (a message lists every
        parameter, empty where it has none)."""
        counts = {name: 0 for name in self.reduced}
        for part in self.owned_by(owner):
            if sender in part.holders and sender != owner:
                counts[part.name] += entry_count(part.entries)
        return counts

    def mean_count(self, owner: str, target: str) -> dict[str, int]:
        counts = {name: 0 for name in self.reduced}
        for part in self.owned_by(owner):
            if target in part.targets:
                counts[part.name] += entry_count(_entries_for(part, target))
        return counts

    def peers_to_hear(self, peer_id: str, kind: PartKind) -> set[str]:
        """Who sends `peer_id` a message of `kind` this round."""
        if kind == "values":
            return {h for part in self.owned_by(peer_id) for h in part.holders if h != peer_id}
        return {part.owner for part in self.parts if peer_id in part.targets}


def plan_parts(spec: ModelSpec, params: Params, ctx: RoundContext,
               fully_connected: bool) -> PartPlan:
    """The parts of one round, the same on every peer (a function of the plans alone)."""
    ids = [member.peer_id for member in ctx.members]
    parts: list[Part] = []
    reduced: dict[str, torch.Tensor] = {}
    for name, tensor in params.items():
        reduced[name] = torch.zeros(tensor.numel(), dtype=torch.bool)
        if not fully_connected or len(ids) < MIN_HOLDERS or len(ids) > MAX_MEMBERS:
            continue
        if all(holds_all(spec, ctx.plans_now[peer], name, tensor.shape) for peer in ids):
            # Every member holds every entry (mu = 1): contiguous runs, no masks at all.
            reduced[name][:] = True
            bounds = [tensor.numel() * position // len(ids) for position in range(len(ids) + 1)]
            parts += [Part(name, owner, tuple(ids), slice(bounds[i], bounds[i + 1]),
                           {peer: None for peer in ids if peer != owner})
                      for i, owner in enumerate(ids)]
            continue
        now = [_held(spec, ctx.plans_now[peer], name, tensor.shape) for peer in ids]
        later = [_held(spec, ctx.plans_next[peer], name, tensor.shape) for peer in ids]
        code = torch.zeros(tensor.numel(), dtype=torch.int64)
        for bit, held in enumerate(now):
            code |= held.to(torch.int64) << bit
        for holder_set in torch.unique(code).tolist():
            holders = tuple(peer for bit, peer in enumerate(ids) if holder_set >> bit & 1)
            if len(holders) < MIN_HOLDERS:
                continue
            entries = torch.nonzero(code == holder_set).flatten()
            reduced[name][entries] = True
            for owner, run in zip(holders, torch.tensor_split(entries, len(holders)),
                                  strict=True):
                targets: dict[str, torch.Tensor | None] = {}
                for position, peer in enumerate(ids):
                    if peer == owner:
                        continue
                    if peer in holders:
                        targets[peer] = None
                    elif bool(later[position][run].any()):
                        targets[peer] = later[position][run]
                parts.append(Part(name, owner, holders, run, targets))
    return PartPlan(tuple(parts), reduced)


def _held(spec: ModelSpec, plan: dict, name: str, shape: torch.Size) -> torch.Tensor:
    if not holds_param(spec, plan, name):
        return torch.zeros(shape.numel(), dtype=torch.bool)
    return entry_mask(spec, plan, name, shape).reshape(-1)


def _flat(params: Params, name: str) -> torch.Tensor:
    return params[name].reshape(-1)


def values_for(plan: PartPlan, params: Params, sender: str, owner: str,
               wire_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The values `sender` sends `owner`: its own values of each part that owner averages."""
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in plan.reduced}
    for part in plan.owned_by(owner):
        if sender in part.holders:
            pieces[part.name].append(_flat(params, part.name)[part.entries])
    return _joined(pieces, params, wire_dtype)


def _joined(pieces: Mapping[str, list[torch.Tensor]], params: Params,
            wire_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: (torch.cat(chunks) if chunks
                   else torch.empty(0, dtype=params[name].dtype)).to(wire_dtype)
            for name, chunks in pieces.items()}


def reduce_owned(plan: PartPlan, params: Params, owner: str, own_weight: float,
                 received: Mapping[str, SliceMessage]) -> dict[int, torch.Tensor]:
    """The mean of every part `owner` averages, over the holders whose values are in
    (`received`: holder -> its values message); keyed by the part's position in the plan.

    The same float32 operations, in the same order, as aggregate.merge on the holder first in
    id order: sum of value x weight in id order, divided by the sum of weights in id order."""
    offsets: dict[tuple[str, str], int] = {}  # (holder, parameter) -> next value to read
    means: dict[int, torch.Tensor] = {}
    for position, part in enumerate(plan.parts):
        if part.owner != owner:
            continue
        total: torch.Tensor | None = None
        weight_sum: torch.Tensor | None = None
        own = _flat(params, part.name)
        for holder in part.holders:
            if holder == owner:
                values, weight = own[part.entries], own_weight
            else:
                message = received.get(holder)
                start = offsets.get((holder, part.name), 0)
                offsets[(holder, part.name)] = start + entry_count(part.entries)
                if message is None:
                    continue
                values = message.values[part.name][start:start + entry_count(part.entries)]
                values, weight = values.to(own.dtype), message.weight
            if total is None or weight_sum is None:
                total = values * weight
                weight_sum = torch.tensor(weight, dtype=own.dtype)
            else:
                total += values * weight
                weight_sum = weight_sum + weight
        assert total is not None and weight_sum is not None  # the owner is a holder
        means[position] = total.div_(weight_sum)
    return means


def mean_for(plan: PartPlan, means: Mapping[int, torch.Tensor], params: Params, owner: str,
             target: str, wire_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The means `owner` sends `target`: of the entries of its parts that target holds now or
    next round."""
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in plan.reduced}
    for position, part in enumerate(plan.parts):
        if part.owner == owner and target in part.targets:
            selected = part.targets[target]
            mean = means[position]
            pieces[part.name].append(mean if selected is None else mean[selected])
    return _joined(pieces, params, wire_dtype)


def _entries_for(part: Part, peer_id: str) -> Entries:
    """The entries of a part whose mean `peer_id` gets (a target of it)."""
    selected = part.targets[peer_id]
    return part.entries if selected is None else part.entries[selected]


def kept_values(plan: PartPlan, params: Params, peer_id: str,
                missing: set[str]) -> dict[int, torch.Tensor]:
    """This peer's own values of the parts whose owner's mean did not come (`missing`
    owners), taken before the direct merge touches them; keyed by part position."""
    return {position: _flat(params, part.name)[_entries_for(part, peer_id)].clone()
            for position, part in enumerate(plan.parts)
            if part.owner in missing and peer_id in part.targets}


def apply_means(plan: PartPlan, params: Params, peer_id: str,
                means: Mapping[int, torch.Tensor], received: Mapping[str, SliceMessage],
                kept: Mapping[int, torch.Tensor]) -> None:
    """Write the parts' means into this peer's parameters: its own parts' (`means`) and those
    the owners sent (`received`: owner -> its mean message). Parts whose mean did not come get
    this peer's value back (`kept`): the direct merge filled them with zeros."""
    offsets: dict[tuple[str, str], int] = {}
    for position, part in enumerate(plan.parts):
        flat = _flat(params, part.name)
        if part.owner == peer_id:
            flat[part.entries] = means[position]
            continue
        if peer_id not in part.targets:
            continue
        entries = _entries_for(part, peer_id)
        start = offsets.get((part.owner, part.name), 0)
        offsets[(part.owner, part.name)] = start + entry_count(entries)
        message = received.get(part.owner)
        if message is not None:
            flat[entries] = message.values[part.name][start:start + entry_count(entries)].to(
                flat.dtype)
        else:
            flat[entries] = kept[position]


def direct_keep(spec: ModelSpec, plan: PartPlan, ctx: RoundContext, sender: str,
                receiver: str, name: str, shape: torch.Size) -> torch.Tensor:
    """Which values of the direct message sender -> receiver stay (the reduced ones go)."""
    sent = exchange_mask(spec, name, shape, ctx.plans_now[sender], ctx.plans_now[receiver],
                         ctx.plans_next[receiver]).reshape(-1)
    return ~plan.reduced[name][sent]


def trim(spec: ModelSpec, plan: PartPlan, ctx: RoundContext, message: SliceMessage,
         params: Params) -> SliceMessage:
    """A direct message without the entries the parts carry."""
    values = {}
    for name, flat in message.values.items():
        if bool(plan.reduced[name].all()):
            flat = flat[:0]
        elif bool(plan.reduced[name].any()):
            keep = direct_keep(spec, plan, ctx, message.sender, message.receiver, name,
                               params[name].shape)
            flat = flat[keep]
        values[name] = flat
    return replace(message, values=values)


def expand(spec: ModelSpec, plan: PartPlan, ctx: RoundContext, message: SliceMessage,
           params: Params) -> SliceMessage:
    """A trimmed direct message back at full length, zeros where the parts' entries were: the
    direct merge then computes every other entry exactly as before (it works entry by entry),
    and `apply_means` overwrites the zero-filled ones."""
    values = {}
    for name, flat in message.values.items():
        if bool(plan.reduced[name].all()):
            flat = torch.zeros(exchange_count(
                spec, name, params[name].shape, ctx.plans_now[message.sender],
                ctx.plans_now[message.receiver], ctx.plans_next[message.receiver]),
                dtype=flat.dtype)
        elif bool(plan.reduced[name].any()):
            keep = direct_keep(spec, plan, ctx, message.sender, message.receiver, name,
                               params[name].shape)
            full = torch.zeros(keep.numel(), dtype=flat.dtype)
            full[keep] = flat
            flat = full
        values[name] = flat
    return replace(message, values=values)


def direct_counts(spec: ModelSpec, plan: PartPlan, ctx: RoundContext, sender: str,
                  receiver: str, params: Params, counts: dict[str, int]) -> dict[str, int]:
    """`Engine.expected_counts` less the reduced entries."""
    return {name: (0 if bool(plan.reduced[name].all())
                   else int(direct_keep(spec, plan, ctx, sender, receiver, name,
                                        params[name].shape).sum())
                   if bool(plan.reduced[name].any()) else count)
            for name, count in counts.items()}


def _check_values(message: SliceMessage, expected: Mapping[str, int],
                  wire_dtype: torch.dtype) -> None:
    """Refuse a part message that does not fit the plan: names, dtype, counts, finite values
    and weight."""
    sender = message.sender
    if not valid_weight(message.weight):
        raise PartRefused(f"part from {sender}: weight {message.weight} invalid")
    if set(message.values) != set(expected):
        raise PartRefused(f"part from {sender}: wrong parameter names")
    for name, values in message.values.items():
        if values.dtype != wire_dtype or values.dim() != 1 or values.numel() != expected[name]:
            raise PartRefused(f"part from {sender}: {name} is {values.dtype} x "
                              f"{tuple(values.shape)}, the plan says {wire_dtype} x "
                              f"({expected[name]},)")
        if not all_finite(values):
            raise PartRefused(f"part from {sender}: {name} has non-finite values")


# ---- the exchange of parts within a round ------------------------------------------------------


@dataclass(frozen=True)
class PartMessage:
    """One peer's values of the parts an owner averages ("values"), or an owner's means
    ("mean"); `weight` is the sender's aggregation weight."""

    kind: PartKind
    message: SliceMessage


class PartTransport(Protocol):
    async def push_part(self, ctx: RoundContext, part: PartMessage) -> int:
        """Deliver one part message; the payload bytes acknowledged (0: not delivered)."""
        ...


class PartRefused(Exception):
    """A part message this peer does not take; the text says which rule refused it."""


@dataclass
class _RoundParts:
    members: tuple[Member, ...]  # the view the plan was made for
    plan: PartPlan
    values: dict[str, SliceMessage] = field(default_factory=dict)  # holder -> its values
    means: dict[str, SliceMessage] = field(default_factory=dict)  # owner -> its means
    closed: set[PartKind] = field(default_factory=set)
    own_means: dict[int, torch.Tensor] = field(default_factory=dict)  # part position -> mean
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # parts whose mean is missing


class PartExchange:
    """One peer's side of the parts: plans them per round, sends its values and means, takes
    what the others send (checked against the plan), and waits for it by the round's rules."""

    def __init__(self, engine: Engine, transport: PartTransport, rules: RoundRules,
                 context: Callable[[int], RoundContext],
                 offload: Callable[..., Awaitable[object]], stopping: asyncio.Event) -> None:
        """`context(round)`: this peer's context of a round (the round driver's)."""
        self.engine = engine
        self.context = context
        self.peer_id = engine.peer_id
        self.transport = transport
        self.rules = rules
        self.offload = offload
        self.stopping = stopping
        self.bytes_sent = 0
        self.bytes_received = 0
        self._rounds: dict[int, _RoundParts] = {}
        self._applied_up_to = -1  # rounds up to this one took their means: later parts dropped
        self._arrived = asyncio.Event()
        # `plan` runs on the event loop (a part's header) and on offload threads (trim_outbox,
        # expand_all): without it, a thread planning a round could replace the state a part
        # arrived into meanwhile with an empty one, and the round would wait for that part.
        self._planning = threading.Lock()

    def plan(self, ctx: RoundContext) -> PartPlan:
        with self._planning:
            known = self._rounds.get(ctx.round_index)
            # A new view of the round (a member dropped meanwhile) plans again; what arrived
            # for the old one does not fit the new parts.
            if known is None or known.members != ctx.members:
                ids = [member.peer_id for member in ctx.members]
                fully_connected = all(len(self.engine.topology.neighbours(ids, peer))
                                      == len(ids) - 1 for peer in ids)
                known = self._rounds[ctx.round_index] = _RoundParts(ctx.members, plan_parts(
                    self.engine.spec, self.engine.params, ctx, fully_connected))
            return known.plan

    # ---- the direct messages, less the parts --------------------------------------------------

    def trim_outbox(self, ctx: RoundContext, outgoing: Sequence[SliceMessage]
                    ) -> list[SliceMessage]:
        plan = self.plan(ctx)
        return [trim(self.engine.spec, plan, ctx, message, self.engine.params)
                for message in outgoing]

    def direct_counts(self, ctx: RoundContext, sender: str,
                      counts: dict[str, int]) -> dict[str, int]:
        return direct_counts(self.engine.spec, self.plan(ctx), ctx, sender, self.peer_id,
                             self.engine.params, counts)

    def expand_all(self, ctx: RoundContext, on_time: Sequence[SliceMessage],
                   late: Sequence[LateSlice]) -> tuple[list[SliceMessage], list[LateSlice]]:
        """The direct slices taken for a merge, back at full length (see `expand`); a late
        one with its own round's parts."""
        spec, params = self.engine.spec, self.engine.params
        return ([expand(spec, self.plan(ctx), ctx, message, params) for message in on_time],
                [LateSlice(stale.ctx, expand(spec, self.plan(stale.ctx), stale.ctx,
                                             stale.message, params)) for stale in late])

    # ---- receiving ---------------------------------------------------------------------------

    def expected_part(self, kind: PartKind, round_index: int, sender: str,
                      receiver: str) -> dict[str, int]:
        """How many values of each parameter a part message must carry, from its header alone;
        PartRefused when this peer does not take it."""
        if kind not in ("values", "mean"):
            raise PartRefused(f"part kind {kind!r} from {sender} is neither values nor mean")
        if round_index <= self._applied_up_to:
            raise PartRefused(f"{kind} of round {round_index} from {sender} came after that "
                              f"round's merge")
        self.plan(self.context(round_index))
        state = self._rounds[round_index]
        if kind in state.closed:
            raise PartRefused(f"{kind} of round {round_index} from {sender}: that round's "
                              f"parts are closed here")
        plan = state.plan
        if receiver != self.peer_id or sender not in plan.peers_to_hear(self.peer_id, kind):
            raise PartRefused(f"{sender} sends {self.peer_id} no {kind} in round {round_index}")
        if sender in (state.values if kind == "values" else state.means):
            raise PartRefused(f"{kind} of round {round_index} from {sender} already arrived")
        return (plan.values_count(sender, self.peer_id) if kind == "values"
                else plan.mean_count(sender, self.peer_id))

    def accept_part(self, part: PartMessage, payload_bytes: int, checked: bool = False) -> None:
        """Take an arrived part message, or PartRefused naming what does not fit. `checked`:
        the transport's decoder already checked every value against `expected_part`."""
        message = part.message
        expected = self.expected_part(part.kind, message.round_index, message.sender,
                                      message.receiver)
        if not checked:
            _check_values(message, expected, self.engine.wire_dtype)
        state = self._rounds[message.round_index]
        inbox = state.values if part.kind == "values" else state.means
        inbox[message.sender] = message
        self.bytes_received += payload_bytes
        self._arrived.set()

    async def _wait(self, ctx: RoundContext, kind: PartKind, closed_at: float) -> None:
        """Until every expected message of `kind` is in; semi-async: at most the shortest
        deadline after the round closed."""
        state = self._rounds[ctx.round_index]
        expected = state.plan.peers_to_hear(self.peer_id, kind)
        inbox = state.values if kind == "values" else state.means
        rules = self.rules
        give_up_at = closed_at + (rules.round_timeout_s if rules.sync
                                  else rules.deadline_floor_s)
        while not expected <= set(inbox) and not self.stopping.is_set():
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                log.info("round %d: no %s from %s by the deadline (dropped if it comes later)",
                         ctx.round_index, kind,
                         ", ".join(sorted(expected - set(inbox))))
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, WAIT_POLL_S))
        state.closed.add(kind)

    # ---- one round ---------------------------------------------------------------------------

    async def send_values(self, ctx: RoundContext) -> None:
        """Reduce-scatter: this peer's values of every part another holder averages."""
        plan, engine = self.plan(ctx), self.engine
        owners = sorted({part.owner for part in plan.parts
                         if self.peer_id in part.holders and part.owner != self.peer_id})
        messages = []
        for owner in owners:
            values = await self.offload(values_for, plan, engine.params, self.peer_id, owner,
                                        engine.wire_dtype)
            messages.append(SliceMessage(self.peer_id, owner, ctx.round_index, engine.weight,
                                         values))
        await self._push_all(ctx, "values", messages)

    async def _push_all(self, ctx: RoundContext, kind: PartKind,
                        messages: Sequence[SliceMessage]) -> None:
        acknowledged = await asyncio.gather(*(
            self.transport.push_part(ctx, PartMessage(kind, message)) for message in messages))
        self.bytes_sent += sum(acknowledged)

    async def finish(self, ctx: RoundContext) -> None:
        """After the direct slices are in: average this peer's parts, send the means, wait for
        the other owners' means. `apply` writes them once the direct merge is done."""
        self.plan(ctx)
        state = self._rounds[ctx.round_index]
        plan, engine = state.plan, self.engine
        await self._wait(ctx, "values", time.monotonic())
        means = await self.offload(reduce_owned, plan, engine.params, self.peer_id,
                                   engine.weight, dict(state.values))
        state.values.clear()
        state.own_means = means
        targets = sorted({t for part in plan.owned_by(self.peer_id) for t in part.targets})
        messages = []
        for target in targets:
            values = await self.offload(mean_for, plan, means, engine.params, self.peer_id,
                                        target, engine.wire_dtype)
            messages.append(SliceMessage(self.peer_id, target, ctx.round_index, engine.weight,
                                         values))
        await self._push_all(ctx, "mean", messages)
        await self._wait(ctx, "mean", time.monotonic())
        missing = {part.owner for part in plan.parts if self.peer_id in part.targets} - set(
            state.means)
        if missing:
            state.kept = await self.offload(kept_values, plan, engine.params, self.peer_id,
                                            missing)

    def drain_counts(self) -> tuple[int, int]:
        """Payload bytes of part messages sent and received since the last call."""
        counts = (self.bytes_sent, self.bytes_received)
        self.bytes_sent = self.bytes_received = 0
        return counts

    async def apply(self, ctx: RoundContext) -> None:
        state = self._rounds[ctx.round_index]
        await self.offload(apply_means, state.plan, self.engine.params, self.peer_id,
                           state.own_means, state.means, state.kept)
        state.own_means, state.means, state.kept = {}, {}, {}
        self._applied_up_to = ctx.round_index
        # Plans stay while late direct slices of their round may still be merged.
        for old in [r for r in self._rounds if r < ctx.round_index - self.rules.late_window]:
            del self._rounds[old]
