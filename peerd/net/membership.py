"""Who is in the round: peers known by handshake, and the views all members agree on.

Discovery only suggests addresses; a peer becomes *known* by a successful handshake, which
carries its id, capacity, round and its own idea of the members. The *view* (the members of
the run, sorted by id, with their capacities) is agreed without a coordinator.

The first view:
1. a peer that learns of a committed view that contains it, from a member still in that view's
   first round, adopts that view, once it has handshaken every member of it (it needs their
   capacities to compute their plans);
2. otherwise it commits its own candidate set (itself + every known peer) once that set has at
   least `min_peers` members and every other member reports exactly the same candidate set;
   the view starts at the round its members resume at (their checkpoints; `resume_round`).
Rule 1 makes the first committed view win: a peer that appears later joins instead of forking,
and a restarted member whose view has moved on waits to be dropped, then joins.

Joining a running view is a two-phase commit that the joiner coordinates for itself:
1. the joiner asks every member to let it in at a boundary round B (a few rounds ahead of the
   furthest member); a member accepts only if it has not started round B yet and no other
   join is pending with it, and lists its acceptance in its handshakes;
2. when every member has accepted, the joiner confirms; if any member refuses (it reached B
   first), the joiner withdraws and asks again for a later round.
A member that accepted waits at the start of round B until the joiner's decision is known, so
every member switches to the same view at the same round. Every slice carries the id of its
round's view; peers never merge slices across views.

Leaving: a member that has not been heard from *as a member* (a handshake reporting a view that
contains it) for `dead_after_s` is dropped by the survivors, without a coordinator:
1. a member that finds another silent proposes to drop it from its own next round (a leave
   ticket in its handshakes); a proposal is never withdrawn;
2. its *survivors* are the members of the view it does not propose to drop. It raises its
   ticket to the highest round any survivor proposes for the same member, and decides the
   leave at round L once the survivors are a quorum (more than half of the view, or half with
   its lowest id) and every one of them proposes round L and the same set of members to drop,
   or once one of them reports the leave decided (learnt then even without a proposal of its
   own). Values only ever grow towards the highest proposal among the survivors, so every
   survivor decides the same L;
3. a member does not start a round at or after its own ticket's round while the leave is
   undecided, so nobody has started round L when it is decided, and every survivor drops the
   member from round L on. Nobody waits for the slices of a member it proposes to drop.
Saying goodbye: a member that stops cleanly says so in its last handshakes (`leaving`), and a
member that comes back with no view after it was heard in this one has restarted; either way
it is *gone*: the others propose to drop it at once instead of after `dead_after_s`, and its
goodbye counts as its consent towards the quorum (it cannot be on the far side of a partition
that goes on without the others). It rejoins, like any new peer, once the leave is decided.

A member is out when a fellow member reports the leave of it decided, or a view since it
entered that lacks it; also when its own proposal stays undecided for GIVE_UP_AFTER times
`dead_after_s` (the others still hear that member: this one is the odd one out, e.g. after a
stall). Out, it rejoins like any new peer, with its id. See docs/NETWORK.md.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from peerd.algorithm.plan import Member, decode_widths, encode_widths
from peerd.v1 import peer_pb2

log = logging.getLogger("peerd.membership")

# Handshakes repeat every 0.5 s: a peer silent this long is gone (its mDNS record may linger).
STALE_AFTER_S = 5.0

# A member silent this long (as a member) is dropped from the view; `--dead-after` sets it.
DEAD_AFTER_S = 10.0

# A member whose proposal to drop another stays undecided this many times `dead_after_s`
# leaves itself: for a dead member every survivor proposes within a handshake or two.
GIVE_UP_AFTER = 3

# Members of a live run are at most a round or two apart (ring neighbours at most one), and a
# peer keeps its last few checkpoints (3 by default): a whole cluster restarted after a power
# cut resumes from the lowest of its members' checkpoint rounds within this window.
RESUME_WINDOW_ROUNDS = 2

# How far ahead of the furthest member a joiner asks to enter: rounds for its request to
# reach every member before any of them starts that round.
JOIN_MARGIN_ROUNDS = 3

# A peer outside every view of this one, silent this long, is forgotten: strangers that said
# Hello once do not stay in `known` for good.
FORGET_AFTER_S = 12 * STALE_AFTER_S


def proposed_join_round(peer_id: str, furthest_round: int) -> int:
    """Where a joiner asks to enter: the margin past the furthest member, plus a per-peer
    offset so that two joiners refused together do not collide again."""
    spread = zlib.crc32(peer_id.encode()) % JOIN_MARGIN_ROUNDS
    return furthest_round + JOIN_MARGIN_ROUNDS + spread


def resume_round(rounds: list[int]) -> int:
    """Where a first view starts, from its members' checkpoint rounds (0s left out): the lowest
    within RESUME_WINDOW_ROUNDS of the highest, so that members killed a round apart all resume
    from a checkpoint they have, while one that was down for long does not drag the others back
    (it starts from its own older parameters)."""
    if not rounds:
        return 0
    return min(r for r in rounds if r >= max(rounds) - RESUME_WINDOW_ROUNDS)


def has_quorum(survivors: set[str], view_ids: tuple[str, ...]) -> bool:
    """Whether these survivors may drop the rest of the view: more than half of it, or half
    with its lowest id. Two sides of a partition can never both have a quorum, so they never
    both go on (each dropping the other); the side without one waits."""
    if 2 * len(survivors) != len(view_ids):
        return 2 * len(survivors) > len(view_ids)
    return min(view_ids) in survivors


@dataclass(frozen=True)
class View:
    members: tuple[Member, ...]  # sorted by peer id

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(member.peer_id for member in self.members)

    @property
    def view_id(self) -> str:
        # A member's depth and learned widths enter the digest only where set, so views
        # without them keep their ids.
        text = ";".join(f"{m.peer_id}={m.mu!r}" + ("" if m.depth is None else f"/{m.depth}")
                        + ("" if m.widths is None else f"/{encode_widths(m.widths)}")
                        for m in self.members)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_view(members: list[Member]) -> View:
    return View(tuple(sorted(members, key=lambda member: member.peer_id)))


@dataclass
class KnownPeer:
    peer_id: str
    address: str
    mu: float
    round: int
    members: tuple[str, ...]
    view_id: str
    last_seen: float
    join_round: int = 0
    join_confirmed: bool = False
    accepted_joins: dict[str, int] = field(default_factory=dict)
    confirmed_joins: frozenset[str] = frozenset()  # joiners it has seen confirm
    view_round: int = 0  # the first round of the view in `members`
    leaves: dict[str, LeaveTicket] = field(default_factory=dict)
    last_member_seen: float = 0.0  # when it last reported a view that contains it
    bytes_sent: int = 0
    bytes_received: int = 0
    depth: int | None = None  # blocks it keeps (early exits); None: all
    frozen_blocks: int = 0
    widths: tuple[int, ...] = ()  # learned units per sliceable group; empty: uniform
    bulk_port: int = 0  # its bulk listener (peerd/net/bulk.py); 0: gRPC only

    def pending_leaves(self) -> frozenset[str]:
        return frozenset(p for p, ticket in self.leaves.items() if not ticket.decided)


@dataclass
class LeaveTicket:
    round: int  # pending: the proposed round (only ever raised); decided: the first round without
    decided: bool = False
    proposed_at: float = 0.0  # local clock; not on the wire


@dataclass
class Membership:
    me: Member
    address: str
    min_peers: int
    known: dict[str, KnownPeer] = field(default_factory=dict)
    views: list[tuple[int, View]] = field(default_factory=list)  # (first round, view)
    tickets: dict[str, int] = field(default_factory=dict)  # member: joiner -> accepted round
    join_round: int = 0  # joiner: the round asked for
    join_confirmed: bool = False
    dead_after_s: float = DEAD_AFTER_S
    leaves: dict[str, LeaveTicket] = field(default_factory=dict)  # member: whom it drops
    view_since: float = 0.0  # when the latest view was set: nobody is silent before that
    out_of_step: bool = False  # a decided leave fell before this peer's round: it rejoins
    clock: Callable[[], float] = time.time  # wall-clock seconds; tests pass their own
    frozen_blocks: int = 0  # this peer's, announced with its capacity
    # The model's sliceable groups in table order: what a peer's learned widths count.
    width_groups: tuple[str, ...] = ()
    stopping: bool = False  # this peer says goodbye in its handshakes
    bulk_port: int = 0  # this peer's bulk listener, announced in its handshakes
    gone: set[str] = field(default_factory=set)  # members that said goodbye or restarted
    # member: joiner -> when this peer began waiting at the joiner's round for its decision
    join_waits: dict[str, float] = field(default_factory=dict)

    def capacity(self) -> peer_pb2.Capacity:
        return peer_pb2.Capacity(mu=self.me.mu, depth=self.me.depth or 0,
                                 frozen_blocks=self.frozen_blocks,
                                 widths=encode_widths(self.me.widths or ()))

    def member(self, peer_id: str) -> Member:
        """A known peer (or this one) as the planner takes it."""
        if peer_id == self.me.peer_id:
            return self.me
        peer = self.known[peer_id]
        widths = decode_widths(self.width_groups, peer.widths) if peer.widths else None
        return Member(peer_id, peer.mu, peer.depth, widths)

    @property
    def first_round(self) -> int:
        """The round this peer entered its run at (the first view's first round)."""
        return self.views[0][0] if self.views else 0

    @property
    def view(self) -> View | None:
        """The latest view (the one of the current or a coming round)."""
        return self.views[-1][1] if self.views else None

    def view_at(self, round_index: int) -> View | None:
        chosen = None
        for first_round, view in self.views:
            if first_round <= round_index:
                chosen = view
        return chosen

    def observe(self, hello: peer_pb2.Hello, my_round: int) -> None:
        """Record what a handshake told us about a peer (either direction)."""
        if hello.peer_id == self.me.peer_id:
            return
        previous = self.known.get(hello.peer_id)
        now = self.clock()
        is_member = bool(hello.view_id) and hello.peer_id in hello.members
        peer = KnownPeer(
            peer_id=hello.peer_id, address=hello.address, mu=hello.capacity.mu,
            round=hello.round, members=tuple(hello.members), view_id=hello.view_id,
            last_seen=now, join_round=hello.join_round,
            join_confirmed=hello.join_confirmed,
            accepted_joins={t.peer_id: t.round for t in hello.accepted_joins},
            confirmed_joins=frozenset(t.peer_id for t in hello.accepted_joins if t.confirmed),
            view_round=hello.view_round,
            leaves={t.peer_id: LeaveTicket(t.round, t.decided) for t in hello.leaves},
            last_member_seen=now if is_member else 0.0,
            depth=hello.capacity.depth or None, frozen_blocks=hello.capacity.frozen_blocks,
            widths=tuple(hello.capacity.widths), bulk_port=hello.bulk_port,
        )
        if previous is not None:
            peer.bytes_sent, peer.bytes_received = previous.bytes_sent, previous.bytes_received
            if not is_member:
                peer.last_member_seen = previous.last_member_seen
        gone = hello.leaving or self._restarted(previous, hello)
        if gone and hello.peer_id in self._view_ids():
            if hello.peer_id not in self.gone:
                log.info("%s %s: dropping it without waiting for silence", hello.peer_id,
                         "says goodbye" if hello.leaving else "has restarted")
            self.gone.add(hello.peer_id)
        self.known[hello.peer_id] = peer
        self._consider_join_request(peer, my_round)

    def _restarted(self, previous: KnownPeer | None, hello: peer_pb2.Hello) -> bool:
        """A member heard in the current view since it was set now reports no view at all:
        it restarted (or left the run). Right after a view is set nothing is inferred: its
        members commit it a handshake apart."""
        return (previous is not None and not hello.view_id and self.view_since > 0
                and previous.last_member_seen >= self.view_since)

    def silent_for(self, peer_id: str) -> float:
        """Seconds since any handshake with this peer (infinite if never heard from)."""
        known = self.known.get(peer_id)
        return self.clock() - known.last_seen if known is not None else float("inf")

    def claims_elsewhere(self, peer_id: str, address: str) -> bool:
        """True when another address already speaks for this peer id (a duplicate id); a peer
        silent for a while may come back at another address (a restarted daemon)."""
        known = self.known.get(peer_id)
        return peer_id == self.me.peer_id or (
            known is not None and known.address != address
            and self.clock() - known.last_seen < STALE_AFTER_S)

    def candidate_ids(self) -> tuple[str, ...]:
        """Itself and every peer heard from recently: who the first view would contain."""
        now = self.clock()
        alive = [p for p, peer in self.known.items() if now - peer.last_seen < STALE_AFTER_S]
        return tuple(sorted([self.me.peer_id, *alive]))

    # ---- the first view ----------------------------------------------------------------------

    def try_commit(self, my_round: int = 0) -> View | None:
        """Commit the first view by the rules above; None while there is nothing to agree on.

        `my_round` is the round this peer would resume at (0: no checkpoint). Rule 2 starts
        the view at the lowest such round among the candidates that have one, so that a cluster
        restarted as a whole continues together; rule 1 starts it where its reporter did.
        """
        if self.view is not None:
            return self.view
        if self._dropping_me():
            return None  # a restarted member the others are dropping: it joins afterwards
        for peer, adopted in self._reported_views(containing_me=True):
            # Only a view some member is still in the first round of: a restarted member whose
            # view has moved on must wait to be dropped and join (its round is long gone).
            if peer.round == peer.view_round:
                self._set_views([(peer.view_round, adopted)])
                return adopted
        candidates = self.candidate_ids()
        if len(candidates) < self.min_peers:
            return None
        others = [self.known[p] for p in candidates if p != self.me.peer_id]
        if all(peer.members == candidates and not peer.view_id for peer in others):
            rounds = [r for r in (my_round, *(peer.round for peer in others)) if r > 0]
            self._set_views([(resume_round(rounds), self._view_of(candidates))])
        return self.view

    def _reported_views(self, containing_me: bool) -> list[tuple[KnownPeer, View]]:
        """The committed views known peers report, whose members are all known to us."""
        found = []
        for peer in sorted(self.known.values(), key=lambda p: p.peer_id):
            if not peer.view_id or (self.me.peer_id in peer.members) != containing_me:
                continue
            if not all(p == self.me.peer_id or p in self.known for p in peer.members):
                continue
            view = self._view_of(peer.members)
            if view.view_id == peer.view_id:
                found.append((peer, view))
        return found

    def _set_views(self, views: list[tuple[int, View]]) -> None:
        self.views = sorted(views, key=lambda entry: entry[0])
        self.view_since = self.clock()

    def _view_of(self, ids: tuple[str, ...]) -> View:
        return make_view([self.member(p) for p in ids])

    # ---- joining: the members' side ----------------------------------------------------------

    def _consider_join_request(self, peer: KnownPeer, my_round: int) -> None:
        view = self.view
        if view is None or peer.peer_id in view.ids:
            return
        if not peer.join_round:
            self.tickets.pop(peer.peer_id, None)
            return
        if self.tickets.get(peer.peer_id) == peer.join_round:
            return
        # One open join at a time: a second joiner's vote would not include the first one; and
        # none while a leave is open (its round must not fall before the join's).
        busy = any(p != peer.peer_id for p in self.tickets) or bool(self.leaves)
        if peer.join_round > my_round and not busy:
            self.tickets[peer.peer_id] = peer.join_round

    def settle_joins(self, round_index: int) -> bool:
        """At the start of a round: apply the joins decided for it. False while a joiner that
        was accepted for this round has not decided yet (the caller waits).

        A joiner silent for `dead_after_s` decides nothing more: it joined if a member reports
        having seen its confirmation (the leave rule then drops it), else its ticket lapses.
        """
        for joiner, join_round in sorted(self.tickets.items()):
            if join_round != round_index:
                continue
            peer = self.known[joiner]
            confirmed = peer.join_round == round_index and peer.join_confirmed
            if peer.join_round == round_index and not confirmed:
                # A joiner that keeps answering but never decides holds this round for at
                # most `dead_after_s`, like a silent one.
                waiting_since = self.join_waits.setdefault(joiner, self.clock())
                now = self.clock()
                if (now - peer.last_seen < self.dead_after_s
                        and now - waiting_since < self.dead_after_s):
                    return False
                confirmed = any(joiner in self.known[p].confirmed_joins
                                for p in self._view_ids() if p in self.known)
            del self.tickets[joiner]
            self.join_waits.pop(joiner, None)
            if confirmed and self.view is not None:
                self._change_from(round_index, add=self.member(joiner))
        return True

    def undecided_before(self, round_index: int) -> bool:
        """True while a join or a leave at or before this round is undecided (its view is not
        known)."""
        return (any(r <= round_index for r in self.tickets.values())
                or any(not t.decided and t.round <= round_index for t in self.leaves.values()))

    # ---- joining: the joiner's side ----------------------------------------------------------

    def running_view(self) -> View | None:
        """The committed view of a run this peer is not part of yet."""
        found = self._reported_views(containing_me=False)
        return found[0][1] if found else None

    def advance_join(self) -> View | None:
        """One step of the joiner's protocol; the view it enters with, once confirmed."""
        running = self.running_view()
        if running is None or self.join_confirmed:
            return None
        members = [self.known[p] for p in running.ids]
        if any(m.pending_leaves() for m in members):
            # A member is being dropped and will never accept: ask again once it is out.
            self.join_round = 0
            return None
        if self.join_round:
            if all(m.accepted_joins.get(self.me.peer_id) == self.join_round for m in members):
                self.join_confirmed = True
                joined = make_view([*running.members, self.me])
                self._set_views([(self.join_round, joined)])
                return joined
            if not any(m.round >= self.join_round and
                       m.accepted_joins.get(self.me.peer_id) != self.join_round
                       for m in members):
                return None
        self.join_round = proposed_join_round(self.me.peer_id, max(m.round for m in members))
        return None

    # ---- leaving ------------------------------------------------------------------------------

    def _view_ids(self) -> tuple[str, ...]:
        return self.view.ids if self.view is not None else ()

    def _dropping_me(self) -> bool:
        """True when a member heard from lately reports a leave ticket for this peer."""
        now = self.clock()
        return any(self.me.peer_id in peer.leaves for peer in self.known.values()
                   if peer.peer_id in peer.members and now - peer.last_seen < STALE_AFTER_S)

    def dropped(self) -> bool:
        """True when this peer is out of the view (see the rules above) and must join again."""
        if self.view is None:
            return False
        me = self.me.peer_id
        fellows = [self.known[p] for p in self.view.ids if p in self.known]
        return self.out_of_step or any(
            (me in peer.leaves and peer.leaves[me].decided)
            or (peer.peer_id in peer.members and me not in peer.members
                and peer.view_round >= self.first_round)
            for peer in fellows)

    def leaving(self) -> frozenset[str]:
        """Members this peer drops (decided or not): nobody waits for their slices."""
        return frozenset(self.leaves)

    def tick(self, my_round: int) -> None:
        """Propose, raise and decide leaves (rules 1 and 2 of leaving); called after every
        handshake and periodically."""
        view = self.view
        if view is None or self.me.peer_id not in view.ids:
            return
        now = self.clock()
        # A leave must not fall before a join this member accepted: it would change the view
        # the joiner confirmed.
        floor = max([my_round + 1, *(r + 1 for r in self.tickets.values())])
        for member in view.ids:
            if member == self.me.peer_id or member in self.leaves:
                continue
            peer = self.known.get(member)
            seen = max(peer.last_member_seen if peer else 0.0, self.view_since)
            if member in self.gone:
                self.leaves[member] = LeaveTicket(floor, proposed_at=now)
                log.info("proposing to drop %s from round %d: it is gone", member, floor)
            elif now - seen >= self.dead_after_s:
                self.leaves[member] = LeaveTicket(floor, proposed_at=now)
                log.warning("proposing to drop %s from round %d: not heard from as a member "
                            "for %.1f s", member, floor, now - seen)
        self._decide_leaves(my_round)
        self._forget_leaves(my_round)
        self._forget_strangers()
        stuck = [p for p, t in self.leaves.items()
                 if not t.decided and now - t.proposed_at >= GIVE_UP_AFTER * self.dead_after_s]
        if stuck and not self.out_of_step:
            log.warning("the others do not agree to drop %s: this peer leaves the view and joins "
                        "again", ", ".join(stuck))
            self.out_of_step = True

    def _survivors(self) -> list[KnownPeer]:
        """The fellow members this peer does not propose to drop."""
        return [self.known[p] for p in self._view_ids() if p != self.me.peer_id
                and p in self.known and p not in self.leaves]

    def _decide_leaves(self, my_round: int) -> None:
        # A leave a survivor reports decided is decided, whether or not this peer found the
        # member silent too (e.g. a joiner whose view began after the others decided).
        for member in self._view_ids():
            decided = [peer.leaves[member].round for peer in self._survivors()
                       if member in peer.leaves and peer.leaves[member].decided]
            if member != self.me.peer_id and decided:
                self._apply_leave(member, decided[0], my_round)
        pending = {p for p, ticket in self.leaves.items() if not ticket.decided}
        survivors = self._survivors()
        view_ids = set(self._view_ids())
        # A member that said goodbye consents to its own leave.
        consenting = {self.me.peer_id, *(peer.peer_id for peer in survivors),
                      *(self.gone & view_ids)}
        quorum = has_quorum(consenting, self._view_ids())
        for member in sorted(pending):
            ticket = self.leaves[member]
            reports = [peer.leaves.get(member) for peer in survivors]
            ticket.round = max([ticket.round, *(r.round for r in reports if r is not None)])
            if quorum and all(r is not None and r.round == ticket.round for r in reports) and all(
                    peer.pending_leaves() & view_ids == pending for peer in survivors):
                self._apply_leave(member, ticket.round, my_round)

    def _apply_leave(self, member: str, first_round: int, my_round: int) -> None:
        self.leaves[member] = LeaveTicket(first_round, decided=True)
        self.gone.discard(member)
        log.info("decided: %s leaves the view from round %d", member, first_round)
        if first_round < my_round:
            # Cannot happen while every survivor follows the rule; should it, this peer's views
            # disagree with the others': it leaves (the daemon sees dropped()) and joins again.
            self.out_of_step = True
            return
        self._change_from(first_round, remove=member)

    def _change_from(self, first_round: int, remove: str | None = None,
                     add: Member | None = None) -> None:
        """Remove or add a member in the view of `first_round` and of every later round (a
        later view may already be known: a join or leave decided for a later round)."""
        def changed(view: View) -> View:
            kept = [m for m in view.members if m.peer_id != remove]
            return make_view(kept + ([add] if add is not None else []))

        base = self.view_at(first_round)
        later = [(r, changed(v)) for r, v in self.views if r >= first_round]
        if base is not None and all(r != first_round for r, _ in later):
            later.append((first_round, changed(base)))
        self._set_views([(r, v) for r, v in self.views if r < first_round] + later)

    def _forget_leaves(self, my_round: int) -> None:
        """Drop decided tickets once every survivor is past their round (all have decided)."""
        for member, ticket in list(self.leaves.items()):
            if not ticket.decided or member == self.me.peer_id or my_round <= ticket.round:
                continue
            others = [p for p in self._view_ids() if p != self.me.peer_id]
            if all(p in self.known and self.known[p].round > ticket.round for p in others):
                del self.leaves[member]

    def _forget_strangers(self) -> None:
        """Forget peers outside every view of this one, without a ticket here, silent for
        FORGET_AFTER_S."""
        now = self.clock()
        in_views = {p for _, view in self.views for p in view.ids}
        for peer_id, peer in list(self.known.items()):
            if (peer_id not in in_views and peer_id not in self.tickets
                    and now - peer.last_seen >= FORGET_AFTER_S):
                del self.known[peer_id]

    def settle_leaves(self, round_index: int) -> bool:
        """At the start of a round: False while a leave that may take effect at this round is
        undecided (the caller waits; the view of the round is not known yet)."""
        return not any(not t.decided and t.round <= round_index for t in self.leaves.values())

    def rejoin(self) -> None:
        """Forget the run this peer was dropped from: it joins again like a new peer."""
        self.views = []
        self.tickets = {}
        self.join_waits = {}
        self.gone = set()
        self.leaves = {}
        self.join_round = 0
        self.join_confirmed = False
        self.out_of_step = False

    def hello(self, protocol_version: int, cluster: str, fingerprint: str, round_index: int
              ) -> peer_pb2.Hello:
        view = self.view
        members = view.ids if view is not None else self.candidate_ids()
        confirmed = {p for p in self.tickets
                     if p in self.known and self.known[p].join_confirmed
                     and self.known[p].join_round == self.tickets[p]}
        return peer_pb2.Hello(
            protocol_version=protocol_version, cluster=cluster, peer_id=self.me.peer_id,
            model_fingerprint=fingerprint, capacity=self.capacity(),
            address=self.address, round=round_index, members=members,
            view_id=view.view_id if view is not None else "",
            join_round=self.join_round, join_confirmed=self.join_confirmed,
            accepted_joins=[peer_pb2.JoinTicket(peer_id=p, round=r, confirmed=p in confirmed)
                            for p, r in sorted(self.tickets.items())],
            view_round=self.views[-1][0] if self.views else 0,
            leaves=[peer_pb2.LeaveTicket(peer_id=p, round=t.round, decided=t.decided)
                    for p, t in sorted(self.leaves.items())],
            leaving=self.stopping, bulk_port=self.bulk_port,
        )
