"""The gRPC face of a daemon: decodes and validates what peers send, hands it to the host.

The servicer knows the wire, not the algorithm: everything about plans, views and rounds is
asked of the `PeerHost` (the daemon). A bad message is answered with a specific status code and
a message naming the problem, counted, and nothing from it reaches the model.

On a TLS connection every message that claims a peer id (a Hello's `peer_id`, a pushed stream's
`sender`, a pull's `requester`) must claim the name of the client's certificate: a member of
the cluster cannot speak for another. The certificate's role limits what it may call
(peerd/ops/ca.py): Status is open to every certificate of the cluster; Handshake and PushSlices
need a device certificate; Pull needs a device certificate of a member (or of a joiner this
peer accepted), or a reader certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import grpc
import torch

from peerd.agreement import fingerprint_mismatch
from peerd.net.codec import (
    CHECK_POOL,
    DecodedStream,
    Expectation,
    Frame,
    StreamDecoder,
    WireError,
    encode_frames_off_loop,
)
from peerd.net.tls import client_certificate_name, client_certificate_role, is_tls
from peerd.ops.ca import DEVICE_ROLE, READER_ROLE
from peerd.v1 import peer_pb2, peer_pb2_grpc

log = logging.getLogger("peerd.service")

# A refused call is counted every time but logged at most once per interval per client host:
# a scan or a misbehaving peer must not flood the journal.
REFUSAL_LOG_INTERVAL_S = 10.0
# Hosts remembered for that; beyond, the oldest are forgotten (a flood of source addresses).
REFUSAL_LOG_HOSTS = 1024


class PeerHost(Protocol):
    expectation: Expectation

    def hello(self) -> peer_pb2.Hello: ...

    def admit(self, hello: peer_pb2.Hello) -> None:
        """Record a peer's introduction; raises WireError to refuse it."""
        ...

    def accept_slice(self, decoded: DecodedStream) -> None:
        """Queue a validated slice for merging; raises WireError to refuse it."""
        ...

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]: ...

    def status(self) -> peer_pb2.StatusReply: ...


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(
        self, host: PeerHost, on_reject: Callable[[str, str], None] | None = None
    ) -> None:
        self.host = host
        self.on_reject = on_reject  # (rpc, status code name), e.g. for the metrics endpoint
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # host -> (when, unlogged)

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, error: WireError) -> None:
        if error.code == grpc.StatusCode.UNAVAILABLE:
            # "Not yet" (a round not reached, a view not settled): the caller retries.
            log.debug("%s from %s deferred: %s", rpc, context.peer(), error.detail)
        else:
            if self.on_reject is not None:
                self.on_reject(rpc, error.code.name)
            self._log_refusal(rpc, context.peer(), error.detail)
        await context.abort(error.code, error.detail)

    def _log_refusal(self, rpc: str, peer: str, detail: str) -> None:
        host = peer.rsplit(":", 1)[0]  # "ipv4:10.0.0.7:50123" -> "ipv4:10.0.0.7"
        now = time.monotonic()
        last, unlogged = self._refusals_logged.get(host, (-REFUSAL_LOG_INTERVAL_S, 0))
        if now - last < REFUSAL_LOG_INTERVAL_S:
            self._refusals_logged[host] = (last, unlogged + 1)
            return
        self._refusals_logged.pop(host, None)
        if len(self._refusals_logged) >= REFUSAL_LOG_HOSTS:
            del self._refusals_logged[next(iter(self._refusals_logged))]
        self._refusals_logged[host] = (now, 0)
        more = f" (and {unlogged} more refusals from {host} not logged)" if unlogged else ""
        log.warning("refused %s from %s: %s%s", rpc, peer, detail, more)

    def _check_identity(self, protocol_version: int, cluster: str, fingerprint: str) -> None:
        expected = self.host.expectation
        if protocol_version != expected.protocol_version:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"protocol version {protocol_version}, expected "
                            f"{expected.protocol_version}")
        if cluster != expected.cluster:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"cluster {cluster!r}, expected {expected.cluster!r}")
        if fingerprint != expected.model_fingerprint:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            fingerprint_mismatch(fingerprint, expected.model_fingerprint))

    @staticmethod
    def _check_claim(context: grpc.aio.ServicerContext, claimed: str) -> None:
        """Refuses a claimed peer id other than the client certificate's name (TLS only:
        without it there is nothing to check against)."""
        if not is_tls(context):
            return
        name = client_certificate_name(context)
        if name != claimed:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                            f"the client's certificate names {name!r} but the message claims "
                            f"to come from {claimed!r}")

    @staticmethod
    def _check_role(context: grpc.aio.ServicerContext, rpc: str, allowed: tuple[str, ...]
                    ) -> str | None:
        """Refuses a client certificate whose role may not call `rpc`; returns the role (None
        without TLS: there is no certificate to read one from)."""
        if not is_tls(context):
            return None
        role = client_certificate_role(context)
        if role not in allowed:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{rpc} needs a {' or '.join(allowed)} certificate; the client's "
                            f"certificate is {role or 'of no known role'}")
        return role

    def _check_may_pull(self, requester: str) -> None:
        """A device pulls only as a member of this peer's view or a joiner it accepted."""
        hello = self.host.hello()
        members = set(hello.members) if hello.view_id else set()
        joiners = {ticket.peer_id for ticket in hello.accepted_joins}
        if requester not in members | joiners:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{requester} is neither a member of this peer's view nor a joiner "
                            f"it accepted: only those pull parameters")

    async def Handshake(
        self, request: peer_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> peer_pb2.Hello:
        try:
            self._check_role(context, "Handshake", (DEVICE_ROLE,))
            self._check_claim(context, request.peer_id)
            self._check_identity(request.protocol_version, request.cluster,
                                 request.model_fingerprint)
            self.host.admit(request)
        except WireError as error:
            await self._refuse(context, "Handshake", error)
        return self.host.hello()

    async def PushSlices(
        self, request_iterator: AsyncIterator[Frame],
        context: grpc.aio.ServicerContext,
    ) -> peer_pb2.PushAck:
        decoder = StreamDecoder(self.host.expectation, check_pool=CHECK_POOL)
        try:
            self._check_role(context, "PushSlices", (DEVICE_ROLE,))
            async for frame in request_iterator:
                # Chunks arrive as bare memoryviews; the decoder refuses a second start.
                if isinstance(frame, peer_pb2.SliceFrame) and frame.WhichOneof("body") == "start":
                    self._check_claim(context, frame.start.sender)
                decoder.feed(frame)
            # Waits for the last checksums and finiteness scans: off the event loop.
            decoded = await asyncio.get_running_loop().run_in_executor(None, decoder.finish)
            self.host.accept_slice(decoded)
        except WireError as error:
            await self._refuse(context, "PushSlices", error)
        finally:
            decoder.close()
        return peer_pb2.PushAck(bytes_received=decoded.payload_bytes)

    async def Pull(
        self, request: peer_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Frame]:
        try:
            role = self._check_role(context, "Pull", (DEVICE_ROLE, READER_ROLE))
            self._check_claim(context, request.requester)
            if role == DEVICE_ROLE:
                self._check_may_pull(request.requester)
            self._check_identity(request.protocol_version, request.cluster,
                                 request.model_fingerprint)
            header, tensors = self.host.snapshot(request)
        except WireError as error:
            await self._refuse(context, "Pull", error)
            return
        async for frame in encode_frames_off_loop(header, tensors):
            yield frame

    async def Status(
        self, request: peer_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.StatusReply:
        return self.host.status()
