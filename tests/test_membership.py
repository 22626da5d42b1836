"""Membership without a network: the first view (rules 1 and 2) and joining a running view.

Several `Membership` objects stand for peers; a handshake is simulated by making each side
observe the other's `hello(...)` (or a `peer_pb2.Hello` built by hand), with its own round.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from peerd.algorithm.plan import Member
from peerd.net import PROTOCOL_VERSION
from peerd.net.membership import (
    GIVE_UP_AFTER,
    JOIN_MARGIN_ROUNDS,
    RESUME_WINDOW_ROUNDS,
    STALE_AFTER_S,
    Membership,
    View,
    has_quorum,
    make_view,
    proposed_join_round,
    resume_round,
)
from peerd.v1 import peer_pb2

CLUSTER = "unit"
FINGERPRINT = "fp-unit"


@dataclass
class Node:
    """One simulated peer: its membership and the round it is in."""

    membership: Membership
    round: int = 0

    @property
    def peer_id(self) -> str:
        return self.membership.me.peer_id

    def hello(self) -> peer_pb2.Hello:
        return self.membership.hello(PROTOCOL_VERSION, CLUSTER, FINGERPRINT, self.round)

    def sees(self, *others: Node) -> None:
        """Observe each of the others' current hello (one direction of a handshake)."""
        for other in others:
            self.membership.observe(other.hello(), self.round)


def node(peer_id: str, mu: float = 0.5, min_peers: int = 3) -> Node:
    address = f"10.0.0.{int(peer_id.rsplit('-', 1)[1]) + 1}:50051"
    return Node(Membership(Member(peer_id, mu), address, min_peers))


def handshake(client: Node, server: Node) -> None:
    """The client sends its hello, the server admits it and replies with its own."""
    server.sees(client)
    client.sees(server)


def exchange(nodes: Iterable[Node]) -> None:
    """Everyone observes a snapshot of everyone else's hello (taken before any observes)."""
    nodes = list(nodes)
    hellos = {n.peer_id: n.hello() for n in nodes}
    for n in nodes:
        for peer_id, hello in hellos.items():
            if peer_id != n.peer_id:
                n.membership.observe(hello, n.round)


def meet(nodes: Iterable[Node]) -> None:
    """Two rounds of handshakes: everyone learns of everyone, then sees their candidate sets."""
    nodes = list(nodes)
    exchange(nodes)
    exchange(nodes)


def hand_hello(peer_id: str, *, address: str = "10.9.9.9:50051", mu: float = 0.5,
               round_index: int = 0, members: Iterable[str] = (), view_id: str = "",
               join_round: int = 0, join_confirmed: bool = False,
               accepted: Iterable[tuple[str, int]] = ()) -> peer_pb2.Hello:
    return peer_pb2.Hello(
        protocol_version=PROTOCOL_VERSION, cluster=CLUSTER, peer_id=peer_id,
        model_fingerprint=FINGERPRINT, capacity=peer_pb2.Capacity(mu=mu), address=address,
        round=round_index, members=list(members), view_id=view_id, join_round=join_round,
        join_confirmed=join_confirmed,
        accepted_joins=[peer_pb2.JoinTicket(peer_id=p, round=r) for p, r in accepted],
    )


MUS = (0.5, 0.25, 1.0)


def committed(rounds: tuple[int, ...] = (4, 5, 5)) -> list[Node]:
    """Three members that agreed on their first view, then moved on to `rounds`."""
    nodes = [node(f"peer-0{i}", mu) for i, mu in enumerate(MUS)]
    meet(nodes)
    views = [n.membership.try_commit() for n in nodes]
    assert all(v is not None and v == views[0] for v in views)
    for n, round_index in zip(nodes, rounds, strict=True):
        n.round = round_index
    exchange(nodes)
    return nodes


def tickets_in(hello: peer_pb2.Hello) -> dict[str, int]:
    return {t.peer_id: t.round for t in hello.accepted_joins}


# ---- views ---------------------------------------------------------------------------------


def test_view_id_is_stable_and_covers_members_and_capacities() -> None:
    base = [Member("a", 0.5), Member("b", 0.25), Member("c", 1.0)]
    view = make_view(base)
    assert view.view_id == make_view(list(base)).view_id == view.view_id
    assert len(view.view_id) == 16 and int(view.view_id, 16) >= 0
    # The order members are given in does not matter: the view is sorted.
    assert make_view(base[::-1]).view_id == view.view_id
    # Another member, a missing member, a renamed member, another capacity: another id.
    others = [
        [*base, Member("d", 0.5)],
        base[:2],
        [Member("a", 0.5), Member("b", 0.25), Member("x", 1.0)],
        [Member("a", 0.5), Member("b", 0.125), Member("c", 1.0)],
    ]
    ids = {make_view(members).view_id for members in others}
    assert len(ids) == len(others) and view.view_id not in ids


def test_make_view_sorts_by_peer_id() -> None:
    view = make_view([Member("peer-10", 1.0), Member("peer-02", 0.5), Member("peer-07", 0.25)])
    assert view.ids == ("peer-02", "peer-07", "peer-10")
    assert view.members == (Member("peer-02", 0.5), Member("peer-07", 0.25),
                            Member("peer-10", 1.0))
    assert view == View(view.members)


# ---- the first view, rule 2: agree on the candidate set ------------------------------------


def test_peers_that_saw_each_others_candidates_commit_the_same_view() -> None:
    nodes = [node(f"peer-0{i}", mu) for i, mu in enumerate(MUS)]
    for n in nodes:
        assert n.membership.try_commit() is None  # nobody known yet
    exchange(nodes)
    for n in nodes:  # everyone knows everyone, but saw hellos from before that
        assert n.membership.candidate_ids() == ("peer-00", "peer-01", "peer-02")
        assert n.membership.try_commit() is None
    exchange(nodes)
    views = [n.membership.try_commit() for n in nodes]
    expected = make_view([Member(f"peer-0{i}", mu) for i, mu in enumerate(MUS)])
    for n, view in zip(nodes, views, strict=True):
        assert view == expected
        assert view is not None and view.view_id == expected.view_id
        assert n.membership.view is view and n.membership.view_at(0) is view
        # The committed view is now what the peer reports.
        hello = n.hello()
        assert tuple(hello.members) == expected.ids and hello.view_id == expected.view_id
    # Committing is idempotent.
    assert nodes[0].membership.try_commit() is views[0]
    assert len(nodes[0].membership.views) == 1


def test_no_commit_below_min_peers() -> None:
    nodes = [node(f"peer-0{i}", mu, min_peers=4) for i, mu in enumerate(MUS)]
    meet(nodes)
    for n in nodes:
        assert n.membership.try_commit() is None
        assert n.membership.view is None
        assert n.hello().view_id == ""


def test_no_commit_while_candidate_sets_differ() -> None:
    a, b, c = (node(f"peer-0{i}", mu) for i, mu in enumerate(MUS))
    d = node("peer-03")
    meet([a, b, c])
    handshake(d, a)  # d has met a only
    exchange([a, b, c])
    assert a.membership.candidate_ids() == ("peer-00", "peer-01", "peer-02", "peer-03")
    assert b.membership.candidate_ids() == c.membership.candidate_ids() == (
        "peer-00", "peer-01", "peer-02")
    assert d.membership.candidate_ids() == ("peer-00", "peer-03")
    for n in (a, b, c, d):
        assert n.membership.try_commit() is None
        assert n.membership.view is None
    # Once d has met everyone and everyone has seen everyone's set, all four agree.
    handshake(d, b)
    handshake(d, c)
    meet([a, b, c, d])
    views = [n.membership.try_commit() for n in (a, b, c, d)]
    assert views[0] is not None
    assert views[0].ids == ("peer-00", "peer-01", "peer-02", "peer-03")
    assert {v.view_id for v in views if v is not None} == {views[0].view_id}
    assert all(v == views[0] for v in views)


def test_a_committed_peer_blocks_rule_2() -> None:
    """A known peer that reports a committed view is not a candidate that agrees."""
    members = ("peer-00", "peer-01", "peer-02")
    other = make_view([Member("peer-00", 0.5), Member("peer-01", 0.5), Member("peer-02", 0.5)])
    c = node("peer-02")
    # peer-00 reports a committed view whose capacities c cannot reproduce (peer-01's differs).
    c.membership.observe(hand_hello("peer-00", address="10.0.0.1:50051", members=members,
                                    view_id=other.view_id), 0)
    c.membership.observe(hand_hello("peer-01", address="10.0.0.2:50051", mu=0.25,
                                    members=members), 0)
    assert c.membership.try_commit() is None


# ---- the first view, rule 1: adopt a committed view ----------------------------------------


def test_adopts_a_reported_view_only_once_it_knows_every_member() -> None:
    ids = ("peer-00", "peer-01", "peer-02")
    reported = make_view([Member(p, mu) for p, mu in zip(ids, MUS, strict=True)])
    c = node("peer-02", mu=MUS[2])
    # peer-00 committed {00, 01, 02} and waits in its first round; c has not met peer-01 yet.
    c.membership.observe(hand_hello("peer-00", address="10.0.0.1:50051", mu=MUS[0],
                                    members=ids, view_id=reported.view_id), 0)
    assert c.membership.try_commit() is None  # peer-01's capacity is unknown to c
    assert c.membership.view is None and c.hello().view_id == ""
    # peer-01 is still a candidate that has not met c: rule 2 cannot apply, rule 1 can.
    c.membership.observe(hand_hello("peer-01", address="10.0.0.2:50051", mu=MUS[1],
                                    members=("peer-00", "peer-01")), 0)
    view = c.membership.try_commit()
    assert view is not None
    assert view == reported and view.view_id == reported.view_id
    assert {m.peer_id: m.mu for m in view.members} == dict(zip(ids, MUS, strict=True))
    assert c.membership.view_at(0) is view and c.membership.views == [(0, view)]
    assert c.hello().view_id == reported.view_id


def test_adopts_only_with_the_capacities_the_reporter_used() -> None:
    members = ("peer-00", "peer-01", "peer-02")
    reported = make_view([Member("peer-00", 0.5), Member("peer-01", 1.0),
                          Member("peer-02", 0.25)])
    c = node("peer-02", mu=0.25)
    c.membership.observe(hand_hello("peer-00", address="10.0.0.1:50051", mu=0.5,
                                    members=members, view_id=reported.view_id, round_index=3), 0)
    # c knows peer-01 with another capacity than the reporter did: the ids differ.
    c.membership.observe(hand_hello("peer-01", address="10.0.0.2:50051", mu=0.5,
                                    members=members, view_id=reported.view_id), 0)
    assert c.membership.try_commit() is None
    c.membership.observe(hand_hello("peer-01", address="10.0.0.2:50051", mu=1.0,
                                    members=members, view_id=reported.view_id), 0)
    view = c.membership.try_commit()
    assert view == reported and view is not None and view.view_id == reported.view_id


def test_a_peer_outside_a_committed_view_becomes_a_joiner() -> None:
    members = committed(rounds=(2, 2, 2))
    view = members[0].membership.view
    assert view is not None
    # Knowing one member is not enough to see the running view (capacities!), nor to commit.
    d = node("peer-03", min_peers=2)
    handshake(d, members[0])
    assert d.membership.try_commit() is None
    assert d.membership.running_view() is None
    for member in members[1:]:
        handshake(d, member)
    # d knows every member: it sees the running view but never adopts it nor commits its own.
    for _ in range(2):
        assert d.membership.try_commit() is None
        assert d.membership.view is None
        running = d.membership.running_view()
        assert running == view and running is not None and running.view_id == view.view_id
    assert d.hello().view_id == ""
    # The members are unmoved: d is no candidate of theirs.
    for member in members:
        assert member.membership.views == [(0, view)] and member.membership.tickets == {}


def test_running_view_ignores_views_that_contain_me() -> None:
    members = committed()
    for member in members:
        assert member.membership.running_view() is None


# ---- duplicate ids -------------------------------------------------------------------------


def test_claims_elsewhere() -> None:
    a = node("peer-00")
    own = a.membership.address
    assert a.membership.claims_elsewhere("peer-00", own)
    assert a.membership.claims_elsewhere("peer-00", "10.0.0.7:50051")
    assert not a.membership.claims_elsewhere("peer-05", "10.0.0.6:50051")  # unknown
    a.membership.observe(hand_hello("peer-05", address="10.0.0.6:50051"), 0)
    assert not a.membership.claims_elsewhere("peer-05", "10.0.0.6:50051")  # same address
    assert a.membership.claims_elsewhere("peer-05", "10.0.0.8:50051")


def test_silent_for_counts_from_the_last_handshake() -> None:
    a = node("peer-00")
    assert a.membership.silent_for("peer-05") == float("inf")
    a.membership.observe(hand_hello("peer-05"), 0)
    a.membership.known["peer-05"].last_seen -= 7.5
    assert 7.5 <= a.membership.silent_for("peer-05") < 8.5
    a.membership.observe(hand_hello("peer-05"), 0)
    assert a.membership.silent_for("peer-05") < 1.0


def test_observe_ignores_my_own_hello_and_keeps_traffic_counters() -> None:
    a = node("peer-00")
    a.membership.observe(a.hello(), 0)
    assert a.membership.known == {}
    a.membership.observe(hand_hello("peer-01", round_index=1), 0)
    a.membership.known["peer-01"].bytes_sent = 10
    a.membership.known["peer-01"].bytes_received = 20
    a.membership.observe(hand_hello("peer-01", round_index=2, mu=0.25), 0)
    peer = a.membership.known["peer-01"]
    assert (peer.round, peer.mu, peer.bytes_sent, peer.bytes_received) == (2, 0.25, 10, 20)


# ---- joining a running view ----------------------------------------------------------------


def test_join_happy_path() -> None:
    members = committed(rounds=(4, 5, 5))
    olds = {m.peer_id: m.membership.view for m in members}
    j = node("peer-09", mu=0.125)
    for member in members:
        handshake(j, member)
    assert j.membership.try_commit() is None
    assert j.membership.advance_join() is None
    join_round = proposed_join_round("peer-09", 5)
    assert join_round >= 5 + JOIN_MARGIN_ROUNDS
    assert j.membership.join_round == join_round and not j.membership.join_confirmed
    assert j.hello().join_round == join_round

    # Members see the request (with their current rounds) and accept it.
    for member in members:
        old = olds[member.peer_id]
        assert member.membership.tickets == {}
        member.sees(j)
        assert member.membership.tickets == {"peer-09": join_round}
        assert tickets_in(member.hello()) == {"peer-09": join_round}
        assert member.membership.undecided_before(join_round)
        assert member.membership.undecided_before(join_round + 5)
        assert not member.membership.undecided_before(join_round - 1)
        # Not confirmed yet: the member waits at the start of the join round.
        assert not member.membership.settle_joins(join_round)
        assert member.membership.view_at(join_round) is old

    # Until every member's acceptance is seen, the joiner waits with the same round.
    j.sees(members[0], members[1])
    assert j.membership.advance_join() is None
    assert j.membership.join_round == join_round and not j.membership.join_confirmed
    j.sees(members[2])
    joined = j.membership.advance_join()
    assert joined is not None
    assert joined.ids == ("peer-00", "peer-01", "peer-02", "peer-09")
    assert Member("peer-09", 0.125) in joined.members
    assert j.membership.join_confirmed and j.membership.join_round == join_round
    assert j.membership.view_at(join_round) is joined
    assert j.membership.view_at(join_round - 1) is None
    assert j.membership.advance_join() is None  # decided
    hello = j.hello()
    assert hello.join_confirmed and hello.view_id == joined.view_id

    for member in members:
        old = olds[member.peer_id]
        assert not member.membership.settle_joins(join_round)  # has not seen the decision
        member.sees(j)
        assert member.membership.undecided_before(join_round)  # not applied before settling
        assert member.membership.view_at(join_round) is old
        # Settling another round leaves the join alone.
        assert member.membership.settle_joins(join_round - 1)
        assert member.membership.tickets == {"peer-09": join_round}
        assert member.membership.settle_joins(join_round)
        view = member.membership.view_at(join_round)
        assert view == joined and view is not None and view.view_id == joined.view_id
        assert member.membership.view_at(join_round - 1) is old
        assert member.membership.view_at(join_round + 10) is view
        assert member.membership.tickets == {}
        assert not member.membership.undecided_before(join_round)
        assert member.hello().view_id == joined.view_id
        # Later hellos of the new member change nothing.
        member.sees(j)
        assert member.membership.tickets == {}
        assert member.membership.settle_joins(join_round)
        assert len(member.membership.views) == 2


def test_join_refused_by_a_member_past_the_round_asks_again_later() -> None:
    a, b, c = committed(rounds=(4, 5, 5))
    olds = {m.peer_id: m.membership.view for m in (a, b, c)}
    j = node("peer-09")
    for member in (a, b, c):
        handshake(j, member)
    j.membership.advance_join()
    first = proposed_join_round("peer-09", 5)
    assert j.membership.join_round == first

    a.sees(j)
    b.sees(j)
    c.round = first  # c reached the asked round before it heard of it
    c.sees(j)
    assert a.membership.tickets == b.membership.tickets == {"peer-09": first}
    assert c.membership.tickets == {}
    c.round = first + 1
    c.sees(j)  # at or past the round: still no
    assert c.membership.tickets == {}

    a.round, b.round = first - 1, first - 1
    j.sees(a, b, c)
    assert j.membership.advance_join() is None
    second = j.membership.join_round
    assert second == proposed_join_round("peer-09", first + 1) and not j.membership.join_confirmed

    # b waits at the start of the old round until it hears of the new one.
    assert not b.membership.settle_joins(first)
    a.sees(j)
    b.sees(j)
    c.sees(j)
    for member in (a, b, c):
        assert member.membership.tickets == {"peer-09": second}
        assert tickets_in(member.hello()) == {"peer-09": second}
        # Settling the old round applies nothing.
        assert member.membership.settle_joins(first)
        assert member.membership.view_at(first) is olds[member.peer_id]
        assert len(member.membership.views) == 1
        assert not member.membership.undecided_before(first)
        assert member.membership.undecided_before(second)

    j.sees(a, b, c)
    joined = j.membership.advance_join()
    assert joined is not None and j.membership.view_at(second) is joined
    for member in (a, b, c):
        member.sees(j)
        assert member.membership.settle_joins(second)
        view = member.membership.view_at(second)
        assert view is not None and view.view_id == joined.view_id


def test_stale_ticket_for_an_abandoned_round_is_dropped_at_settle() -> None:
    (a, *_) = committed(rounds=(4, 5, 5))
    old = a.membership.view
    a.membership.observe(hand_hello("peer-09", join_round=8), a.round)
    assert a.membership.tickets == {"peer-09": 8}
    # The joiner moved on to a round a has already started: refused, the old ticket stays...
    a.round = 7
    a.membership.observe(hand_hello("peer-09", join_round=7), a.round)
    assert a.membership.tickets == {"peer-09": 8}
    # ...and settling its round drops it without a view change (the joiner asks elsewhere).
    assert a.membership.settle_joins(8)
    assert a.membership.tickets == {}
    assert a.membership.view_at(8) is old and len(a.membership.views) == 1


def test_joiner_waits_without_refusals() -> None:
    members = committed(rounds=(4, 5, 5))
    j = node("peer-09")
    for member in members:
        handshake(j, member)
    j.membership.advance_join()
    join_round = j.membership.join_round
    for member in members:
        member.round += 2  # still before the join round, request not seen yet
    j.sees(*members)
    for _ in range(3):
        assert j.membership.advance_join() is None
        assert j.membership.join_round == join_round


def test_a_member_holds_one_open_join_at_a_time() -> None:
    a, b, c = committed(rounds=(4, 5, 5))
    j1, j2 = node("peer-08"), node("peer-09")
    for joiner in (j1, j2):
        for member in (a, b, c):
            handshake(joiner, member)
        joiner.membership.advance_join()
    round_1 = proposed_join_round("peer-08", 5)
    round_2 = proposed_join_round("peer-09", 5)
    assert (j1.membership.join_round, j2.membership.join_round) == (round_1, round_2)

    a.sees(j1, j2)
    b.sees(j2, j1)
    assert a.membership.tickets == {"peer-08": round_1}
    assert b.membership.tickets == {"peer-09": round_2}
    assert tickets_in(a.hello()) == {"peer-08": round_1}
    # Seeing the other request again does not change the holder.
    a.sees(j2)
    assert a.membership.tickets == {"peer-08": round_1}

    # j1 withdraws: a is free for j2.
    a.membership.observe(hand_hello("peer-08", address=j1.membership.address), a.round)
    assert a.membership.tickets == {}
    a.sees(j2)
    assert a.membership.tickets == {"peer-09": round_2}


def test_withdrawn_join_removes_the_ticket() -> None:
    a, *_ = committed(rounds=(4, 5, 5))
    a.membership.observe(hand_hello("peer-09", join_round=8), a.round)
    assert a.membership.tickets == {"peer-09": 8}
    assert a.membership.undecided_before(8)
    a.membership.observe(hand_hello("peer-09", join_round=0), a.round)
    assert a.membership.tickets == {}
    assert not a.membership.undecided_before(8)
    assert tickets_in(a.hello()) == {}
    assert a.membership.settle_joins(8) and len(a.membership.views) == 1


def test_join_requests_are_ignored_before_the_first_view() -> None:
    a = node("peer-00")
    a.membership.observe(hand_hello("peer-09", join_round=8), 0)
    assert a.membership.tickets == {}


def simulate(members: list[Node], late: dict[int, Node], ticks: int = 40) -> list[Node]:
    """Peers in lockstep ticks. A tick: every pair handshakes (hellos from the tick's start);
    each joiner takes a step of its protocol and, once confirmed, enters at its join round;
    each member settles the joins of its round and, when nothing is undecided, trains that
    round (its round goes up by one). `late` maps a tick to a peer that starts then."""
    nodes = list(members)
    joiners: list[Node] = []
    for tick in range(ticks):
        if tick in late:
            nodes.append(late[tick])
            joiners.append(late[tick])
        exchange(nodes)
        for j in joiners:
            if not j.membership.join_confirmed and j.membership.advance_join() is not None:
                j.round = j.membership.join_round
        for n in nodes:
            if n.membership.view is not None and n.membership.settle_joins(n.round):
                n.round += 1
        last_join = max(j.membership.join_round for j in joiners) if joiners else 0
        if (len(joiners) == len(late) and all(j.membership.join_confirmed for j in joiners)
                and all(n.round > last_join for n in nodes)):
            return nodes
    raise AssertionError(f"joins not settled after {ticks} ticks: {nodes}")


def assert_agree(nodes: list[Node], round_index: int) -> View:
    views = [n.membership.view_at(round_index) for n in nodes]
    assert all(v is not None for v in views), (round_index, views)
    ids = {v.view_id for v in views if v is not None}
    assert len(ids) == 1, (round_index, views)
    assert views[0] is not None
    return views[0]


def test_simulated_join_everyone_switches_at_the_same_round() -> None:
    members = committed(rounds=(4, 5, 5))
    j = node("peer-09", mu=0.125)
    nodes = simulate(members, {1: j})
    join_round = j.membership.join_round
    assert join_round >= 5 + JOIN_MARGIN_ROUNDS
    before = assert_agree(members, join_round - 1)
    assert before.ids == ("peer-00", "peer-01", "peer-02")
    after = assert_agree(nodes, join_round)
    assert after.ids == ("peer-00", "peer-01", "peer-02", "peer-09")
    assert assert_agree(nodes, max(n.round for n in nodes)) == after
    for n in nodes:
        assert n.membership.tickets == {}


def test_concurrent_joins_at_different_rounds_agree_on_the_view() -> None:
    members = committed(rounds=(4, 5, 5))
    j, k = node("peer-08"), node("peer-09")
    # k starts a tick after j: it asks for a later round while j's join is pending.
    nodes = simulate(members, {1: j, 2: k})
    first, second = sorted((j.membership.join_round, k.membership.join_round))
    assert first < second
    assert_agree(members, first - 1)
    assert len(assert_agree(nodes, second).ids) == 5  # k's own view lacks j here
    for n in nodes:
        assert n.membership.view_at(second) == n.membership.view


def test_a_silent_peer_leaves_the_candidates_before_the_first_view() -> None:
    a, b, c = node("peer-00"), node("peer-01"), node("peer-02")
    meet([a, b, c])
    assert a.membership.candidate_ids() == ("peer-00", "peer-01", "peer-02")
    a.membership.known["peer-02"].last_seen -= STALE_AFTER_S + 1
    assert a.membership.candidate_ids() == ("peer-00", "peer-01")


# ---- the first view after a restart ---------------------------------------------------------


def test_resume_round_is_the_lowest_near_the_highest() -> None:
    assert resume_round([]) == 0
    assert resume_round([7, 7, 6]) == 6  # killed a round apart: all have a checkpoint at 6
    assert resume_round([12, 3, 11]) == 11  # peer at 3 was down for long: it does not drag
    assert resume_round([5, 5 - RESUME_WINDOW_ROUNDS]) == 5 - RESUME_WINDOW_ROUNDS


def test_a_restarted_cluster_commits_its_first_view_at_the_agreed_round() -> None:
    nodes = [node(f"peer-0{i}", mu) for i, mu in enumerate(MUS)]
    for n, checkpoint_round in zip(nodes, (9, 8, 0), strict=True):  # peer-02 lost its disk
        n.round = checkpoint_round
    meet(nodes)
    for n in nodes:
        assert n.membership.try_commit(n.round) is not None
        assert n.membership.first_round == 8 and n.membership.views[0][0] == 8
        assert n.hello().view_round == 8


def test_a_restarted_member_waits_to_be_dropped_instead_of_adopting_a_moved_on_view() -> None:
    members = committed(rounds=(0, 0, 0))
    # peer-02 restarts (a new process, no view) while the others are still in round 0: it
    # adopts their view again at round 0, the round they wait in for its slice.
    restarted = node("peer-02", mu=MUS[2])
    for member in members[:2]:
        handshake(restarted, member)
    assert restarted.membership.try_commit() is not None
    assert restarted.membership.first_round == 0
    # Later, with the others past the view's first round, it does not adopt: it would start
    # a round long gone. It is no joiner either while the view lists it.
    for member in members[:2]:
        member.round = 6
    late = node("peer-02", mu=MUS[2])
    for member in members[:2]:
        handshake(late, member)
    assert late.membership.try_commit(4) is None
    assert late.membership.running_view() is None


# ---- leaving: dropping members that stopped answering -----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


DEAD_AFTER = 4.0


def clocked(count: int, rounds: tuple[int, ...]) -> tuple[FakeClock, list[Node]]:
    """`count` members with a shared fake clock that agreed on their first view."""
    clock = FakeClock()
    nodes = [Node(Membership(Member(f"peer-0{i}", 0.5), f"10.0.0.{i + 1}:50051", count,
                             dead_after_s=DEAD_AFTER, clock=clock)) for i in range(count)]
    meet(nodes)
    assert all(n.membership.try_commit() is not None for n in nodes)
    for n, round_index in zip(nodes, rounds, strict=True):
        n.round = round_index
    exchange(nodes)
    return clock, nodes


def tick(nodes: list[Node]) -> None:
    for n in nodes:
        n.membership.tick(n.round)


def leave_tickets(n: Node) -> dict[str, tuple[int, bool]]:
    return {t.peer_id: (t.round, t.decided) for t in n.hello().leaves}


def test_a_silent_member_is_dropped_by_every_survivor_from_the_same_round() -> None:
    clock, (a, b, c) = clocked(3, rounds=(4, 5, 5))
    old = a.membership.view
    clock.now += DEAD_AFTER - 0.5
    exchange([a, b])
    tick([a, b])
    assert a.membership.leaving() == frozenset() and leave_tickets(a) == {}
    clock.now += 1.0  # c (peer-02) has now been silent for longer than DEAD_AFTER
    exchange([a, b])
    tick([a, b])
    # Each proposes its own next round; neither has decided; nobody waits for c any more.
    assert leave_tickets(a) == {"peer-02": (5, False)}
    assert leave_tickets(b) == {"peer-02": (6, False)}
    for n in (a, b):
        assert n.membership.leaving() == {"peer-02"}
        assert n.membership.undecided_before(n.round + 1)
        assert not n.membership.settle_leaves(n.round + 1)
        assert n.membership.settle_leaves(n.round)  # the current round is under way
    exchange([a, b])
    tick([a, b])  # a raises to b's 6; b decides once a reports the same round
    exchange([a, b])
    tick([a, b])
    for n in (a, b):
        assert leave_tickets(n) == {"peer-02": (6, True)}
        assert n.membership.view_at(5) is not None and n.membership.view_at(5).ids == old.ids
        view = n.membership.view_at(6)
        assert view is not None and view.ids == ("peer-00", "peer-01")
        assert n.hello().members == ["peer-00", "peer-01"] and n.hello().view_round == 6
        assert n.membership.settle_leaves(6) and not n.membership.undecided_before(9)
    assert a.membership.view_at(6) == b.membership.view_at(6)
    # c hears of it once it answers again: it is out, and joins again with its id.
    c.sees(a, b)
    assert c.membership.dropped()
    c.membership.rejoin()
    assert c.membership.view is None and not c.membership.dropped()
    assert c.membership.try_commit() is None  # tickets for it: no adopting
    running = c.membership.running_view()
    assert running is not None and running.ids == ("peer-00", "peer-01")


def test_a_suspicion_the_others_do_not_share_makes_the_suspicious_member_leave() -> None:
    """a no longer hears c, though c hears a and b hears both (a one-way link failure, or a
    stall of a's own). a's proposal is not agreed, puts nobody out, and after GIVE_UP_AFTER
    times the silence a leaves itself; b and c then drop a, and the view is theirs."""
    clock, (a, b, c) = clocked(3, rounds=(5, 5, 5))

    def step() -> None:
        clock.now += 1.0
        exchange([b, c])
        a.sees(b)
        b.sees(a)
        c.sees(a)
        tick([a, b, c])

    for _ in range(int(DEAD_AFTER)):
        step()
    assert leave_tickets(a) == {"peer-02": (6, False)}
    assert leave_tickets(b) == leave_tickets(c) == {}
    assert not c.membership.dropped()  # a pending accusation does not put c out
    assert not a.membership.settle_leaves(6)  # a waits for a decision that does not come
    while not a.membership.dropped():
        step()
    assert clock.now - 1000.0 >= GIVE_UP_AFTER * DEAD_AFTER
    assert not b.membership.dropped() and not c.membership.dropped()
    assert b.membership.view_at(6).ids == ("peer-00", "peer-01", "peer-02")
    a.membership.rejoin()  # its handshakes now report no view: b and c stop hearing a member
    for _ in range(int(DEAD_AFTER) + 3):
        step()
    assert leave_tickets(b) == leave_tickets(c) == {"peer-00": (6, True)}
    assert b.membership.view_at(6).ids == c.membership.view_at(6).ids == ("peer-01", "peer-02")
    a.sees(b, c)
    running = a.membership.running_view()
    assert running is not None and running.ids == ("peer-01", "peer-02")


def test_no_leave_without_a_quorum() -> None:
    assert has_quorum({"b", "c", "d"}, ("a", "b", "c", "d", "e"))
    assert not has_quorum({"d", "e"}, ("a", "b", "c", "d", "e"))
    assert has_quorum({"a"}, ("a", "b")) and not has_quorum({"b"}, ("a", "b"))
    assert has_quorum({"a", "c"}, ("a", "b", "c", "d"))
    assert not has_quorum({"b", "c"}, ("a", "b", "c", "d"))
    # Half of four without the lowest id: c and d propose, but never decide (the other half
    # may be alive behind a partition and decide the opposite).
    clock, (_, _, c, d) = clocked(4, rounds=(3, 3, 3, 3))
    clock.now += DEAD_AFTER + 1
    for _ in range(3):
        exchange([c, d])
        tick([c, d])
    assert leave_tickets(c) == leave_tickets(d) == {"peer-00": (4, False), "peer-01": (4, False)}
    assert not c.membership.settle_leaves(4) and c.membership.view_at(4).ids == (
        "peer-00", "peer-01", "peer-02", "peer-03")


def test_a_decided_leave_is_forgotten_before_a_join_of_the_dropped_peer() -> None:
    clock, (a, b, _) = clocked(3, rounds=(5, 5, 5))
    clock.now += DEAD_AFTER + 1
    for _ in range(2):
        exchange([a, b])
        tick([a, b])
    assert leave_tickets(a) == {"peer-02": (6, True)}
    back = node("peer-02")  # restarted with its id, the same address
    back.membership.clock = clock
    for member in (a, b):
        handshake(back, member)
    back.membership.advance_join()
    join_round = back.membership.join_round
    assert join_round > 6
    a.sees(back)
    assert a.membership.tickets == {}  # the leave is not forgotten yet: one change at a time
    a.round = b.round = 7  # both past the leave's round: they forget it and accept
    exchange([a, b])
    tick([a, b])
    assert leave_tickets(a) == leave_tickets(b) == {}
    a.sees(back)
    b.sees(back)
    assert a.membership.tickets == b.membership.tickets == {"peer-02": join_round}


def test_a_silent_joiner_lapses_unless_a_member_saw_it_confirm() -> None:
    clock, (a, b, c) = clocked(3, rounds=(5, 5, 5))
    for joiner_confirmed_to_b in (False, True):
        joiner = hand_hello("peer-09", join_round=9)
        for n in (a, b, c):
            n.membership.observe(joiner, n.round)
        if joiner_confirmed_to_b:
            b.membership.observe(hand_hello("peer-09", join_round=9, join_confirmed=True), 5)
        exchange([a, b, c])
        assert [t.confirmed for t in b.hello().accepted_joins] == [joiner_confirmed_to_b]
        assert not a.membership.settle_joins(9)  # waits for the joiner's decision...
        clock.now += DEAD_AFTER + 1
        assert a.membership.settle_joins(9)  # ...until the joiner is silent
        joined = "peer-09" in a.membership.view_at(9).ids
        assert joined == joiner_confirmed_to_b
        for n in (b, c):
            n.membership.settle_joins(9)
            assert ("peer-09" in n.membership.view_at(9).ids) == joined
        exchange([a, b, c])


def test_simulated_deaths_every_survivor_agrees_and_goes_on() -> None:
    """Five members in lockstep ticks of 0.5 s; each pair handshakes in a tick with
    probability 0.9; two members die at random ticks. A member completes its round once every
    other member of the round's view has started it or is being dropped. The survivors agree
    on the view of every round they started, drop nobody alive, and keep going."""
    for seed in range(8):
        rng = random.Random(seed)
        clock, nodes = clocked(5, rounds=(0,) * 5)
        deaths = dict(zip(rng.sample(range(5, 40), 2), rng.sample(nodes, 2), strict=True))
        started: dict[str, dict[int, str]] = {n.peer_id: {} for n in nodes}
        settled = {n.peer_id: False for n in nodes}
        alive = list(nodes)
        for step in range(150):
            clock.now += 0.5
            if step in deaths:
                alive.remove(deaths[step])
            hellos = {n.peer_id: n.hello() for n in alive}
            for n in alive:
                for other, hello in hellos.items():
                    if other != n.peer_id and rng.random() < 0.9:
                        n.membership.observe(hello, n.round)
            for n in rng.sample(alive, len(alive)):
                n.membership.tick(n.round)
                assert not n.membership.dropped(), (seed, step, n.peer_id)
                view = n.membership.view_at(n.round)
                if not settled[n.peer_id]:
                    if n.membership.settle_leaves(n.round) and n.membership.settle_joins(n.round):
                        settled[n.peer_id] = True
                        started[n.peer_id][n.round] = n.membership.view_at(n.round).view_id
                elif all(o.peer_id in n.membership.leaving() or o.round > n.round
                         or (o.round == n.round and settled[o.peer_id])
                         for o in nodes if o.peer_id in view.ids and o is not n):
                    n.round += 1
                    settled[n.peer_id] = False
        for n in alive:
            assert n.round >= 40, (seed, n.peer_id, n.round)
            assert n.membership.view.ids == tuple(sorted(s.peer_id for s in alive))
            for other in alive:
                for round_index, view_id in started[n.peer_id].items():
                    assert started[other.peer_id].get(round_index, view_id) == view_id


def test_a_leave_during_an_accepted_join_falls_after_the_join_round() -> None:
    clock, (a, b, _) = clocked(3, rounds=(5, 5, 5))
    joiner = hand_hello("peer-09", join_round=9)
    for n in (a, b):
        n.membership.observe(joiner, n.round)
    assert a.membership.tickets == b.membership.tickets == {"peer-09": 9}
    clock.now += DEAD_AFTER + 1  # peer-02 dies while the join is open
    for _ in range(2):
        exchange([a, b])
        for n in (a, b):
            n.membership.observe(joiner, n.round)
        tick([a, b])
    # Proposed after the join round: the view the joiner confirms is the members' at round 9.
    assert leave_tickets(a) == leave_tickets(b) == {"peer-02": (10, True)}
    confirmed = hand_hello("peer-09", join_round=9, join_confirmed=True)
    for n in (a, b):
        n.membership.observe(confirmed, n.round)
        assert n.membership.settle_leaves(9) and n.membership.settle_joins(9)
        assert n.membership.view_at(9).ids == ("peer-00", "peer-01", "peer-02", "peer-09")
        assert n.membership.view_at(10).ids == ("peer-00", "peer-01", "peer-09")
        assert [r for r, _ in n.membership.views] == [0, 9, 10]


def test_a_goodbye_is_decided_at_once_even_by_a_lone_survivor_without_the_lowest_id() -> None:
    """A pair: peer-00 (the lowest id, the quorum's tie-breaker) stops cleanly. peer-01 alone
    is no quorum after a silence, but the goodbye consents to the leave: decided within the
    same handshake, with no silence to wait for."""
    clock, (a, b) = clocked(2, rounds=(7, 7))
    clock.now += 1.0
    a.membership.stopping = True
    assert a.hello().leaving
    b.sees(a)
    tick([b])
    assert leave_tickets(b) == {"peer-00": (8, True)}
    assert b.membership.view_at(8).ids == ("peer-01",)
    assert b.membership.view_at(7).ids == ("peer-00", "peer-01")  # the round under way
    assert not has_quorum({"peer-01"}, ("peer-00", "peer-01"))  # silence alone would not do


def test_a_member_heard_in_the_view_that_comes_back_without_one_has_restarted() -> None:
    clock, (a, b, c) = clocked(3, rounds=(5, 5, 5))
    clock.now += 1.0
    exchange([a, b, c])  # everyone heard as a member of the view since it was set
    restarted = Node(Membership(Member("peer-02", 0.5), "10.0.0.3:50051", 3,
                                dead_after_s=DEAD_AFTER, clock=clock), round=3)
    clock.now += 0.5
    for n in (a, b):
        n.sees(restarted)
    tick([a, b])
    exchange([a, b])
    tick([a, b])
    assert clock.now - 1000.0 < DEAD_AFTER  # well before silence would have dropped it
    for n in (a, b):
        assert leave_tickets(n) == {"peer-02": (6, True)}
        assert n.membership.view_at(6).ids == ("peer-00", "peer-01")
    restarted.sees(a, b)
    assert restarted.membership.try_commit() is None  # it joins instead (tickets for it)
