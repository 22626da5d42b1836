"""Calls to other daemons that stream tensors (push, pull), through the wire codec, over the
channels of peerd/net/channels.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch

from peerd.net.channels import PeerChannels
from peerd.net.codec import (
    CHECK_POOL,
    DEFAULT_CHUNK_BYTES,
    DecodedStream,
    Expectation,
    StreamDecoder,
    encode_frames_off_loop,
)
from peerd.net.tls import TlsIdentity
from peerd.v1 import peer_pb2


class PeerClients(PeerChannels):
    """Every call to other daemons: those of `PeerChannels`, and the tensor streams."""

    def __init__(self, tls: TlsIdentity | None = None, push_timeout_s: float = 300.0) -> None:
        super().__init__(tls)
        self.push_timeout_s = push_timeout_s

    async def push(
        self, address: str, header: peer_pb2.StreamHeader, tensors: Mapping[str, torch.Tensor],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> int:
        """Stream a slice to `header.receiver`; returns the payload bytes it acknowledged."""
        frames = encode_frames_off_loop(header, tensors, chunk_bytes)
        ack = await self.stub(address, header.receiver).PushSlices(frames,
                                                                   timeout=self.push_timeout_s)
        return ack.bytes_received

    async def pull(
        self, address: str, peer_id: str, request: peer_pb2.PullRequest,
        expectation: Expectation, timeout_s: float = 120.0,
    ) -> DecodedStream:
        """Fetch parameters from `peer_id` at `address`."""
        decoder = StreamDecoder(expectation, check_pool=CHECK_POOL)
        async for frame in self.stub(address, peer_id).Pull(request, timeout=timeout_s):
            decoder.feed(frame)
        # Waits for the last checksums: off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, decoder.finish)
