"""Tests of the wire codec (peerd.net.codec): round trips, every refusal, and a mutation fuzz."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.net import codec
from peerd.net import frames as wire_frames
from peerd.net.codec import (
    DEFAULT_CHUNK_BYTES,
    WIRE_DTYPES,
    DecodedStream,
    DecodeLimits,
    Expectation,
    StreamDecoder,
    TensorSpec,
    WireError,
    decode_frames,
    encode_frames,
    payload_bytes,
)
from peerd.v1 import peer_pb2

PROTOCOL = 1
CLUSTER = "lab"
FINGERPRINT = "fp-3a9c"
OPEN = Expectation(PROTOCOL, CLUSTER, FINGERPRINT)
NO_LIMITS = DecodeLimits()  # the defaults, far above anything these tests send
SHAPES = [(), (1,), (0,), (3, 0), (7,), (2, 3, 4), (5, 1, 3)]
Code = grpc.StatusCode


# ---- helpers ----------------------------------------------------------------------------------


def make_header(**fields: object) -> peer_pb2.StreamHeader:
    base: dict[str, object] = {
        "protocol_version": PROTOCOL,
        "cluster": CLUSTER,
        "model_fingerprint": FINGERPRINT,
        "sender": "peer-a",
        "receiver": "peer-b",
        "round": 7,
        "weight": 120.0,
    }
    return peer_pb2.StreamHeader(**(base | fields))


def sample(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random finite values covering the dtype's range (sign bits, high bytes)."""
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 1000).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def spec_of(tensors: Mapping[str, torch.Tensor]) -> Callable[[peer_pb2.StreamHeader], TensorSpec]:
    spec = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
    return lambda header: spec


def expecting(tensors: Mapping[str, torch.Tensor]) -> Expectation:
    return Expectation(PROTOCOL, CLUSTER, FINGERPRINT, tensor_spec=spec_of(tensors))


def assert_bit_identical(
    decoded: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]
) -> None:
    # Order is not part of the contract: a plan is a mapping, and any order of it is legal.
    assert sorted(decoded) == sorted(sent)
    for name, tensor in sent.items():
        assert decoded[name].dtype == tensor.dtype, name
        assert decoded[name].shape == tensor.shape, name
        assert raw_bytes(decoded[name]) == raw_bytes(tensor), name


def encoded(
    header: peer_pb2.StreamHeader, tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[peer_pb2.SliceFrame]:
    """A stream as protobuf messages: what a peer using the generated bindings would see."""
    return [peer_pb2.SliceFrame.FromString(wire_frames.serialize_frame(frame))
            for frame in encode_frames(header, tensors, chunk_bytes)]


def clone(frame: peer_pb2.SliceFrame) -> peer_pb2.SliceFrame:
    return peer_pb2.SliceFrame.FromString(frame.SerializeToString())


def edited(
    frames: list[peer_pb2.SliceFrame], index: int, **fields: object
) -> list[peer_pb2.SliceFrame]:
    """A copy of `frames` with fields of frame `index` (its header, or `chunk`) replaced."""
    out = [clone(frame) for frame in frames]
    kind = out[index].WhichOneof("body")
    body = out[index] if kind == "chunk" else getattr(out[index], kind)
    for field, value in fields.items():
        if field == "shape":
            body.ClearField("shape")
            body.shape.extend(value)
        else:
            setattr(body, field, value)
    return out


def header_index(frames: list[peer_pb2.SliceFrame], name: str) -> int:
    kinds = [frame.WhichOneof("body") for frame in frames]
    return next(i for i, f in enumerate(frames) if kinds[i] == "tensor" and f.tensor.name == name)


def refusal(
    frames: Iterable[peer_pb2.SliceFrame],
    expectation: Expectation = OPEN,
    limits: DecodeLimits = NO_LIMITS,
) -> WireError:
    with pytest.raises(WireError) as info:
        decode_frames(frames, expectation, limits)
    return info.value


def assert_refused(error: WireError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code == code, error
    for word in words:
        assert word in error.detail, (word, error.detail)


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(WIRE_DTYPES))
def test_round_trip_every_dtype_and_shape(dtype_name: str) -> None:
    dtype = WIRE_DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(len(dtype_name))
    tensors = {f"t{i}": sample(dtype, shape, generator) for i, shape in enumerate(SHAPES)}
    tensors["transposed"] = sample(dtype, (5, 6), generator).t()
    tensors["strided"] = sample(dtype, (4, 9), generator)[:, ::2]
    tensors["offset"] = sample(dtype, (10,), generator)[3:]  # contiguous, mid-storage
    assert not tensors["transposed"].is_contiguous()
    frames = encoded(make_header(), tensors, chunk_bytes=16)

    for expectation in (OPEN, expecting(tensors)):
        decoded = decode_frames(frames, expectation)
        assert_bit_identical(decoded.tensors, tensors)
        assert list(decoded.tensors) == list(tensors)  # in the order sent
        assert decoded.payload_bytes == payload_bytes(tensors)
        assert decoded.header.round == 7 and decoded.header.sender == "peer-a"

    # Layout: start, then per tensor its header and ceil(nbytes / 16) chunks (none when empty).
    assert frames[0].start.tensors == len(tensors)
    assert frames[0].start.total_bytes == payload_bytes(tensors)
    expected_kinds = ["start"]
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        expected_kinds += ["tensor"] + ["chunk"] * math.ceil(nbytes / 16)
        header = frames[header_index(frames, name)].tensor
        assert (header.dtype, list(header.shape), header.nbytes) == (
            dtype_name,
            list(tensor.shape),
            nbytes,
        )
        assert header.crc32 == zlib.crc32(raw_bytes(tensor))
    assert [frame.WhichOneof("body") for frame in frames] == expected_kinds


def test_round_trip_large_tensor_chunking() -> None:
    tensor = torch.randn(48 << 18, generator=torch.Generator().manual_seed(0))  # 48 MiB
    nbytes = tensor.numel() * 4
    frames = encoded(make_header(), {"big": tensor})
    chunks = [frame.chunk for frame in frames[2:]]
    assert len(chunks) == math.ceil(nbytes / DEFAULT_CHUNK_BYTES)
    assert all(len(chunk) <= DEFAULT_CHUNK_BYTES for chunk in chunks)
    assert sum(len(chunk) for chunk in chunks) == nbytes
    decoded = decode_frames(frames, OPEN)
    assert torch.equal(decoded.tensors["big"].view(torch.uint8), tensor.view(torch.uint8))


def test_chunk_size_does_not_change_the_result() -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "w": sample(torch.bfloat16, (33, 17), generator),
        "b": sample(torch.float64, (29,), generator),
        "n": sample(torch.int32, (), generator),
        "empty": sample(torch.float16, (0, 4), generator),
    }
    payloads = []
    for chunk_bytes in (1, 7, 64 << 10):
        frames = encoded(make_header(), tensors, chunk_bytes=chunk_bytes)
        assert all(len(f.chunk) <= chunk_bytes for f in frames if f.WhichOneof("body") == "chunk")
        assert_bit_identical(decode_frames(frames, expecting(tensors)).tensors, tensors)
        payloads.append(b"".join(f.chunk for f in frames if f.WhichOneof("body") == "chunk"))
    assert payloads[0] == payloads[1] == payloads[2]


def test_encoder_copies_the_header_and_reads_through_autograd() -> None:
    header = make_header()
    weight = torch.randn(3, 2, requires_grad=True)
    frames = encoded(header, {"w": weight})
    assert header.tensors == 0 and header.total_bytes == 0  # the caller's header is untouched
    assert (frames[0].start.tensors, frames[0].start.total_bytes) == (1, 24)
    assert torch.equal(decode_frames(frames, OPEN).tensors["w"], weight.detach())


def test_empty_stream_round_trips() -> None:
    decoded = decode_frames(encode_frames(make_header(), {}), expecting({}))
    assert decoded.tensors == {} and decoded.payload_bytes == 0


def test_big_endian_host_swaps_bytes_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    # On this little-endian host, pretending to be big-endian must put each value's bytes in
    # reverse order on the wire and restore them on decode; one-byte dtypes are left alone.
    monkeypatch.setattr(codec, "_LITTLE_ENDIAN_HOST", False)
    tensors = {
        "f": torch.tensor([1.0, -2.5], dtype=torch.float32),
        "i": torch.tensor([1], dtype=torch.int64),
        "u": torch.tensor([1, 2], dtype=torch.uint8),
    }
    frames = encoded(make_header(), tensors)
    chunks = [f.chunk for f in frames if f.WhichOneof("body") == "chunk"]
    assert chunks[0] == b"\x3f\x80\x00\x00\xc0\x20\x00\x00"
    assert chunks[1] == b"\x00" * 7 + b"\x01"
    assert chunks[2] == b"\x01\x02"
    assert_bit_identical(decode_frames(frames, expecting(tensors)).tensors, tensors)


def test_incremental_decoder_matches_decode_frames() -> None:
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    decoder = StreamDecoder(expecting(tensors))
    for frame in encode_frames(make_header(), tensors, chunk_bytes=8):
        decoder.feed(frame)
    decoded = decoder.finish()
    assert isinstance(decoded, DecodedStream)
    assert_bit_identical(decoded.tensors, tensors)
    with pytest.raises(RuntimeError):
        decoder.feed(peer_pb2.SliceFrame(chunk=b"x"))


def test_encoder_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="complex64"):
        encode_frames(make_header(), {"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="int16"):
        encode_frames(make_header(), {"s": torch.zeros(2, dtype=torch.int16)})
    with pytest.raises(ValueError, match="name"):
        encode_frames(make_header(), {"": torch.zeros(2)})
    with pytest.raises(ValueError, match="chunk_bytes"):
        encode_frames(make_header(), {"a": torch.zeros(2)}, chunk_bytes=0)


# ---- refusals ---------------------------------------------------------------------------------

GEN = torch.Generator().manual_seed(2)
SENT = {
    "layer.weight": sample(torch.float32, (4, 3), GEN),
    "layer.bias": sample(torch.float32, (3,), GEN),
    "steps": sample(torch.int64, (), GEN),
    "mask": sample(torch.bool, (5,), GEN),
}
FRAMES = encoded(make_header(), SENT, chunk_bytes=16)  # weight has 3 chunks
PLANNED = expecting(SENT)


def test_the_reference_stream_is_valid() -> None:
    assert_bit_identical(decode_frames(FRAMES, PLANNED).tensors, SENT)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("protocol_version", 2, ["protocol version", "2", "1"]),
        ("cluster", "other", ["cluster", "'other'", "'lab'"]),
        ("model_fingerprint", "fp-0000", ["model fingerprint fp-0000", f"expected {FINGERPRINT}"]),
        # The half after the dot digests the planner settings (peerd/agreement.py).
        ("model_fingerprint", f"{FINGERPRINT}.0badf00d",
         ["planner fingerprint 0badf00d", "drift_period"]),
        # A hostile fingerprint is clipped in the message.
        ("model_fingerprint", "f" * 10_000, ["model fingerprint " + "f" * 40 + ",", FINGERPRINT]),
    ],
)
def test_wrong_peer_identity_is_a_failed_precondition(
    field: str, value: object, words: list[str]
) -> None:
    error = refusal(edited(FRAMES, 0, **{field: value}), PLANNED)
    assert_refused(error, Code.FAILED_PRECONDITION, *words)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0])
def test_bad_weight(weight: float) -> None:
    assert_refused(refusal(edited(FRAMES, 0, weight=weight)), Code.INVALID_ARGUMENT, "weight")


def test_frames_before_the_start_header() -> None:
    assert_refused(refusal(FRAMES[1:]), Code.INVALID_ARGUMENT, "start header", "tensor frame")
    chunk_first = [FRAMES[2], *FRAMES]
    assert_refused(refusal(chunk_first), Code.INVALID_ARGUMENT, "start header", "chunk frame")
    empty_first = [peer_pb2.SliceFrame(), *FRAMES]
    assert_refused(refusal(empty_first), Code.INVALID_ARGUMENT, "start header", "empty")


def test_malformed_frame_sequence() -> None:
    assert_refused(
        refusal([FRAMES[0], FRAMES[2], *FRAMES[1:]]), Code.INVALID_ARGUMENT, "chunk before any"
    )
    assert_refused(refusal([*FRAMES[:2], FRAMES[0], *FRAMES[2:]]), Code.INVALID_ARGUMENT, "second")
    assert_refused(refusal([*FRAMES, peer_pb2.SliceFrame()]), Code.INVALID_ARGUMENT, "empty frame")
    empty_chunk = [*FRAMES[:2], peer_pb2.SliceFrame(chunk=b""), *FRAMES[2:]]
    assert_refused(refusal(empty_chunk), Code.INVALID_ARGUMENT, "empty chunk", "layer.weight")


@pytest.mark.parametrize("dtype", ["complex64", "int16", "Float32", "", "float8_e4m3fn"])
def test_dtype_outside_the_allow_list(dtype: str) -> None:
    error = refusal(edited(FRAMES, 1, dtype=dtype))
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.weight'", f"dtype {dtype!r}", "not one of")


def test_nbytes_not_matching_shape() -> None:
    error = refusal(edited(FRAMES, 1, nbytes=44))
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.weight'", "declares 44", "holds 48")


def test_tensor_not_in_the_plan() -> None:
    error = refusal(edited(FRAMES, 1, name="layer.extra"), PLANNED)
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.extra'", "not one the plan expects")


def test_duplicate_tensor() -> None:
    error = refusal(edited(FRAMES, header_index(FRAMES, "layer.bias"), name="layer.weight"))
    assert_refused(error, Code.INVALID_ARGUMENT, "duplicate", "'layer.weight'")


@pytest.mark.parametrize("name", ["", "x" * 257])
def test_bad_tensor_name(name: str) -> None:
    assert_refused(refusal(edited(FRAMES, 1, name=name)), Code.INVALID_ARGUMENT, "tensor name")


def test_shape_different_from_the_plan() -> None:
    error = refusal(edited(FRAMES, 1, shape=[3, 4]), PLANNED)
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.weight'", "[3, 4]", "expected [4, 3]")


def test_dtype_different_from_the_plan() -> None:
    error = refusal(edited(FRAMES, 1, dtype="int32"), PLANNED)
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.weight'", "int32", "expected float32")


def test_too_many_dims() -> None:
    error = refusal(edited(FRAMES, 1, shape=[1] * 17 + [12]))
    assert_refused(error, Code.INVALID_ARGUMENT, "'layer.weight'", "18 dims")


def test_plan_disagreeing_with_the_header() -> None:
    fewer = {name: SENT[name] for name in ("layer.weight", "layer.bias", "steps")}
    assert_refused(refusal(FRAMES, expecting(fewer)), Code.INVALID_ARGUMENT, "4 tensors", "3")
    wider = dict(SENT, mask=torch.zeros(6, dtype=torch.bool))
    assert_refused(refusal(FRAMES, expecting(wider)), Code.INVALID_ARGUMENT, "bytes", "plan")


def test_tensor_spec_errors_propagate() -> None:
    def stale_round(header: peer_pb2.StreamHeader) -> TensorSpec:
        raise WireError(Code.FAILED_PRECONDITION, f"round {header.round} is outside the window")

    expectation = Expectation(PROTOCOL, CLUSTER, FINGERPRINT, tensor_spec=stale_round)
    assert_refused(refusal(FRAMES, expectation), Code.FAILED_PRECONDITION, "round 7")


def test_chunk_overflowing_its_tensor() -> None:
    # layer.weight is 48 bytes in chunks of 16: a fourth chunk overflows it mid-stream.
    overflow = [*FRAMES[:5], peer_pb2.SliceFrame(chunk=b"\0"), *FRAMES[5:]]
    error = refusal(overflow)
    assert_refused(error, Code.INVALID_ARGUMENT, "overflows", "'layer.weight'", "48")
    longer_last = edited(FRAMES, 4, chunk=FRAMES[4].chunk + b"\0")
    assert_refused(refusal(longer_last), Code.INVALID_ARGUMENT, "17 bytes overflows")
    trailing = [*FRAMES, peer_pb2.SliceFrame(chunk=b"\1")]
    assert_refused(refusal(trailing), Code.INVALID_ARGUMENT, "overflows tensor 'mask'")


def test_limits() -> None:
    total = payload_bytes(SENT)
    cases = [
        (DecodeLimits(max_chunk_bytes=15), ["chunk of 16 bytes", "'layer.weight'", "15"]),
        (DecodeLimits(max_total_bytes=total - 1), [f"{total} bytes", f"limit is {total - 1}"]),
        (DecodeLimits(max_tensors=3), ["4 tensors", "limit is 3"]),
        (DecodeLimits(max_tensor_bytes=47), ["'layer.weight'", "47 bytes per tensor"]),
    ]
    for limits, words in cases:
        assert_refused(refusal(FRAMES, limits=limits), Code.RESOURCE_EXHAUSTED, *words)
    # A zero-element tensor cannot smuggle in absurd dimensions either.
    empty = {"e": torch.zeros(0, 2)}
    huge_dims = edited(encoded(make_header(), empty), 1, shape=[0, 2**62])
    assert_refused(refusal(huge_dims), Code.RESOURCE_EXHAUSTED, "'e'", "per tensor")


def test_header_totals_that_do_not_add_up() -> None:
    assert_refused(refusal(edited(FRAMES, 0, tensors=3)), Code.INVALID_ARGUMENT, "beyond the 3")
    total = payload_bytes(SENT)
    error = refusal(edited(FRAMES, 0, total_bytes=total - 1))
    assert_refused(error, Code.INVALID_ARGUMENT, "'mask'", f"more than the {total - 1}")
    error = refusal(edited(FRAMES, 0, total_bytes=total + 1))
    assert_refused(error, Code.INVALID_ARGUMENT, f"hold {total} bytes", f"announced {total + 1}")


def test_crc_mismatch() -> None:
    chunk = bytearray(FRAMES[3].chunk)
    chunk[5] ^= 0x01
    error = refusal(edited(FRAMES, 3, chunk=bytes(chunk)))
    assert_refused(error, Code.DATA_LOSS, "'layer.weight'", "CRC-32")
    error = refusal(edited(FRAMES, header_index(FRAMES, "steps"), crc32=12345))
    assert_refused(error, Code.DATA_LOSS, "'steps'", "00003039")


def test_truncated_streams() -> None:
    assert_refused(refusal([]), Code.DATA_LOSS, "before its start header")
    assert_refused(refusal(FRAMES[:3]), Code.DATA_LOSS, "'layer.weight'", "16 of its 48")
    bias = header_index(FRAMES, "layer.bias")
    assert_refused(refusal(FRAMES[:bias]), Code.DATA_LOSS, "after 1 of the 4 tensors")
    missing_chunk = FRAMES[:3] + FRAMES[4:]
    assert_refused(
        refusal(missing_chunk), Code.DATA_LOSS, "'layer.weight'", "32 of its 48", "next tensor"
    )


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("numel", "position"), [(6, 5), (100_003, 0), (100_003, 77_777)])
def test_non_finite_values(dtype: torch.dtype, bad: float, numel: int, position: int) -> None:
    # Large tensors too: the check is a vectorised reduction that must not lose a lane.
    values = torch.linspace(-3, 3, numel, dtype=dtype)
    values[position] = bad
    frames = encoded(make_header(), {"ok": torch.ones(2), "w": values}, 1 << 16)
    assert_refused(refusal(frames), Code.INVALID_ARGUMENT, "'w'", "1 non-finite")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_finite_values_pass(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    values = torch.tensor([info.max, info.min, info.tiny, info.tiny / 4, -0.0], dtype=dtype)
    decoded = decode_frames(encode_frames(make_header(), {"x": values}), OPEN)
    assert raw_bytes(decoded.tensors["x"]) == raw_bytes(values)


def test_bool_bytes_other_than_zero_and_one() -> None:
    mask = header_index(FRAMES, "mask")
    forged = bytes([0, 1, 2, 1, 0])
    frames = edited(edited(FRAMES, mask + 1, chunk=forged), mask, crc32=zlib.crc32(forged))
    assert_refused(refusal(frames), Code.INVALID_ARGUMENT, "'mask'", "bool")


def test_a_refused_decoder_stays_refused() -> None:
    decoder = StreamDecoder(PLANNED)
    with pytest.raises(WireError) as first:
        decoder.feed(FRAMES[1])
    for call in (lambda: decoder.feed(FRAMES[0]), decoder.finish):
        with pytest.raises(WireError) as again:
            call()
        assert again.value is first.value


# ---- mutation fuzz ----------------------------------------------------------------------------

FUZZ_GEN = torch.Generator().manual_seed(3)
FUZZ_SENT = {
    "w": sample(torch.float32, (2, 3), FUZZ_GEN),
    "h": sample(torch.bfloat16, (3,), FUZZ_GEN),
    "n": sample(torch.int64, (), FUZZ_GEN),
    "m": sample(torch.bool, (4,), FUZZ_GEN),
    "e": sample(torch.float16, (0, 2), FUZZ_GEN),
    "u": sample(torch.uint8, (5,), FUZZ_GEN),
    "d": sample(torch.float64, (2,), FUZZ_GEN),
}
FUZZ_PAYLOADS = sorted(raw_bytes(tensor) for tensor in FUZZ_SENT.values() if tensor.numel())
FUZZ_STREAMS = {
    chunk_bytes: [
        wire_frames.serialize_frame(frame)
        for frame in encode_frames(make_header(), FUZZ_SENT, chunk_bytes=chunk_bytes)
    ]
    for chunk_bytes in (3, 8, 64)
}
FUZZ_LIMITS = DecodeLimits(max_total_bytes=4096, max_tensor_bytes=1024, max_chunk_bytes=64)
# Strategies are built once: building them per draw costs more than decoding the stream.
U32 = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1))
U64 = st.one_of(st.integers(0, 128), st.integers(0, 2**64 - 1))
TEXT = st.one_of(
    st.sampled_from([CLUSTER, FINGERPRINT, *FUZZ_SENT, "", "x" * 300]), st.text(max_size=12)
)
START_FIELDS: dict[str, st.SearchStrategy[object]] = {
    "protocol_version": U32,
    "cluster": TEXT,
    "model_fingerprint": TEXT,
    "sender": TEXT,
    "round": U64,
    "weight": st.floats(),
    "tensors": U32,
    "total_bytes": U64,
}
TENSOR_FIELDS: dict[str, st.SearchStrategy[object]] = {
    "name": TEXT,
    "dtype": st.sampled_from([*WIRE_DTYPES, "int16", "complex64"]) | st.text(max_size=12),
    "shape": st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)), max_size=20),
    "nbytes": U64,
    "crc32": U32,
}
FIELD_EDITS = {
    body: st.sampled_from(sorted(fields)).flatmap(
        lambda field, fields=fields: st.tuples(st.just(field), fields[field])
    )
    for body, fields in (("start", START_FIELDS), ("tensor", TENSOR_FIELDS))
}
MUTATIONS = st.sampled_from(
    ["drop", "duplicate", "swap", "truncate", "extend", "scramble", "field", "insert"]
)
POSITION = st.integers(0, 1 << 10)  # taken modulo the current length
SHORT_BYTES = st.binary(min_size=1, max_size=8)
ANY_CHUNK = st.binary(max_size=70)  # up to beyond FUZZ_LIMITS.max_chunk_bytes
STRAY_FRAMES = st.sampled_from(
    [peer_pb2.SliceFrame(), peer_pb2.SliceFrame(start=make_header(tensors=1))]
) | ANY_CHUNK.map(lambda chunk: peer_pb2.SliceFrame(chunk=chunk))
STREAM_CHUNK_BYTES = st.sampled_from(sorted(FUZZ_STREAMS))


def mutate(draw: st.DrawFn, frames: list[peer_pb2.SliceFrame]) -> None:
    """Applies one random mutation to `frames` in place."""
    kind = draw(MUTATIONS)
    if kind == "insert" or not frames:
        frames.insert(draw(POSITION) % (len(frames) + 1), clone(draw(STRAY_FRAMES)))
        return
    index = draw(POSITION) % len(frames)
    frame = frames[index]
    body = frame.WhichOneof("body")
    if kind == "drop":
        del frames[index]
    elif kind == "duplicate":
        frames.insert(draw(POSITION) % (len(frames) + 1), clone(frame))
    elif kind == "swap":
        other = draw(POSITION) % len(frames)
        frames[index], frames[other] = frames[other], frames[index]
    # The remaining kinds rewrite the frame's content: a chunk's bytes or one header field.
    elif body == "chunk" and kind == "truncate":
        frame.chunk = frame.chunk[: draw(POSITION) % max(len(frame.chunk), 1)]
    elif body == "chunk" and kind == "extend":
        frame.chunk += draw(SHORT_BYTES)
    elif body == "chunk":
        size = len(frame.chunk)
        frame.chunk = draw(st.binary(min_size=size, max_size=size) | ANY_CHUNK)
    elif body in FIELD_EDITS:
        field, value = draw(FIELD_EDITS[body])
        message = getattr(frame, body)
        if field == "shape":
            message.ClearField("shape")
            message.shape.extend(value)
        else:
            setattr(message, field, value)


@st.composite
def mutated_streams(draw: st.DrawFn, max_mutations: int) -> list[peer_pb2.SliceFrame]:
    serialized = FUZZ_STREAMS[draw(STREAM_CHUNK_BYTES)]
    frames = [peer_pb2.SliceFrame.FromString(data) for data in serialized]
    for _ in range(draw(st.integers(1, max_mutations))):
        mutate(draw, frames)
    return frames


def decode_or_refuse(
    frames: list[peer_pb2.SliceFrame], expectation: Expectation
) -> DecodedStream | None:
    # As a daemon receives them: serialised, then parsed by peerd's own frame parser.
    wire = [wire_frames.parse_frame(frame.SerializeToString()) for frame in frames]
    try:
        return decode_frames(wire, expectation, FUZZ_LIMITS)
    except WireError as error:
        assert error.code in (
            Code.INVALID_ARGUMENT,
            Code.FAILED_PRECONDITION,
            Code.RESOURCE_EXHAUSTED,
            Code.DATA_LOSS,
        )
        assert error.detail
        return None


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_streams(max_mutations=3))
def test_fuzz_with_plan_accepts_only_the_sent_tensors(frames: list[peer_pb2.SliceFrame]) -> None:
    # With the plan fixing names, dtypes and shapes, and the CRC fixing bytes, any stream that
    # passes must carry exactly what was sent (header fields outside the checks may differ).
    decoded = decode_or_refuse(frames, expecting(FUZZ_SENT))
    if decoded is not None:
        assert_bit_identical(decoded.tensors, FUZZ_SENT)
        assert decoded.header.cluster == CLUSTER
        assert decoded.header.model_fingerprint == FINGERPRINT


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_streams(max_mutations=2))
def test_fuzz_without_plan_accepts_only_legal_streams(frames: list[peer_pb2.SliceFrame]) -> None:
    # Without a plan, names, dtypes, shapes, order and empty tensors may be rewritten into
    # another legal stream, but the CRCs still pin each tensor's bytes, and the result must be
    # internally consistent.
    decoded = decode_or_refuse(frames, OPEN)
    if decoded is not None:
        tensors = decoded.tensors
        payloads = sorted(raw_bytes(tensor) for tensor in tensors.values() if tensor.numel())
        assert payloads == FUZZ_PAYLOADS
        assert decoded.payload_bytes == decoded.header.total_bytes == payload_bytes(FUZZ_SENT)
        assert len(tensors) == decoded.header.tensors
        for tensor in tensors.values():
            assert tensor.dtype in WIRE_DTYPES.values()
            if tensor.dtype.is_floating_point:
                assert bool(torch.isfinite(tensor).all())
        again = decode_frames(encode_frames(decoded.header, tensors, chunk_bytes=5), OPEN)
        assert_bit_identical(again.tensors, tensors)


async def test_off_loop_encoding_yields_the_same_frames() -> None:
    tensors = {"big": torch.arange(300_000, dtype=torch.float32), "small": torch.ones(3, 2)}
    expected = list(codec.encode_frames(make_header(), tensors, chunk_bytes=64 * 1024))
    produced = [frame async for frame in codec.encode_frames_off_loop(
        make_header(), tensors, chunk_bytes=64 * 1024)]
    assert [wire_frames.serialize_frame(f) for f in produced] == [
        wire_frames.serialize_frame(f) for f in expected]
    assert sum(isinstance(f, memoryview) for f in produced) == math.ceil(1_200_000 / 65536) + 1


# ---- frames on the wire -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20])
def test_chunk_frames_serialise_as_protobuf_does(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert wire_frames.serialize_frame(memoryview(data)) == peer_pb2.SliceFrame(
        chunk=data).SerializeToString()
    parsed = wire_frames.parse_frame(wire_frames.serialize_frame(memoryview(data)))
    assert isinstance(parsed, memoryview) and bytes(parsed) == data


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40) | st.binary(max_size=8).map(lambda tail: b"\x1a\x05abcde" + tail))
def test_parse_frame_agrees_with_protobuf(data: bytes) -> None:
    # Whatever bytes arrive, the fast path yields a chunk only where protobuf reads exactly one
    # chunk, and otherwise protobuf itself parses (or refuses) the message.
    try:
        reference = peer_pb2.SliceFrame.FromString(data)
    except Exception:  # protobuf's DecodeError: a WireError naming the frame, from peerd
        with pytest.raises(WireError, match="not a SliceFrame"):
            wire_frames.parse_frame(data)
        return
    parsed = wire_frames.parse_frame(data)
    if isinstance(parsed, memoryview):
        assert reference.WhichOneof("body") == "chunk" and reference.chunk == bytes(parsed)
    else:
        assert parsed == reference


def test_checks_on_a_pool_refuse_what_inline_checks_refuse() -> None:
    mask = header_index(FRAMES, "mask")
    forged = bytes([0, 1, 2, 1, 0])
    bad_crc = edited(FRAMES, mask + 1, chunk=forged)
    bad_bool = edited(bad_crc, mask, crc32=zlib.crc32(forged))
    for frames, code, word in ((bad_crc, Code.DATA_LOSS, "CRC-32"),
                               (bad_bool, Code.INVALID_ARGUMENT, "bool")):
        decoder = StreamDecoder(PLANNED, check_pool=codec.CHECK_POOL)
        with pytest.raises(WireError) as info:
            for frame in frames:
                decoder.feed(frame)
            decoder.finish()
        assert_refused(info.value, code, "'mask'", word)
        with pytest.raises(WireError):  # and it stays refused
            decoder.finish()
    decoder = StreamDecoder(PLANNED, check_pool=codec.CHECK_POOL)
    for frame in FRAMES:
        decoder.feed(frame)
    assert_bit_identical(decoder.finish().tensors, SENT)
