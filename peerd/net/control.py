"""Bounds on the control plane: every field of a Hello checked before membership stores it.

Membership trusts what it stores (a join round it accepted holds rounds back, a leave round
schedules the view), so a Hello is checked first, against this peer's own state: rounds within
a window of the local round, join rounds within a window of the view's current round, ids and
addresses of valid form, member and ticket lists of bounded size, sorted and consistent with
the sender's own view. A field out of bounds refuses the whole Hello with INVALID_ARGUMENT (the
field cannot be right) or FAILED_PRECONDITION (it cannot be right *now*, here), naming the
field; the caller counts the refusal and nothing of the Hello is stored.

The windows are wide for honest peers and narrow for a forger: members of a live run are a few
rounds apart (a semi-asynchronous straggler skips ahead rather than fall behind) and a joiner
asks for a round JOIN_MARGIN_ROUNDS plus a spread past the furthest member.
"""

from __future__ import annotations

import re

import grpc

from peerd.net.codec import WireError
from peerd.net.discovery import parse_address
from peerd.net.membership import JOIN_MARGIN_ROUNDS, Membership
from peerd.state import IDENTIFIER
from peerd.v1 import peer_pb2

# Rounds are counters that start at 0; no run gets near 2^48 rounds, and JSON and float
# arithmetic stay exact below it.
MAX_ROUND = 1 << 48
# How far ahead of this member's round another peer's round, view round or leave round may be
# while this peer is a member of a running view.
ROUND_WINDOW = 1_000
# How far ahead of this member's round a joiner may ask to enter (or a member report a join it
# accepted): the joiner's margin and spread, past a furthest member that may be rounds ahead.
JOIN_WINDOW = 16 * JOIN_MARGIN_ROUNDS
# Views of tens of peers; a longer list is not a LAN cluster.
MAX_MEMBERS = 256
# Peers known at once (members, joiners, candidates): a new id beyond it waits until silent
# strangers are forgotten.
MAX_KNOWN_PEERS = 2 * MAX_MEMBERS
MAX_ADDRESS_CHARS = 262  # a DNS name (253) plus ":" and a port
VIEW_ID = re.compile(r"[0-9a-f]{16}")


def _invalid(field: str, detail: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, f"Hello.{field}: {detail}")


def _out_of_window(field: str, detail: str) -> WireError:
    return WireError(grpc.StatusCode.FAILED_PRECONDITION, f"Hello.{field}: {detail}")


def _check_id(field: str, peer_id: str) -> None:
    if not IDENTIFIER.fullmatch(peer_id):
        raise _invalid(field, f"{peer_id[:80]!r} is not a peer id (1 to 64 letters, digits, "
                              f"'.', '_' or '-')")


def _check_round(field: str, value: int, limit: int, why: str) -> None:
    if value > limit:
        raise _out_of_window(field, f"round {value} is past {limit} ({why})")


def _check_form(hello: peer_pb2.Hello) -> None:
    """The fields whose form alone can be wrong."""
    _check_id("peer_id", hello.peer_id)
    if len(hello.address) > MAX_ADDRESS_CHARS:
        raise _invalid("address", f"{len(hello.address)} characters")
    try:
        parse_address(hello.address)
    except ValueError as error:
        raise _invalid("address", str(error)) from None
    if hello.bulk_port > 65535:
        raise _invalid("bulk_port", f"{hello.bulk_port} is not a TCP port")
    if hello.view_id and not VIEW_ID.fullmatch(hello.view_id):
        raise _invalid("view_id", f"{hello.view_id[:80]!r} is not a view digest")
    for field, ids in (("members", list(hello.members)),
                       ("accepted_joins", [t.peer_id for t in hello.accepted_joins]),
                       ("leaves", [t.peer_id for t in hello.leaves])):
        if len(ids) > MAX_MEMBERS:
            raise _invalid(field, f"{len(ids)} entries, at most {MAX_MEMBERS}")
        for peer_id in ids:
            _check_id(field, peer_id)
        if ids != sorted(set(ids)):
            raise _invalid(field, "ids not sorted or repeated")
    if hello.view_id and hello.peer_id not in hello.members:
        raise _invalid("members", f"a committed view without its sender {hello.peer_id}")
    for field, value in (("round", hello.round), ("join_round", hello.join_round),
                         ("view_round", hello.view_round)):
        _check_round(field, value, MAX_ROUND, "no run is that long")


def _check_consistent(hello: peer_pb2.Hello) -> None:
    """Fields bounded by the sender's own round: what it reports must fit where it is."""
    own = max(hello.round, hello.join_round)
    _check_round("view_round", hello.view_round, own + ROUND_WINDOW,
                 "the sender's view starts that far past its own round")
    for ticket in hello.accepted_joins:
        _check_round("accepted_joins", ticket.round, hello.round + JOIN_WINDOW,
                     f"a join of {ticket.peer_id} that far past the sender's round")
    for leave in hello.leaves:
        _check_round("leaves", leave.round, own + ROUND_WINDOW,
                     f"a leave of {leave.peer_id} that far past the sender's round")


def _check_against_mine(hello: peer_pb2.Hello, membership: Membership, my_round: int) -> None:
    """Fields bounded by this peer's round, once it is a member of a running view."""
    view = membership.view
    if view is None or membership.me.peer_id not in view.ids:
        return
    _check_round("round", hello.round, my_round + ROUND_WINDOW,
                 f"this member is in round {my_round}")
    if hello.join_round and hello.peer_id not in view.ids:
        _check_round("join_round", hello.join_round, my_round + JOIN_WINDOW,
                     f"this member is in round {my_round}; joiners ask for a round a few "
                     f"past the furthest member")


def check_hello(hello: peer_pb2.Hello, membership: Membership, my_round: int) -> None:
    """Raises WireError naming the first control field of `hello` out of bounds."""
    _check_form(hello)
    if hello.peer_id not in membership.known and len(membership.known) >= MAX_KNOWN_PEERS:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"Hello.peer_id: this daemon knows {len(membership.known)} peers already; "
                        f"strangers are forgotten after a silence")
    _check_consistent(hello)
    _check_against_mine(hello, membership, my_round)
