"""A daemon as its peers see it: the address they dial, and what they ask of it (the `PeerHost`
its gRPC service calls): introductions, slices, pulls and status, answered from the membership,
the round driver and the slice transport."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import ifaddr
import torch

from peerd.algorithm.driver import RoundDriver
from peerd.algorithm.plan import Member, check_widths, decode_widths, width_group_names
from peerd.config import DaemonConfig
from peerd.models.base import DEPTH, ModelSpec
from peerd.net import PROTOCOL_VERSION
from peerd.net.codec import DecodedStream, Expectation, WireError
from peerd.net.control import check_hello
from peerd.net.membership import Membership
from peerd.net.slices import GrpcSlices
from peerd.v1 import peer_pb2


def advertised_host(config: DaemonConfig) -> str:
    """The address peers should dial: the bind address, else the mDNS interface, else the
    first non-loopback IPv4 address of this machine."""
    if config.host not in ("0.0.0.0", ""):
        return config.host
    if config.mdns_interface:
        return config.mdns_interface
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    return "127.0.0.1"


class DaemonHost:
    def __init__(self, spec: ModelSpec, cluster: str, fingerprint: str,
                 membership: Membership, driver: RoundDriver, slices: GrpcSlices) -> None:
        self.spec = spec
        self.blocks = spec.groups[DEPTH].units if DEPTH in spec.groups else None
        self.cluster = cluster
        self.fingerprint = fingerprint
        self.membership = membership
        self.driver = driver
        self.slices = slices
        self.expectation = Expectation(PROTOCOL_VERSION, cluster, fingerprint,
                                       slices.expected_tensors, slices.stream_ended)

    def hello(self) -> peer_pb2.Hello:
        return self.membership.hello(PROTOCOL_VERSION, self.cluster, self.fingerprint,
                                     self.driver.round_index)

    def admit(self, hello: peer_pb2.Hello) -> None:
        membership, round_index = self.membership, self.driver.round_index
        if membership.claims_elsewhere(hello.peer_id, hello.address):
            raise WireError(grpc.StatusCode.ALREADY_EXISTS,
                            f"peer id {hello.peer_id} is already taken by another address")
        if not 0 < hello.capacity.mu <= 1:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"capacity mu={hello.capacity.mu} is outside (0, 1]")
        depth = hello.capacity.depth
        if depth and (self.blocks is None or depth > self.blocks):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"capacity depth={depth} does not fit this model "
                            f"({self.blocks or 'no early exits'} blocks)")
        if hello.capacity.widths:
            try:
                check_widths(Member(hello.peer_id, hello.capacity.mu, depth or None,
                                    decode_widths(width_group_names(self.spec.groups),
                                                  hello.capacity.widths)),
                             self.spec.groups)
            except ValueError as error:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"capacity widths: {error}") from None
        check_hello(hello, membership, round_index)
        membership.observe(hello, round_index)
        membership.tick(round_index)

    def accept_slice(self, decoded: DecodedStream) -> None:
        self.slices.accept(decoded)

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        return self.slices.snapshot(request)

    def status(self) -> peer_pb2.StatusReply:
        membership, driver = self.membership, self.driver
        view = membership.view
        positions = {peer: i for i, peer in enumerate(view.ids)} if view else {}
        current = membership.view_at(driver.round_index)
        neighbours = set(driver.context(driver.round_index).neighbours) if current else set()
        peers = [
            peer_pb2.PeerStatus(
                peer_id=peer.peer_id, address=peer.address,
                capacity=peer_pb2.Capacity(mu=peer.mu, depth=peer.depth or 0,
                                           frozen_blocks=peer.frozen_blocks,
                                           widths=list(peer.widths)),
                position=positions.get(peer.peer_id, -1), round=peer.round,
                last_seen_unix=peer.last_seen, bytes_sent=peer.bytes_sent,
                bytes_received=peer.bytes_received, neighbour=peer.peer_id in neighbours,
            )
            for peer in sorted(membership.known.values(), key=lambda p: p.peer_id)
        ]
        return peer_pb2.StatusReply(
            self=self.hello(), peers=peers, bytes_sent=driver.bytes_sent,
            bytes_received=driver.bytes_received, train_loss=driver.last_loss,
            rounds_done=driver.rounds_done,
        )
