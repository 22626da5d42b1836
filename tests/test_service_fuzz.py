"""Malformed streams through the real gRPC path: PeerService on a live server, frames sent as
raw bytes. Whatever arrives, the server answers with a specific status, stays up, and hands
the host nothing but exactly what was sent (issue 6: "no crash, no state change")."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import FUZZ_SENT, assert_bit_identical, expecting, mutated_streams

from peerd.net.codec import DecodedStream, WireError, payload_bytes
from peerd.net.rpc import SERVICE, add_peer_service
from peerd.net.service import PeerService
from peerd.v1 import peer_pb2

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
}
CALL_TIMEOUT_S = 10.0


class RecordingHost:
    """Keeps every stream the service accepts: the state nothing refused may touch."""

    def __init__(self) -> None:
        self.expectation = expecting(FUZZ_SENT)
        self.accepted: list[DecodedStream] = []

    def hello(self) -> peer_pb2.Hello:
        return peer_pb2.Hello(peer_id="fuzz-target")

    def admit(self, hello: peer_pb2.Hello) -> None:
        """Nothing to record."""

    def accept_slice(self, decoded: DecodedStream) -> None:
        self.accepted.append(decoded)

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        raise WireError(grpc.StatusCode.UNIMPLEMENTED, "no pulls here")

    def status(self) -> peer_pb2.StatusReply:
        return peer_pb2.StatusReply(self=self.hello(), rounds_done=len(self.accepted))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[RecordingHost, grpc.Channel]]:
    host = RecordingHost()
    ready = threading.Event()
    port: list[int] = []
    loop = asyncio.new_event_loop()
    stopping = asyncio.Event()

    async def serve() -> None:
        server = grpc.aio.server()
        add_peer_service(server, PeerService(host))
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await stopping.wait()
        await server.stop(grace=1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
        yield host, channel
    loop.call_soon_threadsafe(stopping.set)
    thread.join(10)


def push_raw(channel: grpc.Channel, messages: list[bytes]) -> peer_pb2.PushAck:
    call = channel.stream_unary(f"/{SERVICE}/PushSlices", request_serializer=lambda raw: raw,
                                response_deserializer=peer_pb2.PushAck.FromString)
    return call(iter(messages), timeout=CALL_TIMEOUT_S)


def check_one(served: tuple[RecordingHost, grpc.Channel], messages: list[bytes]) -> None:
    host, channel = served
    before = len(host.accepted)
    try:
        ack = push_raw(channel, messages)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, (error.code(), error.details())
        assert error.details()
        assert len(host.accepted) == before
        return
    assert len(host.accepted) == before + 1
    assert ack.bytes_received == payload_bytes(FUZZ_SENT)
    assert_bit_identical(host.accepted[-1].tensors, FUZZ_SENT)


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated_streams(max_mutations=3))
def test_mutated_streams_over_grpc(
    served: tuple[RecordingHost, grpc.Channel], frames: list[peer_pb2.SliceFrame]
) -> None:
    check_one(served, [frame.SerializeToString() for frame in frames])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_arbitrary_bytes_over_grpc(
    served: tuple[RecordingHost, grpc.Channel], messages: list[bytes]
) -> None:
    check_one(served, messages)


def test_the_server_is_still_up_and_took_the_valid_stream(
    served: tuple[RecordingHost, grpc.Channel],
) -> None:
    from test_codec import make_header

    from peerd.net.codec import encode_frames
    from peerd.net.frames import serialize_frame

    host, channel = served
    before = len(host.accepted)
    frames = [serialize_frame(f) for f in encode_frames(make_header(), FUZZ_SENT, 8)]
    assert push_raw(channel, frames).bytes_received == payload_bytes(FUZZ_SENT)
    assert len(host.accepted) == before + 1
