"""Who is in the round: peers known by handshake, and the views all members agree on.

Discovery only suggests addresses; a peer becomes *known* by a successful handshake, which
carries its id, capacity, round and its own idea of the members. The *view* (the members of
the run, sorted by id, with their capacities) is agreed without a coordinator.

The first view:
1. a peer that learns of a committed view that contains it adopts that view, once it has
   handshaken every member of it (it needs their capacities to compute their plans);
2. otherwise it commits its own candidate set (itself + every known peer) once that set has at
   least `min_peers` members and every other member reports exactly the same candidate set.
Rule 1 makes the first committed view win: a peer that appears later joins instead of forking.

Joining a running view is a two-phase commit that the joiner coordinates for itself:
1. the joiner asks every member to let it in at a boundary round B (a few rounds ahead of the
   furthest member); a member accepts only if it has not started round B yet and no other
   join is pending with it, and lists its acceptance in its handshakes;
2. when every member has accepted, the joiner confirms; if any member refuses (it reached B
   first), the joiner withdraws and asks again for a later round.
A member that accepted waits at the start of round B until the joiner's decision is known, so
every member switches to the same view at the same round. Every slice carries the id of its
round's view; peers never merge slices across views.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, field

from peerd.plan import Member
from peerd.v1 import peer_pb2

# Handshakes repeat every 0.5 s: a peer silent this long is gone (its mDNS record may linger).
STALE_AFTER_S = 5.0

# How far ahead of the furthest member a joiner asks to enter: rounds for its request to
# reach every member before any of them starts that round.
JOIN_MARGIN_ROUNDS = 3


def proposed_join_round(peer_id: str, furthest_round: int) -> int:
    """Where a joiner asks to enter: the margin past the furthest member, plus a per-peer
    offset so that two joiners refused together do not collide again."""
    spread = zlib.crc32(peer_id.encode()) % JOIN_MARGIN_ROUNDS
    return furthest_round + JOIN_MARGIN_ROUNDS + spread


@dataclass(frozen=True)
class View:
    members: tuple[Member, ...]  # sorted by peer id

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(member.peer_id for member in self.members)

    @property
    def view_id(self) -> str:
        text = ";".join(f"{m.peer_id}={m.mu!r}" for m in self.members)
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
    bytes_sent: int = 0
    bytes_received: int = 0


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
        peer = KnownPeer(
            peer_id=hello.peer_id, address=hello.address, mu=hello.capacity.mu,
            round=hello.round, members=tuple(hello.members), view_id=hello.view_id,
            last_seen=time.time(), join_round=hello.join_round,
            join_confirmed=hello.join_confirmed,
            accepted_joins={t.peer_id: t.round for t in hello.accepted_joins},
        )
        if previous is not None:
            peer.bytes_sent, peer.bytes_received = previous.bytes_sent, previous.bytes_received
        self.known[hello.peer_id] = peer
        self._consider_join_request(peer, my_round)

    def claims_elsewhere(self, peer_id: str, address: str) -> bool:
        """True when another address already speaks for this peer id (a duplicate id)."""
        known = self.known.get(peer_id)
        return peer_id == self.me.peer_id or (known is not None and known.address != address)

    def candidate_ids(self) -> tuple[str, ...]:
        """Itself and every peer heard from recently: who the first view would contain."""
        now = time.time()
        alive = [p for p, peer in self.known.items() if now - peer.last_seen < STALE_AFTER_S]
        return tuple(sorted([self.me.peer_id, *alive]))

    # ---- the first view ----------------------------------------------------------------------

    def try_commit(self) -> View | None:
        """Commit the first view by the rules above; None while there is nothing to agree on."""
        if self.view is not None:
            return self.view
        adopted = self._reported_view(containing_me=True)
        if adopted is not None:
            self.views.append((0, adopted))
            return adopted
        candidates = self.candidate_ids()
        if len(candidates) < self.min_peers:
            return None
        if all(self.known[p].members == candidates and not self.known[p].view_id
               for p in candidates if p != self.me.peer_id):
            self.views.append((0, self._view_of(candidates)))
        return self.view

    def _reported_view(self, containing_me: bool) -> View | None:
        """A committed view some known peer reports, whose members are all known to us."""
        for peer in sorted(self.known.values(), key=lambda p: p.peer_id):
            if not peer.view_id or (self.me.peer_id in peer.members) != containing_me:
                continue
            if not all(p == self.me.peer_id or p in self.known for p in peer.members):
                continue
            view = self._view_of(peer.members)
            if view.view_id == peer.view_id:
                return view
        return None

    def _view_of(self, ids: tuple[str, ...]) -> View:
        return make_view([
            self.me if p == self.me.peer_id else Member(p, self.known[p].mu) for p in ids
        ])

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
        # One open join at a time: a second joiner's vote would not include the first one.
        busy = any(p != peer.peer_id for p in self.tickets)
        if peer.join_round > my_round and not busy:
            self.tickets[peer.peer_id] = peer.join_round

    def settle_joins(self, round_index: int) -> bool:
        """At the start of a round: apply the joins decided for it. False while a joiner that
        was accepted for this round has not decided yet (the caller waits)."""
        for joiner, join_round in sorted(self.tickets.items()):
            if join_round != round_index:
                continue
            peer = self.known[joiner]
            if peer.join_round == round_index and not peer.join_confirmed:
                return False
            del self.tickets[joiner]
            if peer.join_round == round_index and self.view is not None:
                joined = make_view([*self.view.members, Member(joiner, peer.mu)])
                self.views.append((round_index, joined))
        return True

    def undecided_before(self, round_index: int) -> bool:
        """True while a join at or before this round is undecided (its view is not known)."""
        return any(r <= round_index for r in self.tickets.values())

    # ---- joining: the joiner's side ----------------------------------------------------------

    def running_view(self) -> View | None:
        """The committed view of a run this peer is not part of yet."""
        return self._reported_view(containing_me=False)

    def advance_join(self) -> View | None:
        """One step of the joiner's protocol; the view it enters with, once confirmed."""
        running = self.running_view()
        if running is None or self.join_confirmed:
            return None
        members = [self.known[p] for p in running.ids]
        if self.join_round:
            if all(m.accepted_joins.get(self.me.peer_id) == self.join_round for m in members):
                self.join_confirmed = True
                joined = make_view([*running.members, self.me])
                self.views = [(self.join_round, joined)]
                return joined
            if not any(m.round >= self.join_round and
                       m.accepted_joins.get(self.me.peer_id) != self.join_round
                       for m in members):
                return None
        self.join_round = proposed_join_round(self.me.peer_id, max(m.round for m in members))
        return None

    def hello(self, protocol_version: int, cluster: str, fingerprint: str, round_index: int
              ) -> peer_pb2.Hello:
        view = self.view
        members = view.ids if view is not None else self.candidate_ids()
        return peer_pb2.Hello(
            protocol_version=protocol_version, cluster=cluster, peer_id=self.me.peer_id,
            model_fingerprint=fingerprint, capacity=peer_pb2.Capacity(mu=self.me.mu),
            address=self.address, round=round_index, members=members,
            view_id=view.view_id if view is not None else "",
            join_round=self.join_round, join_confirmed=self.join_confirmed,
            accepted_joins=[peer_pb2.JoinTicket(peer_id=p, round=r)
                            for p, r in sorted(self.tickets.items())],
        )
