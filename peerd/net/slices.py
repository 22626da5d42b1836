"""The gRPC transport of slices: what the round driver sends and receives over the network.

Sending: one PushSlices stream per neighbour, retried while the receiver cannot take it yet;
a slice of at least `--bulk-threshold` payload bytes goes to the neighbour's bulk listener
instead, where it announced one (peerd/net/bulk.py: the same header and checks, no gRPC copy).
Receiving: a stream header is checked against the round driver's plans before any value is
read (`expected_tensors`), the decoder checks every value off the event loop (shape, dtype,
finiteness), and the slice goes to the driver's inbox as checked. Serving pulls: the driver's
snapshots (this peer's slices), rebuilt one parameter at a time as the stream goes.
Joining: the members' parameters after the round before the join, pulled and assembled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from functools import partial

import grpc
import torch

from peerd.algorithm.aggregate import assemble
from peerd.algorithm.driver import RoundDriver, SliceRefused
from peerd.algorithm.engine import RoundContext
from peerd.algorithm.numerics import valid_weight
from peerd.algorithm.reduce import PartMessage, PartRefused
from peerd.algorithm.submodel import Params, copy_into, with_slice
from peerd.algorithm.transport import SliceMessage
from peerd.models.base import Plan
from peerd.net import PROTOCOL_VERSION
from peerd.net.bulk import BulkSender, BulkUnreachable
from peerd.net.client import PeerClients
from peerd.net.codec import BuiltOnRead, DecodedStream, Expectation, WireError
from peerd.net.discovery import parse_address
from peerd.net.frames import CALL_ERRORS, call_failure
from peerd.net.membership import Membership, View
from peerd.v1 import peer_pb2

log = logging.getLogger("peerd.slices")

POLL_S = 0.25
# Codes a receiver never answers on purpose: the connection failed or broke mid-call (gRPC
# core reports INTERNAL or UNKNOWN when a connection dies under a stream, as when a partition
# heals), or the receiver cannot place the round yet (UNAVAILABLE). Retried until the deadline.
RETRIED_PUSH_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.UNKNOWN})
REFUSAL_CODES = {
    "later": grpc.StatusCode.UNAVAILABLE,  # the sender retries
    "receiving": grpc.StatusCode.UNAVAILABLE,  # likewise: the twin stream may be cut
    "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "stranger": grpc.StatusCode.PERMISSION_DENIED,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}


def plan_to_wire(plan: Plan) -> list[peer_pb2.GroupUnits]:
    return [peer_pb2.GroupUnits(group=group, units=units.tolist())
            for group, units in sorted(plan.items())]


class GrpcSlices:
    def __init__(self, driver: RoundDriver, membership: Membership, clients: PeerClients,
                 cluster: str, fingerprint: str, bulk: BulkSender | None = None) -> None:
        self.bulk = bulk
        self.driver = driver
        self.membership = membership
        self.clients = clients
        self.cluster = cluster
        self.fingerprint = fingerprint
        self.peer_id = driver.peer_id

    def _header(self, receiver: str, round_index: int, view_id: str, weight: float,
                plan: Plan) -> peer_pb2.StreamHeader:
        return peer_pb2.StreamHeader(
            protocol_version=PROTOCOL_VERSION, cluster=self.cluster,
            model_fingerprint=self.fingerprint, sender=self.peer_id, receiver=receiver,
            round=round_index, view_id=view_id, weight=weight, plan=plan_to_wire(plan))

    # ---- sending -----------------------------------------------------------------------------

    async def push(self, ctx: RoundContext, message: SliceMessage, part: str = "") -> int:
        """Stream one slice (`part` "values" or "mean": a reduce-scatter message)."""
        driver, membership = self.driver, self.membership
        view = membership.view_at(ctx.round_index)
        assert view is not None
        header = self._header(message.receiver, ctx.round_index, view.view_id, message.weight,
                              ctx.plans_now[self.peer_id])
        header.part = part
        timeout_s = driver.rules.round_timeout_s
        deadline = time.monotonic() + timeout_s
        # Semi-async: a receiver rounds behind would refuse the slice ("not there yet"); wait
        # until its handshakes say it caught up instead of streaming it again and again.
        while (not driver.rules.sync and self._behind(message.receiver, ctx.round_index)
               and time.monotonic() < deadline and not driver.stopping.is_set()):
            await asyncio.sleep(POLL_S)
        while True:
            try:
                acknowledged = await self._send(message, header)
                break
            except CALL_ERRORS as error:
                code, detail = call_failure(error)
                # A receiver being dropped from the view is not waited for; refusals (bad
                # slice, wrong round, ...) are final.
                retry = code in RETRIED_PUSH_CODES and message.receiver not in membership.leaving()
                if not retry or time.monotonic() > deadline or driver.stopping.is_set():
                    log.warning("round %d: push to %s failed: %s %s", ctx.round_index,
                                message.receiver, code.name, detail)
                    return 0
                await asyncio.sleep(0.1)
        # Looked up again: a handshake during the push replaces the peer's record.
        known = membership.known.get(message.receiver)
        if known is not None:
            known.bytes_sent += acknowledged
        return acknowledged

    async def _send(self, message: SliceMessage, header: peer_pb2.StreamHeader) -> int:
        """One try: over the receiver's bulk listener when the slice is large enough and it
        announced one, else (or when that listener cannot be reached: a full or filtered port)
        over gRPC."""
        known = self.membership.known[message.receiver]
        if self.bulk is not None and self.bulk.takes(message.values, known.bulk_port):
            host, _ = parse_address(known.address)
            try:
                return await self.bulk.push(host, known.bulk_port, header, message.values)
            except BulkUnreachable as error:
                log.info("bulk path to %s: %s; this slice goes over gRPC", message.receiver,
                         error.detail)
        return await self.clients.push(known.address, header, message.values)

    async def push_part(self, ctx: RoundContext, part: PartMessage) -> int:
        return await self.push(ctx, part.message, part.kind)

    def _behind(self, peer_id: str, round_index: int) -> bool:
        """Does `peer_id` (not being dropped) report a round before `round_index - 1`?"""
        peer = self.membership.known.get(peer_id)
        return (peer is not None and peer.round + 1 < round_index
                and peer_id not in self.membership.leaving())

    # ---- receiving ---------------------------------------------------------------------------

    def expected_tensors(
        self, header: peer_pb2.StreamHeader
    ) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What a pushed stream must carry, from its header alone; WireError refuses it."""
        membership = self.membership
        view = membership.view_at(header.round)
        if view is None or membership.undecided_before(header.round):
            # The sender retries: our view of that round is not settled yet.
            raise WireError(grpc.StatusCode.UNAVAILABLE,
                            f"the view of round {header.round} is not settled here yet")
        if header.view_id != view.view_id:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"view {header.view_id} differs from ours ({view.view_id})")
        if header.receiver != self.peer_id:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"slice addressed to {header.receiver}, this is {self.peer_id}")
        if header.part:
            return self._expected_part(header)
        try:
            ctx = self.driver.admit(header.round, header.sender, header.weight)
        except SliceRefused as refused:
            raise WireError(REFUSAL_CODES[refused.reason], refused.detail) from None
        if list(header.plan) != plan_to_wire(ctx.plans_now[header.sender]):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{header.sender}'s units differ from its plan for round "
                            f"{header.round}")
        counts = self.driver.expected_counts(ctx, header.sender)
        # Last: from here the stream holds its slot in the inbox until `stream_ended`.
        self.driver.begin_receiving(header.round, header.sender)
        return self._tensor_spec(counts)

    def stream_ended(self, header: peer_pb2.StreamHeader) -> None:
        """A stream `expected_tensors` took is over (accepted or not): its slot is free. A part
        message holds no inbox slot (the reduce-scatter takes one per part and sender)."""
        if not header.part:
            self.driver.end_receiving(header.round, header.sender)

    def _expected_part(
        self, header: peer_pb2.StreamHeader
    ) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What a reduce-scatter message must carry (peerd/algorithm/reduce.py)."""
        parts = self.driver.parts
        if parts is None:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{header.sender} sends a part; reduce-scatter is off here")
        if header.round > self.driver.round_index + 1:
            raise WireError(grpc.StatusCode.UNAVAILABLE,
                            f"part for round {header.round}; this peer is only in round "
                            f"{self.driver.round_index}")
        if not valid_weight(header.weight):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"part from {header.sender}: weight {header.weight} invalid")
        try:
            counts = parts.expected_part(header.part, header.round, header.sender,
                                         header.receiver)
        except PartRefused as refused:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, str(refused)) from None
        return self._tensor_spec(counts)

    def _tensor_spec(
        self, counts: Mapping[str, int]
    ) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What the decoder checks a stream's tensors against: flat, in the wire precision."""
        wire_dtype = self.driver.engine.wire_dtype
        return {name: (wire_dtype, (count,)) for name, count in counts.items()}

    def accept(self, decoded: DecodedStream) -> None:
        """A stream the decoder checked against `expected_tensors`: into the driver's inbox
        (a part message: into the reduce-scatter's)."""
        header = decoded.header
        message = SliceMessage(header.sender, header.receiver, header.round, header.weight,
                               decoded.tensors)
        if header.part:
            assert self.driver.parts is not None  # _expected_part checked
            try:
                self.driver.parts.accept_part(PartMessage(header.part, message),
                                              decoded.payload_bytes, checked=True)
            except PartRefused as refused:
                raise WireError(grpc.StatusCode.FAILED_PRECONDITION, str(refused)) from None
            return
        try:
            self.driver.accept(message, decoded.payload_bytes, checked=True)
        except SliceRefused as refused:
            # The round moved on while the stream arrived, or a twin stream came first.
            raise WireError(REFUSAL_CODES[refused.reason], refused.detail) from None
        known = self.membership.known.get(header.sender)
        if known is not None:
            known.bytes_received += decoded.payload_bytes

    # ---- pulls -------------------------------------------------------------------------------

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        """The parameters after `request.round` rounds (default: the latest kept)."""
        snapshots = self.driver.snapshots
        if not snapshots:
            raise WireError(grpc.StatusCode.UNAVAILABLE, "no round completed yet")
        rounds = request.round or max(snapshots)
        if rounds > max(snapshots):
            raise WireError(grpc.StatusCode.UNAVAILABLE, f"round {rounds} is not finished yet")
        if rounds not in snapshots:
            raise WireError(grpc.StatusCode.NOT_FOUND,
                            f"no snapshot after {rounds} rounds; kept: {sorted(snapshots)}")
        snapshot = snapshots[rounds]
        view = self.membership.view
        engine = self.driver.engine
        header = self._header(request.requester, rounds, view.view_id if view else "",
                              engine.weight, snapshot.plan)
        # Each parameter is rebuilt as the stream reaches it (on the encoder's thread): the
        # snapshot's slice over this peer's current values. Assembly reads a peer's values
        # only where its plan held the entry, except for entries no member held that round,
        # which take the mean over members of what each holds when the pull is served.
        layouts = {name: (t.dtype, tuple(t.shape)) for name, t in engine.params.items()}
        return header, BuiltOnRead(layouts, partial(
            with_slice, engine.spec, engine.params, snapshot.plan, snapshot.sliced))

    async def join(self, round_index: int, running: View, dead_after_s: float) -> None:
        """A joiner starts round `round_index` from the members' parameters after the round
        before it (its own where none could be pulled)."""
        driver = self.driver
        start = await self.pull_start(round_index, running, dead_after_s)
        if start is None and not driver.stopping.is_set():
            log.warning("no member's parameters after round %d could be pulled: this peer "
                        "starts round %d from its own", round_index - 1, round_index)
        if start is not None:
            await driver.offload(copy_into, driver.engine.params, start)
        driver.round_index = round_index

    async def pull_start(self, round_index: int, running: View,
                         dead_after_s: float) -> Params | None:
        """A joiner's start: the members' parameters after round `round_index - 1`, each entry
        the mean over the members that held it then; None when no member's could be pulled."""
        engine, membership = self.driver.engine, self.membership
        shapes = {name: (t.dtype, tuple(t.shape)) for name, t in engine.params.items()}
        expectation = Expectation(PROTOCOL_VERSION, self.cluster, self.fingerprint,
                                  lambda header: shapes)
        request = peer_pb2.PullRequest(
            protocol_version=PROTOCOL_VERSION, cluster=self.cluster,
            model_fingerprint=self.fingerprint, requester=self.peer_id, round=round_index)
        pulled: dict[str, DecodedStream] = {}
        given_up: set[str] = set()
        while not self.driver.stopping.is_set():
            wanted = [m for m in running.ids if m not in pulled and m not in given_up
                      and m not in membership.leaving()]
            if not wanted:
                break
            for member in wanted:
                try:
                    pulled[member] = await self.clients.pull(
                        membership.known[member].address, member, request, expectation)
                except grpc.aio.AioRpcError as error:
                    # Members slowed down (a round timeout, a healed partition) may take long
                    # to finish round_index - 1: wait while they still answer handshakes; one
                    # silent for the dead-member time has nothing more to give.
                    if membership.silent_for(member) >= dead_after_s:
                        log.warning("joining at round %d without %s's parameters: %s %s",
                                    round_index, member, error.code().name, error.details())
                        given_up.add(member)
            await asyncio.sleep(0.2)
        if not pulled:
            return None
        params = {member: stream.tensors for member, stream in pulled.items()}
        # Plans are a pure function: computed here, never taken from the wire.
        plans = engine.planner.plan(round_index - 1, running.members, engine.spec.groups)
        return assemble(engine.spec, params, plans)
