"""Frames on the wire, without torch: a `SliceFrame` to and from its bytes, and the error a
receiver answers a peer with.

Inside peerd a chunk frame is a bare `memoryview` of the tensor's bytes, not a protobuf message:
`serialize_frame` and `parse_frame` turn it into and out of exactly the bytes protobuf would
use for `SliceFrame(chunk=...)`, with one copy instead of upb's three (BENCHMARKS.md). The codec
(peerd/net/codec.py) builds and checks the frames; this module is what the gRPC method table
and the calls that carry no tensors (`peerd status`) need of it, so they never import torch.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from peerd.v1 import peer_pb2

# A frame as peerd's own code passes it: a protobuf message for the stream and tensor headers,
# the bare bytes for a chunk.
Frame = peer_pb2.SliceFrame | memoryview


class WireError(Exception):
    """A peer sent something the codec refuses; `code` is the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail


# What a failed call to a peer raises: gRPC's error, or peerd's own check of the answer.
CALL_ERRORS = (grpc.aio.AioRpcError, WireError)


def call_failure(error: grpc.aio.AioRpcError | WireError) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a failed call, whichever of CALL_ERRORS it raised."""
    if isinstance(error, WireError):
        return error.code, error.detail
    return error.code(), error.details() or ""


_CHUNK_TAG = 0x1A  # SliceFrame field 3 (chunk), wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 10


def serialize_frame(frame: Frame) -> bytes:
    """A frame's protobuf encoding; a chunk is built straight from its memory."""
    if isinstance(frame, memoryview):
        return b"".join((bytes((_CHUNK_TAG,)), _varint(frame.nbytes), frame))
    return frame.SerializeToString()


def parse_frame(data: bytes) -> Frame:
    """Inverse of `serialize_frame`. A message that is exactly one chunk field comes back as a
    view into `data` (no copy); anything else is parsed by protobuf, and bytes it cannot parse
    are a WireError (gRPC would otherwise answer UNKNOWN with a Python traceback's words)."""
    if data[:1] == bytes((_CHUNK_TAG,)):
        length, start = _read_varint(data, 1)
        if length is not None and start + length == len(data):
            return memoryview(data)[start:]
    try:
        return peer_pb2.SliceFrame.FromString(data)
    except DecodeError:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"a message of {len(data)} bytes is not a SliceFrame") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, start: int) -> tuple[int | None, int]:
    """(value, index after it), or (None, start) if `data` holds no complete varint there."""
    value = 0
    for position in range(start, min(len(data), start + _MAX_VARINT_BYTES)):
        byte = data[position]
        value |= (byte & 0x7F) << (7 * (position - start))
        if byte < 0x80:
            return value, position + 1
    return None, start
