"""Calls to other daemons: one cached channel per address, explicit deadlines on every call."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc
import torch

from peerd.net import GRPC_OPTIONS
from peerd.net.codec import (
    CHECK_POOL,
    DEFAULT_CHUNK_BYTES,
    DecodedStream,
    Expectation,
    StreamDecoder,
    encode_frames_off_loop,
)
from peerd.net.rpc import peer_stub
from peerd.v1 import peer_pb2, peer_pb2_grpc

HANDSHAKE_TIMEOUT_S = 3.0
STATUS_TIMEOUT_S = 5.0


class PeerClients:
    def __init__(self, push_timeout_s: float = 300.0) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.push_timeout_s = push_timeout_s

    def stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            self._channels[address] = channel
        return peer_stub(channel)

    async def handshake(self, address: str, hello: peer_pb2.Hello) -> peer_pb2.Hello:
        return await self.stub(address).Handshake(hello, timeout=HANDSHAKE_TIMEOUT_S)

    async def status(self, address: str) -> peer_pb2.StatusReply:
        return await self.stub(address).Status(peer_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)

    async def push(
        self, address: str, header: peer_pb2.StreamHeader, tensors: Mapping[str, torch.Tensor],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> int:
        """Stream a slice; returns the payload bytes the receiver acknowledged."""
        frames = encode_frames_off_loop(header, tensors, chunk_bytes)
        ack = await self.stub(address).PushSlices(frames, timeout=self.push_timeout_s)
        return ack.bytes_received

    async def pull(
        self, address: str, request: peer_pb2.PullRequest, expectation: Expectation,
        timeout_s: float = 120.0,
    ) -> DecodedStream:
        decoder = StreamDecoder(expectation, check_pool=CHECK_POOL)
        async for frame in self.stub(address).Pull(request, timeout=timeout_s):
            decoder.feed(frame)
        # Waits for the last checksums: off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, decoder.finish)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
