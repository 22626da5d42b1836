"""Who is in the round: peers known by handshake, and the view all members agree on.

Discovery only suggests addresses; a peer becomes *known* by a successful handshake, which
carries its id, capacity, round and its own idea of the members. The *view* (the members of
the run, sorted by id) is committed without a coordinator:

1. a peer that learns of a committed view that contains it adopts that view, once it has
   handshaken every member of it (it needs their capacities to compute their plans);
2. otherwise it commits its own candidate set (itself + every known peer) once that set has at
   least `min_peers` members and every other member reports exactly the same candidate set.

Rule 1 makes the first committed view win: a peer that appears after some member has committed
waits outside the view instead of forking the run. Every message carries the view id, a digest
of the members and their capacities, so peers with different views never merge each other's
slices.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from peerd.plan import Member
from peerd.v1 import peer_pb2


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
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Membership:
    me: Member
    address: str
    min_peers: int
    known: dict[str, KnownPeer] = field(default_factory=dict)
    view: View | None = None

    def observe(self, hello: peer_pb2.Hello) -> None:
        """Record what a handshake told us about a peer (either direction)."""
        if hello.peer_id == self.me.peer_id:
            return
        previous = self.known.get(hello.peer_id)
        peer = KnownPeer(
            peer_id=hello.peer_id, address=hello.address, mu=hello.capacity.mu,
            round=hello.round, members=tuple(hello.members), view_id=hello.view_id,
            last_seen=time.time(),
        )
        if previous is not None:
            peer.bytes_sent, peer.bytes_received = previous.bytes_sent, previous.bytes_received
        self.known[hello.peer_id] = peer

    def claims_elsewhere(self, peer_id: str, address: str) -> bool:
        """True when another address already speaks for this peer id (a duplicate id)."""
        known = self.known.get(peer_id)
        return peer_id == self.me.peer_id or (known is not None and known.address != address)

    def candidate_ids(self) -> tuple[str, ...]:
        return tuple(sorted([self.me.peer_id, *self.known]))

    def try_commit(self) -> View | None:
        """Commit a view by the rules above; None while there is nothing to agree on yet."""
        if self.view is not None:
            return self.view
        adopted = self._adoptable_view()
        if adopted is not None:
            self.view = adopted
            return adopted
        candidates = self.candidate_ids()
        if len(candidates) < self.min_peers:
            return None
        if all(self.known[p].members == candidates and not self.known[p].view_id
               for p in candidates if p != self.me.peer_id):
            self.view = self._view_of(candidates)
        return self.view

    def _adoptable_view(self) -> View | None:
        for peer in sorted(self.known.values(), key=lambda p: p.peer_id):
            if not peer.view_id or self.me.peer_id not in peer.members:
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

    def hello(self, protocol_version: int, cluster: str, fingerprint: str, round_index: int
              ) -> peer_pb2.Hello:
        members = self.view.ids if self.view is not None else self.candidate_ids()
        return peer_pb2.Hello(
            protocol_version=protocol_version, cluster=cluster, peer_id=self.me.peer_id,
            model_fingerprint=fingerprint, capacity=peer_pb2.Capacity(mu=self.me.mu),
            address=self.address, round=round_index, members=members,
            view_id=self.view.view_id if self.view is not None else "",
        )
