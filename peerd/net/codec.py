"""The wire codec: named tensors <-> a stream of `SliceFrame` messages, validated on arrival.

A stream is one `StreamHeader` frame, then per tensor a `TensorHeader` frame followed by the
tensor's raw little-endian bytes in `chunk` frames. There is no pickle: a receiver only ever
reinterprets bytes as one of the allow-listed dtypes, after it has checked names, dtypes,
shapes and sizes against what it expects, and it hands out nothing until the whole stream has
passed every check (Invariant 5). Encoding is a generator and decoding is incremental, so a
caller can drive either off the event loop one frame at a time (Invariant 6).

Inside peerd a chunk frame is a bare `memoryview` of the tensor's bytes, not a protobuf message
(peerd/net/frames.py puts it on the wire).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from isal.isal_zlib import crc32  # zlib's CRC-32, about 3x faster (BENCHMARKS.md)

from peerd.agreement import fingerprint_mismatch
from peerd.algorithm.numerics import all_finite
from peerd.net.frames import Frame, WireError
from peerd.v1 import peer_pb2

# Small enough that a frame stays far below gRPC's 4 MiB default message limit and a stream
# interleaves with other traffic; to be tuned by measurement.
DEFAULT_CHUNK_BYTES = 1 << 20  # measured: BENCHMARKS.md, "Wire throughput"

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_WIRE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}

# Bounds on header fields that DecodeLimits does not cover: torch refuses tensors of more than
# 64 dims (a hostile shape must fail as a WireError, not inside torch), and names end up in
# logs and error messages.
MAX_NAME_CHARS = 256
MAX_DIMS = 16

# The wire is little-endian; a big-endian host swaps bytes on the way out and in.
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

TensorSpec = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]

# Checksums and finiteness scans of received tensors: off the event loop, while the next tensor
# arrives. Its tasks never wait on anything, so a caller may block on them from any thread.
CHECK_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peerd-check")


@dataclass(frozen=True)
class DecodeLimits:
    max_total_bytes: int = 4 << 30
    max_tensor_bytes: int = 2 << 30
    max_chunk_bytes: int = 4 << 20
    max_tensors: int = 10_000


@dataclass(frozen=True)
class Expectation:
    """What the receiver accepts, from its own state rather than from the sender's word."""

    protocol_version: int
    cluster: str
    model_fingerprint: str
    # Given the stream header, exactly the tensors (name -> dtype, shape) that must follow,
    # computed from the receiver's view of the sender's plan. It may raise WireError itself
    # (e.g. for a round outside the window). None accepts any allow-listed tensors.
    tensor_spec: Callable[[peer_pb2.StreamHeader], TensorSpec] | None = None
    # Called once with the header of every stream `tensor_spec` took, when the stream ends
    # (`StreamDecoder.close`): accepted, refused or cut. What the receiver set aside for a
    # stream in flight (a slot in its inbox) is given back here.
    stream_ended: Callable[[peer_pb2.StreamHeader], None] | None = None


@dataclass(frozen=True)
class DecodedStream:
    header: peer_pb2.StreamHeader
    tensors: dict[str, torch.Tensor]
    payload_bytes: int


class BuiltOnRead(Mapping[str, torch.Tensor]):
    """Tensors made one at a time as a stream reads them (a snapshot rebuilt per parameter):
    a stream of them holds one at once, never the whole set. `layouts` gives every tensor's
    dtype and shape up front, for the stream's header."""

    def __init__(self, layouts: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 make: Callable[[str], torch.Tensor]) -> None:
        self.layouts = dict(layouts)
        self._make = make

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.layouts:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)


def _layouts(tensors: Mapping[str, torch.Tensor]
             ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if isinstance(tensors, BuiltOnRead):
        return tensors.layouts
    return {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw tensor bytes a stream of these tensors carries, without any framing."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in _layouts(tensors).values())


# ---- encoding ---------------------------------------------------------------------------------


def encode_frames(
    header: peer_pb2.StreamHeader,
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Frame]:
    """The frames of one stream: `header` (a copy, with `tensors` and `total_bytes` filled in),
    then each tensor's header and chunks of at most `chunk_bytes` raw little-endian bytes.

    Checks every tensor before returning, so that a bad input fails before anything is sent;
    bytes are read lazily, one tensor at a time, as the caller pulls frames (a `BuiltOnRead`
    tensor is made only then). Chunks are views of the tensors' own memory (on a little-endian
    host): the tensors must not change until the frames have been serialised.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    layouts = _layouts(tensors)
    for name, (dtype, shape) in layouts.items():
        _check_outgoing(name, dtype, len(shape))
    start = peer_pb2.StreamHeader()
    start.CopyFrom(header)
    start.tensors = len(layouts)
    start.total_bytes = payload_bytes(tensors)
    return _generate_frames(start, tensors, chunk_bytes)


def _check_outgoing(name: str, dtype: torch.dtype, dims: int) -> None:
    # The same rules the decoder applies, so a local encode never builds a stream peers refuse.
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"tensor name must have 1 to {MAX_NAME_CHARS} chars: {name!r}")
    if dtype not in _WIRE_NAMES:
        raise ValueError(f"tensor {name!r} has dtype {dtype}, not one of {_dtype_list()}")
    if dims > MAX_DIMS:
        raise ValueError(f"tensor {name!r} has {dims} dims, at most {MAX_DIMS} allowed")


def _generate_frames(
    start: peer_pb2.StreamHeader,
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int,
) -> Iterator[Frame]:
    yield peer_pb2.SliceFrame(start=start)
    layouts = _layouts(tensors)
    for name, layout in layouts.items():
        tensor = tensors[name]
        if (tensor.dtype, tuple(tensor.shape)) != layout:
            raise ValueError(f"tensor {name!r} was announced as {layout}, made as "
                             f"{(tensor.dtype, tuple(tensor.shape))}")
        raw = memoryview(_wire_bytes(tensor))
        yield peer_pb2.SliceFrame(
            tensor=peer_pb2.TensorHeader(
                name=name,
                dtype=_WIRE_NAMES[tensor.dtype],
                shape=tensor.shape,
                nbytes=raw.nbytes,
                crc32=crc32(raw),
            )
        )
        for offset in range(0, raw.nbytes, chunk_bytes):
            yield raw[offset : offset + chunk_bytes]


def _wire_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as flat little-endian bytes, sharing its memory where possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    if not _LITTLE_ENDIAN_HOST and flat.element_size() > 1:
        raw = raw.view(f"u{flat.element_size()}").byteswap().view(np.uint8)
    return raw


# ---- decoding ---------------------------------------------------------------------------------


@dataclass
class _Incoming:
    """The tensor whose chunks are arriving, decoded straight into its final buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    expected_crc: int
    buffer: torch.Tensor  # uint8, nbytes long
    window: memoryview  # writable view of buffer
    received: int = 0


class StreamDecoder:
    """Validates frames as they arrive; `finish()` returns the stream only if all of it passed.

    The first WireError poisons the decoder: later calls raise it again, so a caller cannot
    merge half of a refused stream by mistake. With a `check_pool`, each complete tensor's
    checksum and finiteness scan run there while later frames arrive; `finish()` waits for them.
    """

    def __init__(
        self, expectation: Expectation, limits: DecodeLimits = DecodeLimits(),
        check_pool: Executor | None = None,
    ) -> None:
        self._expectation = expectation
        self._limits = limits
        self._check_pool = check_pool
        self._checks: deque[Future[None]] = deque()
        self._header: peer_pb2.StreamHeader | None = None
        self._spec: TensorSpec | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._current: _Incoming | None = None
        self._announced_bytes = 0  # sum of nbytes over the tensor headers so far
        self._error: WireError | None = None
        self._finished = False
        self._opened = False  # tensor_spec took the header: `close` owes a stream_ended

    def feed(self, frame: Frame) -> None:
        """Checks one frame and copies its bytes into place; raises WireError on the first fault."""
        self._check_usable()
        try:
            self._feed(frame)
        except WireError as error:
            self._error = error
            raise

    def finish(self) -> DecodedStream:
        """Call when the stream has ended: everything the header announced must have arrived."""
        self._check_usable()
        try:
            decoded = self._finish()
        except WireError as error:
            self._error = error
            raise
        self._finished = True
        return decoded

    def close(self) -> None:
        """The stream is over, whatever its fate (call it in a `finally`): the expectation's
        `stream_ended` hears of a stream its `tensor_spec` took. Later calls do nothing."""
        if self._opened and self._expectation.stream_ended is not None:
            assert self._header is not None  # set before tensor_spec took it
            self._expectation.stream_ended(self._header)
        self._opened = False

    def fill_current(self, fill: Callable[[memoryview], None]) -> None:
        """The bulk path (peerd/net/bulk.py): the tensor whose header was just fed gets all its
        bytes from `fill(window)`, which must fill the writable view of its buffer (e.g. by
        `recv_into`); the tensor is then complete and checked like one that came in chunks."""
        self._check_usable()
        current = self._current
        if current is None:  # an empty tensor completes with its header
            return
        try:
            fill(current.window)
        except BaseException:
            # A stream cut mid-tensor is not usable any more.
            self._error = self._truncated(current, "the connection broke")
            raise
        current.received = current.nbytes
        self._complete_current()

    def _check_usable(self) -> None:
        if self._finished:
            raise RuntimeError("StreamDecoder used after finish()")
        if self._error is not None:
            raise self._error

    def _feed(self, frame: Frame) -> None:
        kind = "chunk" if isinstance(frame, memoryview) else frame.WhichOneof("body")
        if self._header is None:
            if kind != "start":
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream must open with a start header, got {kind or 'an empty'} frame",
                )
            self._open(frame.start)
        elif kind == "tensor":
            self._collect_checks(wait=False)
            self._begin_tensor(frame.tensor)
        elif kind == "chunk":
            self._take_chunk(frame if isinstance(frame, memoryview) else frame.chunk)
        elif kind == "start":
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "second start header in one stream")
        else:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "empty frame (no body set)")

    def _open(self, header: peer_pb2.StreamHeader) -> None:
        expected = self._expectation
        limits = self._limits
        for field, got, want in (
            ("protocol version", header.protocol_version, expected.protocol_version),
            ("cluster", header.cluster, expected.cluster),
        ):
            if got != want:
                raise WireError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{field} {_show(got)} does not match this peer's {_show(want)}",
                )
        if header.model_fingerprint != expected.model_fingerprint:
            raise WireError(
                grpc.StatusCode.FAILED_PRECONDITION,
                fingerprint_mismatch(header.model_fingerprint, expected.model_fingerprint),
            )
        # The weight scales the sender's values in the merge: a NaN or negative one poisons it.
        if not (math.isfinite(header.weight) and header.weight >= 0):
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"weight {header.weight} is not a finite non-negative number",
            )
        if header.tensors > limits.max_tensors:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"header announces {header.tensors} tensors, limit is {limits.max_tensors}",
            )
        if header.total_bytes > limits.max_total_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"header announces {header.total_bytes} bytes, limit is {limits.max_total_bytes}",
            )
        self._header = peer_pb2.StreamHeader()
        self._header.CopyFrom(header)
        if expected.tensor_spec is not None:
            spec = dict(expected.tensor_spec(header))
            self._opened = True
            if len(spec) != header.tensors:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"header announces {header.tensors} tensors, the plan expects {len(spec)}",
                )
            spec_bytes = sum(math.prod(shape) * dtype.itemsize for dtype, shape in spec.values())
            if spec_bytes != header.total_bytes:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"header announces {header.total_bytes} bytes, the plan expects {spec_bytes}",
                )
            self._spec = spec

    def _begin_tensor(self, tensor_header: peer_pb2.TensorHeader) -> None:
        header = self._header
        assert header is not None  # _feed opens the stream first
        if self._current is not None:
            raise self._truncated(self._current, "the next tensor header")
        name = tensor_header.name
        if len(self._tensors) >= header.tensors:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {_show(name)} is beyond the {header.tensors} the header announced",
            )
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor name {_show(name)} must have 1 to {MAX_NAME_CHARS} chars",
            )
        if name in self._tensors:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate tensor {name!r}")
        expected: tuple[torch.dtype, tuple[int, ...]] | None = None
        if self._spec is not None:
            expected = self._spec.get(name)
            if expected is None:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {name!r} is not one the plan expects from this sender",
                )
        dtype = WIRE_DTYPES.get(tensor_header.dtype)
        if dtype is None:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} has dtype {_show(tensor_header.dtype)}, "
                f"not one of {_dtype_list()}",
            )
        if expected is not None and dtype != expected[0]:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} has dtype {tensor_header.dtype}, "
                f"expected {_WIRE_NAMES.get(expected[0], expected[0])}",
            )
        if len(tensor_header.shape) > MAX_DIMS:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} has {len(tensor_header.shape)} dims, at most {MAX_DIMS} allowed",
            )
        shape = tuple(tensor_header.shape)
        if expected is not None and shape != tuple(expected[1]):
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} has shape {list(shape)}, expected {list(expected[1])}",
            )
        # Zero dims count as one here so that an empty tensor cannot carry absurd other dims.
        bound_bytes = math.prod(max(size, 1) for size in shape) * dtype.itemsize
        if bound_bytes > self._limits.max_tensor_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tensor {name!r} of shape {list(shape)} exceeds the limit of "
                f"{self._limits.max_tensor_bytes} bytes per tensor",
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if tensor_header.nbytes != nbytes:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} declares {tensor_header.nbytes} bytes, but shape {list(shape)} "
                f"of {tensor_header.dtype} holds {nbytes}",
            )
        if self._announced_bytes + nbytes > header.total_bytes:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {name!r} brings the payload to {self._announced_bytes + nbytes} bytes, "
                f"more than the {header.total_bytes} the header announced",
            )
        self._announced_bytes += nbytes
        # One allocation per tensor, bounded by the checks above; chunks are copied into it.
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._current = _Incoming(
            name, dtype, shape, nbytes, tensor_header.crc32, buffer, memoryview(buffer.numpy())
        )
        if nbytes == 0:
            self._complete_current()

    def _take_chunk(self, chunk: bytes | memoryview) -> None:
        current = self._current
        if current is None:
            if not self._tensors:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "chunk before any tensor header")
            last_name, last = next(reversed(self._tensors.items()))
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk of {len(chunk)} bytes overflows tensor {last_name!r}, which already "
                f"has all its {last.numel() * last.element_size()} bytes",
            )
        size = len(chunk)
        if size == 0:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT, f"empty chunk in tensor {current.name!r}"
            )
        if size > self._limits.max_chunk_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"chunk of {size} bytes in tensor {current.name!r} exceeds the limit of "
                f"{self._limits.max_chunk_bytes} bytes per chunk",
            )
        end = current.received + size
        if end > current.nbytes:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk of {size} bytes overflows tensor {current.name!r}: "
                f"{current.received} of its {current.nbytes} bytes had arrived",
            )
        current.window[current.received : end] = chunk
        current.received = end
        if end == current.nbytes:
            self._complete_current()

    def _complete_current(self) -> None:
        current = self._current
        assert current is not None  # called only while a tensor is arriving
        self._current = None
        self._tensors[current.name] = current.buffer.view(current.dtype).reshape(current.shape)
        if self._check_pool is None:
            _check_tensor(current)
        else:
            self._checks.append(self._check_pool.submit(_check_tensor, current))

    def _collect_checks(self, wait: bool) -> None:
        """Raises the first failed check; `wait` blocks until every check has run."""
        while self._checks and (wait or self._checks[0].done()):
            self._checks.popleft().result()

    def _finish(self) -> DecodedStream:
        header = self._header
        if header is None:
            raise WireError(grpc.StatusCode.DATA_LOSS, "stream ended before its start header")
        if self._current is not None:
            raise self._truncated(self._current, "the end of the stream")
        if len(self._tensors) != header.tensors:
            raise WireError(
                grpc.StatusCode.DATA_LOSS,
                f"stream ended after {len(self._tensors)} of the {header.tensors} tensors "
                f"the header announced",
            )
        if self._announced_bytes != header.total_bytes:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensors hold {self._announced_bytes} bytes, the header announced "
                f"{header.total_bytes}",
            )
        self._collect_checks(wait=True)
        return DecodedStream(header, dict(self._tensors), self._announced_bytes)

    @staticmethod
    def _truncated(current: _Incoming, what: str) -> WireError:
        return WireError(
            grpc.StatusCode.DATA_LOSS,
            f"tensor {current.name!r} got {current.received} of its {current.nbytes} bytes "
            f"before {what}",
        )


def _check_tensor(current: _Incoming) -> None:
    """The checks that read every byte of a complete tensor: checksum, then values."""
    actual_crc = crc32(current.window)
    if actual_crc != current.expected_crc:
        raise WireError(
            grpc.StatusCode.DATA_LOSS,
            f"tensor {current.name!r}: CRC-32 of the received bytes is {actual_crc:08x}, "
            f"the header says {current.expected_crc:08x}",
        )
    if not _LITTLE_ENDIAN_HOST and current.dtype.itemsize > 1:
        current.buffer.numpy().view(f"u{current.dtype.itemsize}").byteswap(inplace=True)
    tensor = current.buffer.view(current.dtype).reshape(current.shape)
    if current.dtype.is_floating_point and not all_finite(tensor):
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor {current.name!r} has {bad} non-finite values (NaN or inf)",
        )
    # Any byte but 0 or 1 would be a bool that torch treats inconsistently.
    if current.dtype == torch.bool and current.nbytes and int(current.buffer.max()) > 1:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor {current.name!r} is bool but holds bytes other than 0 and 1",
        )


def decode_frames(
    frames: Iterable[Frame],
    expectation: Expectation,
    limits: DecodeLimits = DecodeLimits(),
) -> DecodedStream:
    decoder = StreamDecoder(expectation, limits)
    for frame in frames:
        decoder.feed(frame)
    return decoder.finish()


def _dtype_list() -> str:
    return ", ".join(WIRE_DTYPES)


def _show(value: object) -> str:
    """A peer-supplied value for an error message, clipped so a hostile one cannot flood logs."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


async def encode_frames_off_loop(
    header: peer_pb2.StreamHeader,
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> AsyncIterator[Frame]:
    """`encode_frames` for an event loop: the checksum of each tensor runs on a worker thread,
    batched so that a thread hop carries about 4 MiB of frames."""
    frames = encode_frames(header, tensors, chunk_bytes)
    per_batch = max(1, (4 << 20) // chunk_bytes)
    loop = asyncio.get_running_loop()
    while True:
        batch = await loop.run_in_executor(None, list, itertools.islice(frames, per_batch))
        if not batch:
            return
        for frame in batch:
            yield frame
