"""`peerd bench wire`: a model's parameters streamed between two processes over the real gRPC
path and, in the same run, the same bytes over a plain TCP socket.

Three processes on 127.0.0.1: this one (the conductor), a receiver serving the real
`PeerService` with a host that expects exactly the benchmark's tensors, and a sender pushing
them with `PeerClients`, so both ends run the real encode, chunk, validate and decode path. The
raw TCP baseline moves the same tensors' bytes between the same two processes: `sendall` from
the tensors' memory, `recv_into` preallocated tensors. The receiver regenerates the sender's
values from the seed and checks every transfer bit for bit; a mismatch fails the run.

Bytes on the wire are counted in a separate, untimed push through a relay on loopback that
counts the TCP payload bytes in both directions; a relay in the timed path would change the
timing it is meant to leave alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import pstats
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import torch

from peerd.bench.processes import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchError,
    Child,
    next_command,
    positive_int,
    print_result,
)
from peerd.net import GRPC_OPTIONS, PROTOCOL_VERSION, codec
from peerd.net.bulk import BulkSender, BulkServer
from peerd.net.client import PeerClients
from peerd.net.codec import DecodedStream, DecodeLimits, Expectation, WireError
from peerd.net.rpc import add_peer_service
from peerd.net.service import PeerService
from peerd.v1 import peer_pb2

MIB = 1 << 20
LOOPBACK = "127.0.0.1"
CLUSTER = "bench"
FINGERPRINT = "bench-wire"
# Transformer blocks of this width: 4 to 16 MiB matrices with small vectors in between.
WIDTH = 1024
# The slowest transfer rate worth waiting for bounds every wait after start-up.
MIN_RATE_MIB_S = 2.0
TCP_ACK = b"\x06"

Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


# ---- the parameters ---------------------------------------------------------------------------


def model_spec(mib: int) -> Spec:
    """float32 tensors totalling exactly `mib` MiB: an embedding matrix, then transformer blocks
    of width WIDTH; the embedding takes whatever whole blocks leave over."""
    block = {
        "attn.qkv.weight": (3 * WIDTH, WIDTH), "attn.qkv.bias": (3 * WIDTH,),
        "attn.proj.weight": (WIDTH, WIDTH), "attn.proj.bias": (WIDTH,),
        "mlp.fc1.weight": (4 * WIDTH, WIDTH), "mlp.fc1.bias": (4 * WIDTH,),
        "mlp.fc2.weight": (WIDTH, 4 * WIDTH), "mlp.fc2.bias": (WIDTH,),
        "ln1.weight": (WIDTH,), "ln1.bias": (WIDTH,),
        "ln2.weight": (WIDTH,), "ln2.bias": (WIDTH,),
    }
    block_values = sum(math.prod(shape) for shape in block.values())
    blocks, rest = divmod(mib * MIB // 4, block_values)
    spec: Spec = {}
    if rest:
        # A MiB and a block both hold a multiple of WIDTH float32 values: rest fills whole rows.
        spec["embed.weight"] = (torch.float32, (rest // WIDTH, WIDTH))
    for index in range(blocks):
        for name, shape in block.items():
            spec[f"blocks.{index}.{name}"] = (torch.float32, shape)
    return spec


def spec_bytes(spec: Spec) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in spec.values())


def model_parameters(spec: Spec, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for `spec`, so the receiver can rebuild what the sender holds."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)
        for name, (dtype, shape) in spec.items()
    }


def check_bit_equal(
    expected: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], path: str
) -> None:
    """Raises BenchError unless `received` holds exactly `expected`, bit for bit."""
    if received.keys() != expected.keys():
        raise BenchError(f"{path}: received tensors {sorted(received)}, sent {sorted(expected)}")
    for name, sent in expected.items():
        got = received[name]
        if got.dtype != sent.dtype or got.shape != sent.shape:
            raise BenchError(f"{path}: tensor {name!r} arrived as {got.dtype} {list(got.shape)}, "
                             f"sent as {sent.dtype} {list(sent.shape)}")
        if not torch.equal(_byte_view_tensor(got), _byte_view_tensor(sent)):
            raise BenchError(f"{path}: tensor {name!r} arrived with different bytes")


def _byte_view_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # Bytes rather than values: NaN != NaN and -0.0 == 0.0 would hide differences.
    return tensor.reshape(-1).view(torch.uint8)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's own memory, for sendall and recv_into without a copy."""
    return memoryview(_byte_view_tensor(tensor).numpy())


# ---- the receiver process ---------------------------------------------------------------------


class _BenchHost:
    """A `PeerHost` that expects exactly the benchmark's tensors and keeps the last stream."""

    def __init__(self, spec: Spec) -> None:
        self.expectation = Expectation(
            PROTOCOL_VERSION, CLUSTER, FINGERPRINT, tensor_spec=lambda _header: spec
        )
        self.accepted = 0
        self.last: DecodedStream | None = None

    def hello(self) -> peer_pb2.Hello:
        return peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                              peer_id="bench-receiver", model_fingerprint=FINGERPRINT)

    def admit(self, hello: peer_pb2.Hello) -> None:
        """The bench has one sender and no membership to record."""

    def accept_slice(self, decoded: DecodedStream) -> None:
        self.accepted += 1
        self.last = decoded

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        raise WireError(grpc.StatusCode.UNIMPLEMENTED, "the wire bench serves no pulls")

    def status(self) -> peer_pb2.StatusReply:
        return peer_pb2.StatusReply(self=self.hello())


async def _receiver(
    conn: Connection, spec: Spec, seed: int, profile: Path | None, timeout_s: float
) -> None:
    expected = model_parameters(spec, seed)
    # Allocated and touched once: the baseline measures the socket, not page faults.
    tcp_buffers = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    host = _BenchHost(spec)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_peer_service(server, PeerService(host))
    grpc_port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    listener = socket.create_server((LOOPBACK, 0))
    loop = asyncio.get_running_loop()
    bulk = BulkServer(host, None, loop)
    bulk_port = bulk.start(LOOPBACK)
    try:
        conn.send(("ready", grpc_port, listener.getsockname()[1], bulk_port))
        with _profiled(profile):
            while (command := await next_command(conn))[0] != "stop":
                if command[0] == "tcp":
                    await loop.run_in_executor(
                        None, _tcp_receive, listener, tcp_buffers, timeout_s
                    )
                elif command[0] == "check_tcp":
                    check_bit_equal(expected, tcp_buffers, "raw TCP")
                    # Zeroed so that the next transfer cannot pass on this one's bytes.
                    for buffer in tcp_buffers.values():
                        buffer.zero_()
                elif command[0] == "check_grpc":
                    if host.accepted != command[1] or host.last is None:
                        raise BenchError(f"gRPC: the receiver accepted {host.accepted} streams, "
                                         f"the sender pushed {command[1]}")
                    check_bit_equal(expected, host.last.tensors, "gRPC")
                    host.last = None
                else:
                    raise BenchError(f"receiver: unknown command {command!r}")
                conn.send(("ok",))
    finally:
        listener.close()
        bulk.stop()
        await server.stop(grace=1.0)


def _tcp_receive(
    listener: socket.socket, buffers: Mapping[str, torch.Tensor], timeout_s: float
) -> None:
    listener.settimeout(timeout_s)
    peer, _ = listener.accept()
    with peer:
        peer.settimeout(timeout_s)
        for name, tensor in buffers.items():
            view = _byte_view(tensor)
            received = 0
            while received < view.nbytes:
                count = peer.recv_into(view[received:])
                if count == 0:
                    raise BenchError(f"raw TCP: stream ended {received} bytes into {name!r}")
                received += count
        peer.sendall(TCP_ACK)


# ---- the sender process -----------------------------------------------------------------------


def _stream_header() -> peer_pb2.StreamHeader:
    return peer_pb2.StreamHeader(
        protocol_version=PROTOCOL_VERSION, cluster=CLUSTER, model_fingerprint=FINGERPRINT,
        sender="bench-sender", receiver="bench-receiver", round=1, weight=1.0,
    )


async def _sender(
    conn: Connection, spec: Spec, seed: int, profile: Path | None, timeout_s: float
) -> None:
    tensors = model_parameters(spec, seed)
    header = _stream_header()
    direct = PeerClients(push_timeout_s=timeout_s)
    bulk = BulkSender(None)
    loop = asyncio.get_running_loop()
    try:
        conn.send(("ready",))
        with _profiled(profile):
            while (command := await next_command(conn))[0] != "stop":
                if command[0] == "handshake":
                    await direct.handshake(command[1], peer_pb2.Hello(
                        protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                        peer_id="bench-sender", model_fingerprint=FINGERPRINT))
                    conn.send(("ok",))
                elif command[0] == "push":
                    _, address, chunk_bytes, fresh_channel = command
                    # A fresh channel (closed afterwards) puts connection set-up and tear-down
                    # into the relay's count, as a daemon's first push to a peer has them.
                    clients = PeerClients(push_timeout_s=timeout_s) if fresh_channel else direct
                    start = time.perf_counter()
                    acked = await clients.push(address, header, tensors, chunk_bytes)
                    elapsed = time.perf_counter() - start
                    if fresh_channel:
                        await clients.close()
                    conn.send(("ok", elapsed, acked))
                elif command[0] == "bulk":
                    start = time.perf_counter()
                    acked = await bulk.push(LOOPBACK, command[1], header, tensors)
                    conn.send(("ok", time.perf_counter() - start, acked))
                elif command[0] == "tcp":
                    elapsed = await loop.run_in_executor(
                        None, _tcp_send, command[1], tensors, timeout_s
                    )
                    conn.send(("ok", elapsed))
                else:
                    raise BenchError(f"sender: unknown command {command!r}")
    finally:
        await direct.close()


def _tcp_send(port: int, tensors: Mapping[str, torch.Tensor], timeout_s: float) -> float:
    """Seconds to send every tensor's bytes from its own memory and hear the receiver's ack."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        start = time.perf_counter()
        for tensor in tensors.values():
            sock.sendall(_byte_view(tensor))
        if sock.recv(1) != TCP_ACK:
            raise BenchError("raw TCP: the receiver closed without acknowledging")
        return time.perf_counter() - start


# ---- profiling ------------------------------------------------------------------------------


class _Profiler:
    """cProfile of the event-loop thread and of every executor thread, merged at the end:
    Python 3.11's cProfile sees only the thread that enabled it, and the codec's checksums and
    copies run on executor threads."""

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def start_thread(self) -> None:
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def write(self, path: Path) -> None:
        # This thread's first: collecting another thread's profile clears this thread's hook.
        self._profiles[0].disable()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_suffix(".txt").open("w") as text:
            stats = pstats.Stats(*self._profiles, stream=text)
            stats.dump_stats(path.with_suffix(".pstats"))
            stats.sort_stats("tottime").print_stats(40)


@contextlib.contextmanager
def _profiled(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    profiler = _Profiler()
    profiler.start_thread()
    executor = ThreadPoolExecutor(initializer=profiler.start_thread)
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        yield
    finally:
        executor.shutdown(wait=True)
        profiler.write(path)


# ---- counting the bytes on the wire -----------------------------------------------------------


class CountingRelay:
    """Forwards loopback TCP connections to `upstream_port`, counting the bytes each way."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server((LOOPBACK, 0))
        # accept() wakes up now and then to see close(): closing a socket does not wake it.
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection((LOOPBACK, self._upstream_port))
            self._sockets += [client, upstream]
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, sink, up), daemon=True)
                self._pumps.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        # A reset, or close() shutting a stuck connection, ends a pump like an end of stream.
        with contextlib.suppress(OSError):
            while count := source.recv_into(buffer):
                sink.sendall(view[:count])
                with self._lock:
                    if up:
                        self.bytes_up += count
                    else:
                        self.bytes_down += count
            sink.shutdown(socket.SHUT_WR)  # pass the end of stream on

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stops accepting, lets open connections finish (up to `timeout_s`), then cuts them."""
        self._closing.set()
        self._acceptor.join()
        self._listener.close()
        deadline = time.monotonic() + timeout_s
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv
            sock.close()
        for pump in self._pumps:
            pump.join()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---- the conductor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One timed transfer: its wall time and the CPU time each process spent on it."""

    seconds: float
    sender_cpu_s: float
    receiver_cpu_s: float


@dataclass(frozen=True)
class WireResult:
    grpc_runs: tuple[Transfer, ...]
    tcp_runs: tuple[Transfer, ...]
    payload_bytes: int
    bytes_on_wire: int
    chunk_bytes: int
    bulk_runs: tuple[Transfer, ...]
    bulk_bytes_on_wire: int

    def _rates(self, transfers: Sequence[Transfer]) -> list[float]:
        return [self.payload_bytes / MIB / transfer.seconds for transfer in transfers]

    @property
    def throughput_mib_s(self) -> float:
        return statistics.median(self._rates(self.grpc_runs))

    @property
    def tcp_mib_s(self) -> float:
        return statistics.median(self._rates(self.tcp_runs))

    @property
    def bulk_mib_s(self) -> float:
        return statistics.median(self._rates(self.bulk_runs))

    def to_json(self) -> dict[str, float | int]:
        return {
            "throughput_mib_s": round(self.throughput_mib_s, 1),
            "tcp_mib_s": round(self.tcp_mib_s, 1),
            "payload_bytes": self.payload_bytes,
            "bytes_on_wire": self.bytes_on_wire,
            "ratio_to_tcp": round(self.throughput_mib_s / self.tcp_mib_s, 4),
            "wire_overhead": round(self.bytes_on_wire / self.payload_bytes, 6),
            "chunk_bytes": self.chunk_bytes,
            "repeats": len(self.grpc_runs),
            "bulk_mib_s": round(self.bulk_mib_s, 1),
            "bulk_ratio_to_tcp": round(self.bulk_mib_s / self.tcp_mib_s, 4),
            "bulk_bytes_on_wire": self.bulk_bytes_on_wire,
            "bulk_wire_overhead": round(self.bulk_bytes_on_wire / self.payload_bytes, 6),
            **{f"{path}_cpu_ms_per_mib_{side}": round(value, 3)
               for path, runs in (("grpc", self.grpc_runs), ("bulk", self.bulk_runs),
                                  ("tcp", self.tcp_runs))
               for side, value in zip(("sender", "receiver"), self._cpu_ms_per_mib(runs),
                                      strict=True)},
        }

    def _cpu_ms_per_mib(self, transfers: Sequence[Transfer]) -> tuple[float, float]:
        mib = self.payload_bytes / MIB
        return (statistics.median(t.sender_cpu_s for t in transfers) / mib * 1000,
                statistics.median(t.receiver_cpu_s for t in transfers) / mib * 1000)

    def describe(self) -> str:
        def line(label: str, transfers: Sequence[Transfer]) -> str:
            # CPU per MiB shows where a run's time goes even when other load skews wall times.
            sender, receiver = self._cpu_ms_per_mib(transfers)
            runs = " ".join(f"{rate:.0f}" for rate in self._rates(transfers))
            return (f"{label:9} {statistics.median(self._rates(transfers)):8.1f} MiB/s  "
                    f"runs: {runs}; CPU ms/MiB: sender {sender:.2f}, receiver {receiver:.2f}")

        return "\n".join([
            f"payload   {self.payload_bytes / MIB:.0f} MiB float32, chunks of "
            f"{self.chunk_bytes // 1024} KiB",
            line("gRPC", self.grpc_runs),
            line("bulk", self.bulk_runs),
            line("raw TCP", self.tcp_runs),
            f"ratio     {self.throughput_mib_s / self.tcp_mib_s:8.3f} gRPC, "
            f"{self.bulk_mib_s / self.tcp_mib_s:.3f} bulk (to raw TCP)",
            f"on wire   {self.bytes_on_wire} bytes gRPC, "
            f"{self.bytes_on_wire / self.payload_bytes:.5f} x payload; bulk "
            f"{self.bulk_bytes_on_wire / self.payload_bytes:.5f} x payload",
        ])


def run_wire(
    mib: int, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, repeats: int = 3,
    profile_dir: Path | None = None, seed: int = 0,
) -> WireResult:
    """Streams `mib` MiB over gRPC and raw TCP `repeats` times each (after one untimed gRPC
    warm-up push), then once more through the counting relay; every transfer is verified."""
    spec = model_spec(mib)
    payload = spec_bytes(spec)
    timeout_s = 30.0 + mib / MIN_RATE_MIB_S
    with contextlib.ExitStack() as cleanup:
        receiver = Child("receiver", _receiver, (
            spec, seed, profile_dir / "receiver" if profile_dir else None, timeout_s))
        cleanup.callback(receiver.stop)
        sender = Child("sender", _sender, (
            spec, seed, profile_dir / "sender" if profile_dir else None, timeout_s))
        cleanup.callback(sender.stop)
        grpc_port, tcp_port, bulk_port = receiver.reply(START_TIMEOUT_S)
        sender.reply(START_TIMEOUT_S)
        address = f"{LOOPBACK}:{grpc_port}"
        sender.call("handshake", address, timeout_s=timeout_s)
        pushes = 0

        def transfer(start: Callable[[], float]) -> Transfer:
            # Both children are idle but for the transfer between these reads.
            sender_cpu, receiver_cpu = sender.cpu_seconds(), receiver.cpu_seconds()
            seconds = start()
            return Transfer(seconds, sender.cpu_seconds() - sender_cpu,
                            receiver.cpu_seconds() - receiver_cpu)

        def push(to: str, fresh_channel: bool) -> float:
            nonlocal pushes
            elapsed, acked = sender.call("push", to, chunk_bytes, fresh_channel,
                                         timeout_s=timeout_s)
            pushes += 1
            if acked != payload:
                raise BenchError(f"gRPC: the receiver acknowledged {acked} of {payload} bytes")
            return elapsed

        def push_bulk(port: int) -> float:
            nonlocal pushes
            elapsed, acked = sender.call("bulk", port, timeout_s=timeout_s)
            pushes += 1
            if acked != payload:
                raise BenchError(f"bulk: the receiver acknowledged {acked} of {payload} bytes")
            return elapsed

        def send_tcp() -> float:
            receiver.send("tcp")
            (elapsed,) = sender.call("tcp", tcp_port, timeout_s=timeout_s)
            receiver.reply(timeout_s)
            return elapsed

        # Warm-up: the channel's flow-control window grows during its first large stream, as
        # it has by a daemon's second round.
        push(address, False)
        receiver.call("check_grpc", pushes, timeout_s=timeout_s)
        grpc_runs: list[Transfer] = []
        bulk_runs: list[Transfer] = []
        tcp_runs: list[Transfer] = []
        for _ in range(repeats):
            # Interleaved, so that other load on a shared machine hits every path alike.
            grpc_runs.append(transfer(lambda: push(address, False)))
            receiver.call("check_grpc", pushes, timeout_s=timeout_s)
            bulk_runs.append(transfer(lambda: push_bulk(bulk_port)))
            receiver.call("check_grpc", pushes, timeout_s=timeout_s)
            tcp_runs.append(transfer(send_tcp))
            receiver.call("check_tcp", timeout_s=timeout_s)
        with CountingRelay(grpc_port) as relay:
            push(relay.address, True)
        receiver.call("check_grpc", pushes, timeout_s=timeout_s)
        with CountingRelay(bulk_port) as bulk_relay:
            push_bulk(bulk_relay.port)
        receiver.call("check_grpc", pushes, timeout_s=timeout_s)
    return WireResult(tuple(grpc_runs), tuple(tcp_runs), payload,
                      relay.bytes_up + relay.bytes_down, chunk_bytes, tuple(bulk_runs),
                      bulk_relay.bytes_up + bulk_relay.bytes_down)


# ---- command line -----------------------------------------------------------------------------


def _chunk_kib(text: str) -> int:
    value = positive_int(text)
    limit = DecodeLimits().max_chunk_bytes // 1024
    if value > limit:
        raise argparse.ArgumentTypeError(f"{value} KiB is above the receiver's {limit} KiB limit")
    return value


def add_wire_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `wire` (under `peerd bench`); its `func` runs the benchmark."""
    wire = subparsers.add_parser(
        "wire", help="gRPC parameter streaming against raw TCP, between two local processes",
        description="Stream N MiB of float32 parameters from one process to another over the "
                    "real gRPC path and over a plain TCP socket; report throughput (medians) "
                    "and the bytes on the wire.",
    )
    wire.add_argument("--mib", type=positive_int, default=256,
                      help="payload size in MiB (default: %(default)s)")
    wire.add_argument("--chunk-kib", type=_chunk_kib, default=codec.DEFAULT_CHUNK_BYTES // 1024,
                      help="gRPC chunk size in KiB (default: %(default)s, the codec's)")
    wire.add_argument("--repeat", type=positive_int, default=3,
                      help="timed transfers per path; medians are reported (default: %(default)s)")
    wire.add_argument("--json", action="store_true", help="print one JSON object")
    wire.add_argument("--profile", type=Path, default=None, metavar="DIR",
                      help="write cProfile stats of the sender and receiver to DIR")
    wire.set_defaults(func=run_wire_command)


def run_wire_command(args: argparse.Namespace) -> int:
    return print_result(
        "wire", lambda: run_wire(args.mib, args.chunk_kib * 1024, args.repeat, args.profile),
        args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="bench", required=True)
    add_wire_parser(subparsers)
    subparsers.choices["wire"].prog = "python -m peerd.bench.wire"
    args = parser.parse_args(["wire", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
