"""Calls to other daemons that carry no tensors (handshake, goodbye, status): one cached
channel per address (and, with TLS, per peer name the server's certificate must carry),
explicit deadlines on every call. Nothing here imports torch, so `peerd status` loads none of
it; the calls that stream tensors are peerd/net/client.py's."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from peerd.net import GRPC_OPTIONS
from peerd.net.frames import WireError
from peerd.net.rpc import peer_stub
from peerd.net.tls import TARGET_NAME_OPTION, TlsIdentity, probe_peer_name
from peerd.v1 import peer_pb2, peer_pb2_grpc

if TYPE_CHECKING:
    from peerd.net.membership import Membership

HANDSHAKE_TIMEOUT_S = 3.0
GOODBYE_TIMEOUT_S = 2.0
STATUS_TIMEOUT_S = 5.0


class PeerChannels:
    """With `tls`, every call goes over mutual TLS to a server whose certificate names the peer
    the call is meant for; without it (`--insecure`, the wire benchmark), over plain TCP."""

    def __init__(self, tls: TlsIdentity | None = None) -> None:
        self.tls = tls
        self._channels: dict[tuple[str, str | None], grpc.aio.Channel] = {}
        self._probed: dict[str, str] = {}  # address -> the name its certificate carried

    def stub(self, address: str, peer_id: str | None = None) -> peer_pb2_grpc.PeerStub:
        """A stub for `address`; with TLS, the server must present a certificate for
        `peer_id`."""
        name = peer_id if self.tls is not None else None
        channel = self._channels.get((address, name))
        if channel is None:
            if self.tls is None:
                channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            elif name is None:
                raise ValueError(f"a TLS call to {address} needs the peer id it must reach")
            else:
                channel = grpc.aio.secure_channel(
                    address, self.tls.channel_credentials(),
                    options=[*GRPC_OPTIONS, (TARGET_NAME_OPTION, name)])
            self._channels[(address, name)] = channel
        return peer_stub(channel)

    async def _expected_name(self, address: str, peer_id: str | None) -> str | None:
        """The name the server at `address` must prove: the peer id when the caller knows it,
        else (a bootstrap address) the one its certificate carried when first probed."""
        if self.tls is None or peer_id is not None:
            return peer_id
        if address not in self._probed:
            try:
                self._probed[address] = await probe_peer_name(address, self.tls,
                                                              HANDSHAKE_TIMEOUT_S)
            except ConnectionError as error:
                raise WireError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        return self._probed[address]

    async def handshake(
        self, address: str, hello: peer_pb2.Hello, peer_id: str | None = None
    ) -> peer_pb2.Hello:
        """Introduce ourselves to the peer at `address` (`peer_id` when known, e.g. from an
        mDNS record: only a server with that certificate answers). The reply must introduce
        the peer the certificate names."""
        name = await self._expected_name(address, peer_id)
        try:
            reply = await self.stub(address, name).Handshake(hello, timeout=HANDSHAKE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            if peer_id is None:
                self._probed.pop(address, None)  # another peer may answer there next time
            raise
        if name is not None and reply.peer_id != name:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{address} holds the certificate of {name} but introduces itself "
                            f"as {reply.peer_id}")
        return reply

    async def say_goodbye(self, membership: Membership, hello: peer_pb2.Hello) -> None:
        """One last handshake with every fellow member, carrying `hello` (leaving set); at most
        GOODBYE_TIMEOUT_S in all: a member that does not answer learns it from silence."""
        view = membership.view
        fellows = [membership.known[p] for p in (view.ids if view else ())
                   if p in membership.known]
        if not fellows:
            return
        calls = [self.stub(peer.address, peer.peer_id).Handshake(hello,
                                                                  timeout=GOODBYE_TIMEOUT_S)
                 for peer in fellows]
        await asyncio.gather(*calls, return_exceptions=True)

    async def status(self, address: str, peer_id: str | None = None) -> peer_pb2.StatusReply:
        name = await self._expected_name(address, peer_id)
        return await self.stub(address, name).Status(peer_pb2.StatusRequest(),
                                                     timeout=STATUS_TIMEOUT_S)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
