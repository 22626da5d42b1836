"""The control plane under generated Hellos: thousands of them, mutated field by field from an
honest member's, a joiner's and a stranger's, reach a member of a running three-member view.
Every one is either refused by `check_hello`, naming a field, with no state changed, or
accepted, and then no round, view or ticket of the member moves outside its bounds. Afterwards
the honest members still drop a member that restarted and let it back in."""

from __future__ import annotations

import copy
import random

import grpc
import pytest

from peerd.algorithm.plan import Member
from peerd.net import PROTOCOL_VERSION
from peerd.net.codec import WireError
from peerd.net.control import (
    JOIN_WINDOW,
    MAX_KNOWN_PEERS,
    MAX_ROUND,
    ROUND_WINDOW,
    check_hello,
)
from peerd.net.membership import JOIN_MARGIN_ROUNDS, Membership
from peerd.v1 import peer_pb2

HELLOS = 4000
BATCH = 40
MY_ROUND = 10
IDS = ("peer-00", "peer-01", "peer-02")
REFUSAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}
FIELDS = ("peer_id", "address", "round", "members", "view_id", "join_round", "accepted_joins",
          "view_round", "leaves")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def membership(peer_id: str, clock: Clock) -> Membership:
    address = f"10.0.0.{IDS.index(peer_id) + 1 if peer_id in IDS else 99}:50051"
    return Membership(Member(peer_id, 0.5), address, min_peers=3, clock=clock, dead_after_s=10)


def hello_of(node: Membership, round_index: int) -> peer_pb2.Hello:
    return node.hello(PROTOCOL_VERSION, "fuzz", "fp", round_index)


def committed(clock: Clock) -> list[Membership]:
    """Three members of one view, every one in MY_ROUND."""
    nodes = [membership(p, clock) for p in IDS]
    for _ in range(2):
        hellos = [hello_of(n, 0) for n in nodes]
        for node in nodes:
            for hello in hellos:
                node.observe(hello, 0)
    assert all(node.try_commit() is not None for node in nodes)
    clock.now += 1
    exchange(nodes, MY_ROUND)
    return nodes


def exchange(nodes: list[Membership], round_index: int) -> None:
    hellos = [hello_of(n, round_index) for n in nodes]
    for node in nodes:
        for hello in hellos:
            node.observe(hello, round_index)
        node.tick(round_index)


def interesting_rounds(rng: random.Random) -> int:
    return rng.choice([0, 1, MY_ROUND - 1, MY_ROUND, MY_ROUND + 1,
                       MY_ROUND + JOIN_MARGIN_ROUNDS, MY_ROUND + JOIN_WINDOW,
                       MY_ROUND + JOIN_WINDOW + 1, MY_ROUND + ROUND_WINDOW,
                       MY_ROUND + ROUND_WINDOW + 1, MY_ROUND + 100_000, MAX_ROUND,
                       MAX_ROUND + 1, 1 << 63, (1 << 64) - 1, rng.randrange(1 << 64)])


def interesting_id(rng: random.Random) -> str:
    return rng.choice([*IDS, "joiner-7", f"stranger-{rng.randrange(1000)}", "", "a" * 65,
                       "has space", "slash/id", "peer-00\x00", "é"])


def interesting_ids(rng: random.Random) -> list[str]:
    kind = rng.randrange(5)
    if kind == 0:
        return sorted(rng.sample(IDS, rng.randrange(len(IDS) + 1)))
    if kind == 1:
        return [interesting_id(rng) for _ in range(rng.randrange(4))]
    if kind == 2:
        return sorted(f"p-{i:04d}" for i in range(rng.choice([255, 256, 257, 1000])))
    if kind == 3:
        return [*IDS, "peer-00"]
    return list(reversed(IDS))


def mutate(hello: peer_pb2.Hello, rng: random.Random) -> peer_pb2.Hello:
    forged = copy.deepcopy(hello)
    for field in rng.sample(FIELDS, rng.randrange(1, 4)):
        if field == "peer_id":
            forged.peer_id = interesting_id(rng)
        elif field == "address":
            forged.address = rng.choice(["10.0.0.9:50051", "", "host", "h:0", "h:70000",
                                         "[::1]:5", "a" * 300 + ":1", "h:-1", "[x]:1"])
        elif field == "view_id":
            forged.view_id = rng.choice(["", "0" * 16, "zz", "A" * 16, forged.view_id])
        elif field in ("round", "join_round", "view_round"):
            setattr(forged, field, interesting_rounds(rng))
        elif field == "members":
            del forged.members[:]
            forged.members.extend(interesting_ids(rng))
        elif field == "accepted_joins":
            del forged.accepted_joins[:]
            forged.accepted_joins.extend(
                peer_pb2.JoinTicket(peer_id=p, round=interesting_rounds(rng),
                                    confirmed=rng.random() < 0.5)
                for p in interesting_ids(rng))
        else:
            del forged.leaves[:]
            forged.leaves.extend(
                peer_pb2.LeaveTicket(peer_id=p, round=interesting_rounds(rng),
                                     decided=rng.random() < 0.5)
                for p in interesting_ids(rng))
    forged.leaving = rng.random() < 0.05
    return forged


def state_of(node: Membership) -> str:
    """Everything a Hello could change, as text (dataclass reprs show every field)."""
    return repr((sorted(node.known.items()), node.views, sorted(node.tickets.items()),
                 sorted(node.leaves.items()), sorted(node.gone), node.join_round,
                 sorted(node.join_waits.items())))


def assert_within_bounds(node: Membership, my_round: int) -> None:
    assert len(node.known) <= MAX_KNOWN_PEERS
    assert all(r <= my_round + JOIN_WINDOW for r in node.tickets.values()), node.tickets
    # Leave rounds grow to the highest a survivor proposes: at most a window past its round.
    assert all(t.round <= my_round + 2 * ROUND_WINDOW for t in node.leaves.values())
    assert all(first <= my_round + 2 * ROUND_WINDOW for first, _ in node.views)
    view = node.view
    members = view.ids if view is not None else ()
    assert all(node.known[p].round <= my_round + ROUND_WINDOW for p in members
               if p in node.known)


def test_generated_hellos_never_move_state_out_of_bounds() -> None:
    rng = random.Random(20)
    clock = Clock()
    strangers = [membership(f"stranger-{i}", clock) for i in range(20)]
    refused = dict.fromkeys(FIELDS, 0)
    accepted = 0
    for index in range(HELLOS):
        if index % BATCH == 0:
            # A fresh healthy view now and then: forged goodbyes and leaves shrink a view,
            # after which little of the rest would reach it.
            nodes = committed(clock)
            target, others = nodes[0], nodes[1:]
            joiner = membership("joiner-7", clock)
        if index % 10 == 0:
            # The honest members keep talking, so forged state meets real state.
            clock.now += 0.5
            exchange(nodes, MY_ROUND)
            joiner.observe(hello_of(target, MY_ROUND), 0)
        source = rng.choice([*others, joiner, rng.choice(strangers)])
        forged = mutate(hello_of(source, MY_ROUND), rng)
        before = state_of(target)
        try:
            check_hello(forged, target, MY_ROUND)
        except WireError as error:
            assert error.code in REFUSAL_CODES, error
            field = error.detail.split(":", 1)[0].removeprefix("Hello.")
            assert field in FIELDS, error.detail
            refused[field] += 1
            assert state_of(target) == before
            continue
        accepted += 1
        target.observe(forged, MY_ROUND)
        target.tick(MY_ROUND)
        assert_within_bounds(target, MY_ROUND)
    # Both outcomes and every kind of refusal were exercised.
    assert accepted > HELLOS // 10
    assert all(count > 0 for count in refused.values()), refused


@pytest.mark.parametrize("join_round", [MY_ROUND + 100_000, 1 << 63])
def test_a_forged_far_future_join_is_refused_and_a_restarted_member_rejoins(
        join_round: int) -> None:
    clock = Clock()
    nodes = committed(clock)
    intruder = membership("operator", clock)
    forged = hello_of(intruder, 0)
    forged.join_round = join_round
    for node in nodes:
        with pytest.raises(WireError, match=r"Hello\.join_round") as refusal:
            check_hello(forged, node, MY_ROUND)
        assert refusal.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert node.tickets == {}
    # peer-02 restarts: a fresh membership, no view. The others see it restarted, drop it at
    # once (no silence to wait for) and it joins again.
    nodes[2] = membership("peer-02", clock)
    round_index = MY_ROUND
    joined_at = None
    for _ in range(40):
        clock.now += 0.5
        hellos = {n.me.peer_id: hello_of(n, round_index if n.view else 0) for n in nodes}
        for node in nodes:
            for peer_id, hello in hellos.items():
                if peer_id != node.me.peer_id:
                    check_hello(hello, node, round_index)
                    node.observe(hello, round_index)
            node.tick(round_index)
        survivors = nodes[:2]
        if all(s.settle_leaves(round_index) and s.settle_joins(round_index) for s in survivors):
            round_index += 1
        if nodes[2].running_view() is not None and nodes[2].advance_join() is not None:
            joined_at = nodes[2].join_round
        if joined_at is not None and round_index > joined_at:
            break
    assert joined_at is not None and joined_at <= MY_ROUND + 2 * JOIN_MARGIN_ROUNDS + 2
    for node in nodes[:2]:
        assert node.view_at(joined_at) is not None and "peer-02" in node.view_at(joined_at).ids
        assert "peer-02" not in node.view_at(MY_ROUND + 1).ids
