"""The Peer service's gRPC method table, shared by the client and the server.

The generated bindings (peerd/v1/peer_pb2_grpc.py) serialise every frame through protobuf;
here the slice streams use `frames.serialize_frame` / `frames.parse_frame` instead, which put
the same bytes on the wire with fewer copies, so peers built either way interoperate.
"""

from __future__ import annotations

import grpc

from peerd.net.frames import parse_frame, serialize_frame
from peerd.v1 import peer_pb2, peer_pb2_grpc

SERVICE = "peerd.v1.Peer"


def peer_stub(channel: grpc.aio.Channel) -> peer_pb2_grpc.PeerStub:
    stub = peer_pb2_grpc.PeerStub(channel)
    stub.PushSlices = channel.stream_unary(
        f"/{SERVICE}/PushSlices", request_serializer=serialize_frame,
        response_deserializer=peer_pb2.PushAck.FromString)
    stub.Pull = channel.unary_stream(
        f"/{SERVICE}/Pull", request_serializer=peer_pb2.PullRequest.SerializeToString,
        response_deserializer=parse_frame)
    return stub


def add_peer_service(server: grpc.aio.Server, servicer: peer_pb2_grpc.PeerServicer) -> None:
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake, request_deserializer=peer_pb2.Hello.FromString,
            response_serializer=peer_pb2.Hello.SerializeToString),
        "PushSlices": grpc.stream_unary_rpc_method_handler(
            servicer.PushSlices, request_deserializer=parse_frame,
            response_serializer=peer_pb2.PushAck.SerializeToString),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=peer_pb2.PullRequest.FromString,
            response_serializer=serialize_frame),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=peer_pb2.StatusRequest.FromString,
            response_serializer=peer_pb2.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
