"""`peerd bench exchange`: one exchange-and-merge step of N peers on loopback, fully connected.

Each peer is a process holding a transformer of about M MiB at mu = 1 with its own initial
values. It runs the daemon's round machinery without the training: the `Engine` plans the
round and builds the outbox, `PeerClients.push` streams each neighbour its slice over gRPC, the
real `PeerService` validates what arrives against the plans once (`Engine.expected_counts` for
the header, the decoder for every value, off the event loop, as in the daemon), and
`Engine.merge_checked` averages. A step is timed by this process (the
conductor) from telling every peer to start until the last one has merged.

In the same run each peer also sends the same bytes to every other peer over raw TCP sockets:
the time that all-to-all transfer takes is the floor for the step on this machine.

The first, untimed step checks the result: at mu = 1 every peer must end up with the mean of
all peers' initial parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import socket
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import torch

from peerd.algorithm.driver import RoundRules
from peerd.algorithm.engine import Engine, RoundContext
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.reduce import MIN_HOLDERS, PartExchange, PartMessage, PartRefused
from peerd.algorithm.submodel import init_params
from peerd.algorithm.topology import load_topology
from peerd.algorithm.transport import SliceMessage
from peerd.bench.processes import (
    START_TIMEOUT_S,
    BenchError,
    Child,
    next_command,
    positive_int,
    print_result,
)
from peerd.bench.wire import CountingRelay
from peerd.config import TrainConfig
from peerd.data import Split
from peerd.models.base import fingerprint
from peerd.models.transformer import TransformerConfig, TransformerSpec
from peerd.net import GRPC_OPTIONS, PROTOCOL_VERSION
from peerd.net.bulk import BulkSender, BulkServer
from peerd.net.client import PeerClients
from peerd.net.codec import DecodedStream, Expectation, TensorSpec, WireError
from peerd.net.rpc import add_peer_service
from peerd.net.service import PeerService
from peerd.v1 import peer_pb2

MIB = 1 << 20
LOOPBACK = "127.0.0.1"
CLUSTER = "bench"
LAYERS = 4
HEAD_DIM = 32
# The slowest all-to-all rate worth waiting for bounds every wait after start-up.
MIN_RATE_MIB_S = 2.0


def model_config(mib: int) -> TransformerConfig:
    """A transformer of LAYERS blocks whose width makes the parameters about `mib` MiB."""
    # A block holds about 12 d^2 float32 values (attention 4 d^2, feed-forward 8 d^2).
    width = math.sqrt(mib * MIB / 4 / (12 * LAYERS))
    heads = max(1, round(width / HEAD_DIM))
    d_model = heads * HEAD_DIM
    return TransformerConfig(vocab_size=256, block_size=64, n_layer=LAYERS, n_head=heads,
                             head_dim=HEAD_DIM, d_model=d_model, d_ffn=4 * d_model)


def peer_ids(peers: int) -> list[str]:
    return [f"bench-{index:02d}" for index in range(peers)]


def _engine(peer_id: str, spec: TransformerSpec, seed: int) -> Engine:
    # No training happens, but the engine weighs its slices by its sample count: one sample.
    sample = Split(spec.example_input(1), torch.zeros(1, spec.cfg.block_size,
                                                      dtype=torch.long), None)
    return Engine(peer_id, spec, init_params(spec, seed), sample, sample,
                  make_planner("full", seed), load_topology("full"), TrainConfig(), seed)


class _ExchangeHost:
    """A `PeerHost` that takes one round's slices, validated as the daemon validates them."""

    def __init__(self, engine: Engine, members: Sequence[Member], model_fingerprint: str) -> None:
        self.engine = engine
        self.members = tuple(members)
        self.expectation = Expectation(PROTOCOL_VERSION, CLUSTER, model_fingerprint,
                                       self._expected)
        self.context: RoundContext | None = None
        self.inbox: dict[str, SliceMessage] = {}
        self.complete = asyncio.Event()
        self.parts: PartExchange | None = None  # with --reduce-scatter

    def context_of(self, round_index: int) -> RoundContext:
        """The context of a round (a part message may come before this peer begins it)."""
        if self.context is not None and self.context.round_index == round_index:
            return self.context
        return self.engine.begin_round(round_index, self.members)

    def begin(self, round_index: int) -> RoundContext:
        self.context = self.engine.begin_round(round_index, self.members)
        self.inbox = {}
        self.complete.clear()
        return self.context

    def _expected(self, header: peer_pb2.StreamHeader) -> TensorSpec:
        if header.part:
            if self.parts is None:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "reduce-scatter is off here")
            try:
                counts = self.parts.expected_part(header.part, header.round, header.sender,
                                                  header.receiver)
            except PartRefused as refused:
                raise WireError(grpc.StatusCode.FAILED_PRECONDITION, str(refused)) from None
            return {name: (torch.float32, (count,)) for name, count in counts.items()}
        ctx = self.context
        if ctx is None or header.round != ctx.round_index:
            raise WireError(grpc.StatusCode.UNAVAILABLE, f"round {header.round} not started")
        if header.sender not in ctx.neighbours or header.sender in self.inbox:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED, f"unexpected {header.sender}")
        counts = self.engine.expected_counts(ctx, header.sender)
        return {name: (torch.float32, (count,)) for name, count in counts.items()}

    def hello(self) -> peer_pb2.Hello:
        return peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                              peer_id=self.engine.peer_id,
                              model_fingerprint=self.expectation.model_fingerprint)

    def admit(self, hello: peer_pb2.Hello) -> None:
        """Members are fixed by the conductor: nothing to record."""

    def accept_slice(self, decoded: DecodedStream) -> None:
        header = decoded.header
        if header.part:
            assert self.parts is not None  # _expected checked
            message = SliceMessage(header.sender, header.receiver, header.round,
                                   header.weight, decoded.tensors)
            self.parts.accept_part(PartMessage(header.part, message), decoded.payload_bytes,
                                   checked=True)
            return
        assert self.context is not None  # _expected checked the round
        # The decoder checked every value against `_expected` off the loop: the one check, as
        # in the daemon (peerd/net/slices.py).
        self.inbox[header.sender] = SliceMessage(header.sender, header.receiver, header.round,
                                                 header.weight, decoded.tensors)
        if len(self.inbox) == len(self.context.neighbours):
            self.complete.set()

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        raise WireError(grpc.StatusCode.UNIMPLEMENTED, "the exchange bench serves no pulls")

    def status(self) -> peer_pb2.StatusReply:
        return peer_pb2.StatusReply(self=self.hello())


# ---- a peer process ---------------------------------------------------------------------------


async def _peer(conn: Connection, index: int, peers: int, mib: int, timeout_s: float,
                reduce_scatter: bool, bulk: bool) -> None:
    torch.set_num_threads(1)  # N peers share the machine's cores, as `peerd cluster` runs them
    ids = peer_ids(peers)
    spec = TransformerSpec(model_config(mib))
    engine = _engine(ids[index], spec, seed=index)
    members = [Member(peer_id, 1.0) for peer_id in ids]
    host = _ExchangeHost(engine, members, fingerprint(spec))
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_peer_service(server, PeerService(host))
    grpc_port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    listener = socket.create_server((LOOPBACK, 0), backlog=peers)
    loop = asyncio.get_running_loop()
    # The daemon's transport: large slices over the bulk path where a peer serves one.
    bulk_server = BulkServer(host, None, loop) if bulk else None
    bulk_port = bulk_server.start(LOOPBACK) if bulk_server is not None else 0
    clients = _Senders(PeerClients(push_timeout_s=timeout_s), BulkSender(None))
    addresses: dict[str, tuple[str, int]] = {}  # peer id -> gRPC address, bulk port
    if reduce_scatter:
        host.parts = PartExchange(
            engine, _PartPusher(host, clients, addresses),
            RoundRules(sync=True, round_timeout_s=timeout_s), host.context_of,
            lambda function, *args: loop.run_in_executor(None, function, *args),
            asyncio.Event())
    try:
        conn.send(("ready", grpc_port, listener.getsockname()[1], bulk_port))
        tcp_ports: dict[str, int] = {}
        while (command := await next_command(conn))[0] != "stop":
            if command[0] == "addresses":
                addresses.clear()
                addresses.update(command[1])
                tcp_ports = command[2]
            elif command[0] == "step":
                await _step(host, clients, addresses, command[1], timeout_s)
            elif command[0] == "tcp":
                ctx = host.begin(command[1])
                outgoing = await loop.run_in_executor(None, engine.outbox, ctx)
                await loop.run_in_executor(None, _tcp_all_to_all, listener, tcp_ports,
                                           outgoing, timeout_s)
            elif command[0] == "check_mean":
                _check_mean(engine, spec, peers)
            else:
                raise BenchError(f"peer {index}: unknown command {command!r}")
            conn.send(("ok",))
    finally:
        listener.close()
        await clients.grpc.close()
        if bulk_server is not None:
            await loop.run_in_executor(None, bulk_server.stop)
        await server.stop(grace=1.0)


@dataclass(frozen=True)
class _Senders:
    grpc: PeerClients
    bulk: BulkSender


async def _step(
    host: _ExchangeHost, clients: _Senders, addresses: Mapping[str, tuple[str, int]],
    round_index: int,
    timeout_s: float,
) -> None:
    """The daemon's round without training: outbox, push to every neighbour, collect, merge.
    With reduce-scatter (every entry is held by all peers at mu = 1, so no direct slice is
    left): each peer's values to the parts' owners, their means back."""
    engine = host.engine
    loop = asyncio.get_running_loop()
    ctx = host.begin(round_index)
    if host.parts is not None:
        await loop.run_in_executor(None, host.parts.plan, ctx)
        await asyncio.wait_for(_reduce_step(host.parts, ctx), timeout_s)
        return
    outgoing = await loop.run_in_executor(None, engine.outbox, ctx)

    async def push(message: SliceMessage) -> None:
        await _push(clients, addresses[message.receiver], host, message, "")

    await asyncio.wait_for(asyncio.gather(*(push(m) for m in outgoing), host.complete.wait()),
                           timeout_s)
    await loop.run_in_executor(None, engine.merge_checked, ctx, list(host.inbox.values()))


async def _reduce_step(parts: PartExchange, ctx: RoundContext) -> None:
    await parts.send_values(ctx)
    await parts.finish(ctx)
    await parts.apply(ctx)


async def _push(clients: _Senders, address: tuple[str, int], host: _ExchangeHost,
                message: SliceMessage, part: str) -> int:
    """Stream one message (over the bulk path where the daemon would take it), retried while
    the receiver has not begun its round."""
    grpc_address, bulk_port = address
    header = peer_pb2.StreamHeader(
        protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
        model_fingerprint=host.expectation.model_fingerprint, sender=message.sender,
        receiver=message.receiver, round=message.round_index, weight=message.weight,
        part=part)
    while True:
        try:
            if clients.bulk.takes(message.values, bulk_port):
                return await clients.bulk.push(LOOPBACK, bulk_port, header, message.values)
            return await clients.grpc.push(grpc_address, header, message.values)
        except grpc.aio.AioRpcError as error:
            # UNAVAILABLE: the receiver has not begun this round yet.
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        except WireError as error:  # the same, from the bulk path
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.005)


class _PartPusher:
    """The bench's transport of part messages: PushSlices with `StreamHeader.part` set."""

    def __init__(self, host: _ExchangeHost, clients: _Senders,
                 addresses: Mapping[str, tuple[str, int]]) -> None:
        self.host = host
        self.clients = clients
        self.addresses = addresses

    async def push_part(self, ctx: RoundContext, part: PartMessage) -> int:
        message = part.message
        return await _push(self.clients, self.addresses[message.receiver], self.host, message,
                           part.kind)


def _tcp_all_to_all(
    listener: socket.socket, ports: Mapping[str, int], outgoing: Sequence[SliceMessage],
    timeout_s: float,
) -> None:
    """Sends every message's bytes to its receiver over raw TCP while receiving as many bytes
    from every other peer into preallocated memory: the step's transfers with nothing else."""
    incoming = [bytearray(sum(v.numel() * v.element_size() for v in m.values.values()))
                for m in outgoing]  # at mu = 1 every peer sends every other the same amount
    errors: list[BaseException] = []

    def receive(buffer: bytearray) -> None:
        connection, _ = listener.accept()
        with connection:
            view, received = memoryview(buffer), 0
            while received < len(buffer):
                count = connection.recv_into(view[received:])
                if count == 0:
                    raise BenchError(f"raw TCP: stream ended after {received} bytes")
                received += count

    def send(message: SliceMessage) -> None:
        with socket.create_connection((LOOPBACK, ports[message.receiver]),
                                      timeout=timeout_s) as sock:
            for values in message.values.values():
                sock.sendall(memoryview(values.view(torch.uint8).numpy()))

    def guarded(function, argument) -> None:
        try:
            function(argument)
        except BaseException as error:  # reported below, from the calling thread
            errors.append(error)

    listener.settimeout(timeout_s)
    threads = [threading.Thread(target=guarded, args=(receive, buffer)) for buffer in incoming]
    threads += [threading.Thread(target=guarded, args=(send, message)) for message in outgoing]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _check_mean(engine: Engine, spec: TransformerSpec, peers: int) -> None:
    """After one step at mu = 1 with equal weights, everyone holds the mean of all initial
    parameters (peer i started from seed i)."""
    initial = [init_params(spec, seed) for seed in range(peers)]
    for name, tensor in engine.params.items():
        expected = torch.stack([params[name] for params in initial]).mean(dim=0)
        if not torch.allclose(tensor, expected, rtol=1e-5, atol=1e-6):
            worst = float((tensor - expected).abs().max())
            raise BenchError(f"{engine.peer_id}: {name} is off the mean of the initial "
                             f"parameters by up to {worst:.3g}")


# ---- the conductor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExchangeResult:
    peers: int
    payload_bytes: int  # one peer's full model
    step_seconds: tuple[float, ...]
    tcp_seconds: tuple[float, ...]
    reduce_scatter: bool = False
    # Bytes each peer's server took in over TCP during one more, untimed step through
    # counting relays (every frame, header and window update of every stream it received).
    socket_bytes_in: tuple[int, ...] = ()
    bulk: bool = True  # slices from DEFAULT_BULK_THRESHOLD bytes over the bulk path

    @property
    def floor_bytes(self) -> float:
        """What one peer must receive per step: 2 (N - 1) / N of the model (all-reduce)."""
        return 2 * (self.peers - 1) / self.peers * self.payload_bytes

    @property
    def max_socket_ratio(self) -> float:
        """The most any peer received at the socket, over `floor_bytes`."""
        return max(self.socket_bytes_in) / self.floor_bytes

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def tcp_floor_s(self) -> float:
        return statistics.median(self.tcp_seconds)

    def to_json(self) -> dict[str, float | int]:
        return {
            "median_round_s": round(self.median_round_s, 4),
            "tcp_floor_s": round(self.tcp_floor_s, 4),
            "ratio_to_tcp": round(self.tcp_floor_s / self.median_round_s, 4),
            "peers": self.peers,
            "model_bytes": self.payload_bytes,
            "bytes_per_step": self.payload_bytes * self.peers * (self.peers - 1),
            "repeats": len(self.step_seconds),
            "reduce_scatter": self.reduce_scatter,
            "bulk": self.bulk,
            "socket_bytes_in": list(self.socket_bytes_in),
            "socket_bytes_over_floor": round(self.max_socket_ratio, 4),
        }

    def describe(self) -> str:
        moved = self.payload_bytes * self.peers * (self.peers - 1) / MIB
        exchange = "reduce-scatter" if self.reduce_scatter else "direct exchange"
        exchange += ", bulk path" if self.bulk else ", gRPC only"
        return "\n".join([
            f"peers     {self.peers}, fully connected, mu 1, {exchange}, "
            f"{self.payload_bytes / MIB:.1f} MiB model each ({moved:.0f} MiB all-to-all)",
            f"socket    {max(self.socket_bytes_in) / MIB:.1f} MiB in per peer at most, "
            f"{self.max_socket_ratio:.3f} x the all-reduce floor 2(N-1)/N x model",
            f"step      {self.median_round_s:.3f} s median  runs: "
            + " ".join(f"{s:.3f}" for s in self.step_seconds),
            f"raw TCP   {self.tcp_floor_s:.3f} s median  runs: "
            + " ".join(f"{s:.3f}" for s in self.tcp_seconds),
        ])


def run_exchange(peers: int, mib: int, repeats: int = 5,
                 reduce_scatter: bool = False, bulk: bool = True) -> ExchangeResult:
    """One untimed, checked step, then `repeats` timed steps interleaved with raw TCP ones,
    then one untimed step through counting relays."""
    if peers < 2:
        raise BenchError("an exchange needs at least 2 peers")
    if reduce_scatter and peers < MIN_HOLDERS:
        raise BenchError(f"reduce-scatter needs at least {MIN_HOLDERS} peers")
    config = model_config(mib)
    payload = sum(t.numel() * 4 for t in init_params(TransformerSpec(config), 0).values())
    timeout_s = 60.0 + payload * peers * (peers - 1) / MIB / MIN_RATE_MIB_S
    ids = peer_ids(peers)
    with contextlib.ExitStack() as cleanup:
        children = []
        for index in range(peers):
            child = Child(ids[index], _peer,
                          (index, peers, mib, timeout_s, reduce_scatter, bulk))
            cleanup.callback(child.stop)
            children.append(child)
        ports = [child.reply(START_TIMEOUT_S) for child in children]
        addresses = {ids[i]: (f"{LOOPBACK}:{grpc_port}", bulk_port)
                     for i, (grpc_port, _, bulk_port) in enumerate(ports)}
        tcp_ports = {ids[i]: tcp_port for i, (_, tcp_port, _) in enumerate(ports)}
        for child in children:
            child.call("addresses", addresses, tcp_ports, timeout_s=timeout_s)

        def everyone(*command: object) -> float:
            start = time.perf_counter()
            for child in children:
                child.send(*command)
            for child in children:
                child.reply(timeout_s)
            return time.perf_counter() - start

        everyone("step", 0)
        everyone("check_mean")
        steps: list[float] = []
        tcp: list[float] = []
        for round_index in range(1, repeats + 1):
            steps.append(everyone("step", round_index))
            tcp.append(everyone("tcp", round_index))
        # Every port a peer receives on (gRPC, and bulk where it serves one) behind a relay.
        relays = [(cleanup.enter_context(CountingRelay(grpc_port)),
                   cleanup.enter_context(CountingRelay(bulk_port)) if bulk_port else None)
                  for grpc_port, _, bulk_port in ports]
        relayed = {ids[i]: (grpc_relay.address, bulk_relay.port if bulk_relay else 0)
                   for i, (grpc_relay, bulk_relay) in enumerate(relays)}
        for child in children:
            child.call("addresses", relayed, tcp_ports, timeout_s=timeout_s)
        everyone("step", repeats + 1)
        socket_bytes_in = tuple(grpc_relay.bytes_up + (bulk_relay.bytes_up if bulk_relay else 0)
                                for grpc_relay, bulk_relay in relays)
    return ExchangeResult(peers, payload, tuple(steps), tuple(tcp), reduce_scatter,
                          socket_bytes_in, bulk)


# ---- command line -----------------------------------------------------------------------------


def add_exchange_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `exchange` (under `peerd bench`); its `func` runs the benchmark."""
    exchange = subparsers.add_parser(
        "exchange", help="one exchange-and-merge step of N local peers, fully connected",
        description="N peer processes on loopback, each holding an M MiB model at mu 1, "
                    "exchange their slices over gRPC and merge (no training); report the "
                    "median step time and the raw TCP floor for the same transfers.",
    )
    exchange.add_argument("--peers", type=positive_int, default=4,
                          help="number of peers (default: %(default)s)")
    exchange.add_argument("--mib", type=positive_int, default=64,
                          help="model size in MiB, about (default: %(default)s)")
    exchange.add_argument("--repeat", type=positive_int, default=5,
                          help="timed steps; the median is reported (default: %(default)s)")
    exchange.add_argument("--json", action="store_true", help="print one JSON object")
    exchange.add_argument("--reduce-scatter", action="store_true",
                          help="average by reduce-scatter and all-gather over the holders "
                               "(peerd/algorithm/reduce.py) instead of the direct exchange")
    exchange.add_argument("--no-bulk", dest="bulk", action="store_false",
                          help="every slice over gRPC (as `peerd start --no-bulk`); by default "
                               "slices from 1 MiB go over the bulk path, as the daemon sends them")
    exchange.add_argument("--against-hivemind", action="store_true",
                          help="also run hivemind 1.1.12's DecentralizedAverager on the same "
                               "tensors (in its own virtual environment, made on first use) "
                               "and print both")
    exchange.add_argument("--also-peers", type=positive_int, nargs="*", default=[],
                          help="with --against-hivemind: more peer counts to run")
    exchange.add_argument("--also-mib", type=positive_int, nargs="*", default=[],
                          help="with --against-hivemind: more model sizes to run")
    exchange.add_argument("--hivemind-venv", type=Path, default=None,
                          help="where hivemind's virtual environment lives "
                               "(default: ~/.cache/peerd/hivemind-1.1.12)")
    exchange.set_defaults(func=run_exchange_command)


def run_exchange_command(args: argparse.Namespace) -> int:
    if args.against_hivemind:
        from peerd.bench.anchor import DEFAULT_VENV, run_anchor

        peer_counts = [args.peers, *args.also_peers]
        mibs = [args.mib, *args.also_mib]
        venv_dir = args.hivemind_venv or DEFAULT_VENV
        return print_result("exchange", lambda: run_anchor(peer_counts, mibs, args.repeat,
                                                           venv_dir, args.reduce_scatter,
                                                           args.bulk),
                            args.json)
    if args.also_peers or args.also_mib or args.hivemind_venv:
        print("peerd bench exchange: --also-peers, --also-mib and --hivemind-venv need "
              "--against-hivemind", file=sys.stderr)
        return 2
    return print_result("exchange", lambda: run_exchange(args.peers, args.mib, args.repeat,
                                                         args.reduce_scatter, args.bulk),
                        args.json)
