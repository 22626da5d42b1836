"""One daemon: discovery + membership + the engine + the gRPC transport, on one asyncio loop.

Training, slicing and merging run on a single worker thread (the engine is not thread-safe and
the event loop must never block); the loop keeps answering handshakes, pushes, pulls and
status calls meanwhile. With `--sync` a round closes when every topology neighbour's slice for
it has arrived (or the round timeout passes, or the neighbour is being dropped from the view).
By default rounds are semi-asynchronous: a round also closes at an adaptive deadline once a
quorum of neighbours is in, slices that come later are merged in a later round with a staleness
weight, pushes run in the background, and a peer whose neighbours are rounds ahead skips to
their round. After every merge the worker writes a checkpoint; a restarted daemon resumes
from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import ifaddr
import numpy as np
import torch

from peerd.aggregate import assemble
from peerd.agreement import cluster_fingerprint, describe_settings, planner_settings
from peerd.allocator import keep_freed_memory
from peerd.ca import DEVICE_CERT
from peerd.capacity import measure_capacity
from peerd.config import AUTO, DaemonConfig, TrainConfig, check_depth, parse_size
from peerd.data import Split, TaskData, load_task_data, local_train_test, partition
from peerd.deadline import ArrivalDelays
from peerd.engine import Engine, LateSlice, RoundContext, Staleness, TrainStats
from peerd.evaluate import Evaluation
from peerd.exporter import Exporter
from peerd.models.base import DEPTH, Plan, fingerprint
from peerd.net import GRPC_OPTIONS, PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import DecodedStream, Expectation, WireError
from peerd.net.discovery import (
    Candidate,
    Discovery,
    DiscoveryManager,
    MdnsDiscovery,
    PeerRecord,
    StaticDiscovery,
)
from peerd.net.membership import Membership, View
from peerd.net.rpc import add_peer_service
from peerd.net.service import PeerService
from peerd.net.tls import TlsError, TlsIdentity
from peerd.plan import (
    Member,
    Widths,
    check_widths,
    decode_widths,
    encode_widths,
    make_planner,
    width_group_names,
)
from peerd.progress import Console, round_line, step_display
from peerd.state import (
    ROUNDS_LOG,
    Checkpoint,
    load_checkpoint,
    load_or_create_peer_id,
    rewind,
    save_checkpoint,
    save_parameters,
)
from peerd.submodel import init_params
from peerd.systemd import Notifier, watchdog_loop
from peerd.tasks import BLOCK_SIZE, get_task
from peerd.topology import load_topology
from peerd.transport import SliceMessage
from peerd.v1 import peer_pb2
from peerd.width import WidthConfig, learn_widths

log = logging.getLogger("peerd.daemon")

# Semi-asynchronous peers run rounds apart: a watcher or joiner may ask for a round that a fast
# peer finished several rounds ago.
SNAPSHOTS_KEPT = 16
HANDSHAKE_INTERVAL_S = 0.5
# While waiting for the first view the daemon says who it has found this often (a person at
# the terminal must never wonder whether it hangs).
WAITING_REPORT_S = 5.0
SERVER_GRACE_S = 5.0
COLLECT_POLL_S = 0.25
# Codes a receiver never answers on purpose: the connection failed or broke mid-call (gRPC
# core reports INTERNAL or UNKNOWN when a connection dies under a stream, as when a partition
# heals), or the receiver cannot place the round yet (UNAVAILABLE). Retried until the deadline.
RETRIED_PUSH_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.UNKNOWN})


@dataclass(frozen=True)
class RunSummary:
    peer_id: str
    rounds_done: int
    train_loss: float
    members: int
    bytes_sent: int
    bytes_received: int


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


def plan_to_wire(plan: Plan) -> list[peer_pb2.GroupUnits]:
    return [peer_pb2.GroupUnits(group=group, units=units.tolist())
            for group, units in sorted(plan.items())]



def own_peer_id(config: DaemonConfig, tls: TlsIdentity | None) -> str:
    """With TLS the peer id is the certificate's name (peers check every claim against it);
    without, the one given or kept in the state dir."""
    state_dir = Path(config.state_dir)
    if tls is None:
        return load_or_create_peer_id(state_dir, config.peer_id)
    if config.peer_id is not None and config.peer_id != tls.name:
        raise TlsError(f"peer_id={config.peer_id!r} differs from the name in the certificate "
                       f"{tls.directory / DEVICE_CERT} ({tls.name!r}): with TLS the peer id is "
                       f"the certificate's name; drop --peer-id, or issue a certificate for "
                       f"{config.peer_id} (peerd ca issue {config.peer_id})")
    return load_or_create_peer_id(state_dir, tls.name)


def view_entry(member: Member) -> list:
    """A member as checkpoints record it: [peer id, mu], with its depth where set, and
    [peer id, mu, depth or null, [[group, units], ...]] with learned widths."""
    if member.widths is not None:
        return [member.peer_id, member.mu, member.depth, [list(w) for w in member.widths]]
    return [member.peer_id, member.mu] + ([] if member.depth is None else [member.depth])


def entry_member(entry: list) -> Member:
    """The inverse of view_entry."""
    if len(entry) == 4:
        peer_id, mu, depth, widths = entry
        return Member(peer_id, mu, depth, tuple((name, units) for name, units in widths))
    return Member(*entry)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        # First: a missing certificate is reported before seconds of data loading.
        self.tls = None if config.insecure else TlsIdentity.load(config.tls_dir)
        self.state_dir = Path(config.state_dir)
        self.peer_id = own_peer_id(config, self.tls)
        task = get_task(config.task)
        data = load_task_data(config.task, config.data_dir, block_size=BLOCK_SIZE)
        self.spec = task.model(data, config.early_exits)
        self.blocks = self.spec.groups[DEPTH].units if DEPTH in self.spec.groups else None
        if config.depth is not None:
            check_depth((config.depth,), config.early_exits, self.blocks)
        train = config.train_config(task.train)
        train_split, test_split = self._local_data(data)
        self.engine = Engine(
            self.peer_id, self.spec, init_params(self.spec, config.seed), train_split,
            test_split,
            make_planner(config.method, config.seed, config.overlap, config.drift_period),
            load_topology(config.topology),
            train, config.seed, config.wire_dtype,
            Staleness(config.staleness_exponent, config.max_staleness),
        )
        self.mu, self.depth, self.engine.frozen_blocks = self._capacity(train, train_split)
        self.widths = self._learned_widths(train, train_split)
        self.planner_settings = planner_settings(config.method, config.seed, config.overlap,
                                                 config.drift_period)
        self.fingerprint = cluster_fingerprint(fingerprint(self.spec), self.planner_settings)
        self.expectation = Expectation(PROTOCOL_VERSION, config.cluster, self.fingerprint,
                                       self._expected_tensors)
        # What a checkpoint must match to be resumed from (anything else is another run).
        self.identity = {"peer_id": self.peer_id, "task": config.task, "method": config.method,
                         "seed": config.seed, "model_fingerprint": self.fingerprint}
        self.membership: Membership | None = None
        self.clients = PeerClients(self.tls, push_timeout_s=config.round_timeout_s)
        self.round_index = 0
        self.rounds_done = 0
        self.last_loss = float("nan")
        self.bytes_sent = 0
        self.bytes_received = 0
        self._contexts: dict[int, RoundContext] = {}
        self._inbox: dict[int, dict[str, SliceMessage]] = {}
        self._arrived_at: dict[tuple[int, str], float] = {}  # (round, sender) -> monotonic time
        self._merged: set[tuple[int, str]] = set()  # (round, sender) slices already merged
        # How many rounds back slices are still taken: strict rounds take only their own.
        self._late_window = 0 if config.sync else config.max_staleness
        self._delays = ArrivalDelays(config.deadline_mads, config.deadline_floor_s,
                                     config.round_timeout_s)
        self._pushes: set[asyncio.Task] = set()  # semi-async pushes still under way
        self._arrived = asyncio.Event()
        self._snapshots: dict[int, tuple[dict[str, torch.Tensor], Plan]] = {}
        self._stopping = asyncio.Event()
        self._unanswered: set[str] = set()  # addresses whose last handshake failed
        self.notifier = Notifier.from_environment()
        self.exporter: Exporter | None = None
        if config.metrics_port is not None:
            self.exporter = Exporter(self.peer_id, config.cluster, self.fingerprint, self.mu,
                                     self.depth, self.engine.frozen_blocks)
        self.on_round: Callable[[dict], None] | None = None  # e.g. a terminal progress line
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._checkpointed = False
        resumed = self._load_checkpoint(None)
        if resumed is not None:
            log.info("resuming after round %d from %s", resumed.round, resumed.path)
            self._resume(resumed)

    def _capacity(self, train: TrainConfig, train_split: Split
                  ) -> tuple[float, int | None, int]:
        """(mu, depth, frozen blocks) as configured, or with mu auto what this device affords
        (measured; depth and frozen blocks only for a model with early exits)."""
        config = self.config
        if config.mu != AUTO:
            return float(config.mu), config.depth, config.frozen_blocks
        budget = None if config.memory_budget is None else parse_size(config.memory_budget)
        log.info("mu auto: measuring what this device affords (a probe of every candidate width)")
        # Besides its parameters a daemon holds the round snapshots it serves to pulls and,
        # at most, a full set each of outgoing and incoming slices.
        choice = measure_capacity(self.spec, self.engine.params, train_split, train, budget,
                                  config.round_target_s, held_copies=SNAPSHOTS_KEPT + 2)
        log.info("mu auto: %s", choice.describe())
        return choice.mu, choice.depth, choice.frozen

    def _learned_widths(self, train: TrainConfig, train_split: Split) -> Widths | None:
        """With learned_width and mu < 1: units per group scored on the local data from the
        initial parameters, seeded as the simulator seeds the peer of this shard."""
        config = self.config
        if not config.learned_width or self.mu >= 1:
            return None
        index = 0 if config.shard is None else config.shard[0]
        log.info("learning this peer's widths on its data (%d epochs)", config.width_epochs)
        widths = learn_widths(self.spec, self.engine.params, train_split, train, self.mu,
                              self.depth, WidthConfig(config.width_epochs, config.width_penalty),
                              config.seed + index)
        log.info("learned widths: %s", ", ".join(f"{name} {units}" for name, units in widths))
        return widths

    def _local_data(self, data: TaskData) -> tuple[Split, Split]:
        config = self.config
        if config.shard is None:
            local_train, local_test = local_train_test(np.arange(len(data.train)), config.seed)
        else:
            index, count = config.shard
            shard = partition(data.train, count, config.partition, config.seed)[index]
            # The simulator seeds the split of position I with seed + I: the same here.
            local_train, local_test = local_train_test(shard, config.seed + index)
        return data.train.subset(local_train), data.train.subset(local_test)

    # ---- what peers ask of us (PeerHost) ----------------------------------------------------

    def hello(self) -> peer_pb2.Hello:
        assert self.membership is not None
        return self.membership.hello(PROTOCOL_VERSION, self.config.cluster, self.fingerprint,
                                     self.round_index)

    def admit(self, hello: peer_pb2.Hello) -> None:
        assert self.membership is not None
        if self.membership.claims_elsewhere(hello.peer_id, hello.address):
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
        self.membership.observe(hello, self.round_index)
        self.membership.tick(self.round_index)

    def _context(self, round_index: int) -> RoundContext:
        assert self.membership is not None
        view = self.membership.view_at(round_index)
        assert view is not None
        if round_index not in self._contexts:
            self._contexts[round_index] = self.engine.begin_round(round_index, view.members)
        return self._contexts[round_index]

    def _expected_tensors(
        self, header: peer_pb2.StreamHeader
    ) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]]:
        membership = self.membership
        view = membership.view_at(header.round) if membership else None
        if view is None or membership.undecided_before(header.round):
            # The sender retries: our view of that round is not settled yet.
            raise WireError(grpc.StatusCode.UNAVAILABLE,
                            f"the view of round {header.round} is not settled here yet")
        if header.view_id != view.view_id:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"view {header.view_id} differs from ours ({view.view_id})")
        if header.receiver != self.peer_id:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"slice addressed to {header.receiver}, this is {self.peer_id}")
        if header.round > self.round_index + 1:
            # This peer is behind (a joiner still pulling its start, a slow peer that will skip
            # ahead): it will get there, so the sender retries.
            raise WireError(grpc.StatusCode.UNAVAILABLE,
                            f"slice for round {header.round}; this peer is only in round "
                            f"{self.round_index}")
        oldest = self.round_index - self._late_window
        if header.round < oldest:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"slice for round {header.round}; this peer is in round "
                            f"{self.round_index} and takes rounds {oldest} to "
                            f"{self.round_index + 1}")
        ctx = self._context(header.round)
        if header.sender not in ctx.neighbours:
            raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{header.sender} is not a neighbour of {self.peer_id}")
        if (header.sender in self._inbox.get(header.round, {})
                or (header.round, header.sender) in self._merged):
            raise WireError(grpc.StatusCode.ALREADY_EXISTS,
                            f"round {header.round} slice from {header.sender} already arrived")
        sender_plan = ctx.plans_now[header.sender]
        if list(header.plan) != plan_to_wire(sender_plan):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{header.sender}'s units differ from its plan for round "
                            f"{header.round}")
        counts = self.engine.expected_counts(ctx, header.sender)
        return {name: (self.engine.wire_dtype, (count,)) for name, count in counts.items()}

    def accept_slice(self, decoded: DecodedStream) -> None:
        header = decoded.header
        message = SliceMessage(header.sender, header.receiver, header.round, header.weight,
                               decoded.tensors)
        try:
            self.engine.check_message(self._context(header.round), message)
        except ValueError as error:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        self._inbox.setdefault(header.round, {})[header.sender] = message
        self._arrived_at[(header.round, header.sender)] = time.monotonic()
        self.bytes_received += decoded.payload_bytes
        if self.membership and header.sender in self.membership.known:
            self.membership.known[header.sender].bytes_received += decoded.payload_bytes
        self._arrived.set()

    def snapshot(
        self, request: peer_pb2.PullRequest
    ) -> tuple[peer_pb2.StreamHeader, Mapping[str, torch.Tensor]]:
        if not self._snapshots:
            raise WireError(grpc.StatusCode.UNAVAILABLE, "no round completed yet")
        rounds = request.round or max(self._snapshots)
        if rounds > max(self._snapshots):
            raise WireError(grpc.StatusCode.UNAVAILABLE, f"round {rounds} is not finished yet")
        if rounds not in self._snapshots:
            raise WireError(grpc.StatusCode.NOT_FOUND,
                            f"no snapshot after {rounds} rounds; kept: {sorted(self._snapshots)}")
        params, plan = self._snapshots[rounds]
        header = peer_pb2.StreamHeader(
            protocol_version=PROTOCOL_VERSION, cluster=self.config.cluster,
            model_fingerprint=self.fingerprint, sender=self.peer_id,
            receiver=request.requester, round=rounds, weight=self.engine.weight,
            view_id=self.membership.view.view_id if self.membership and self.membership.view
            else "",
            plan=plan_to_wire(plan),
        )
        return header, params

    def status(self) -> peer_pb2.StatusReply:
        assert self.membership is not None
        view = self.membership.view
        positions = {peer: i for i, peer in enumerate(view.ids)} if view else {}
        current = self.membership.view_at(self.round_index)
        neighbours = set(self._context(self.round_index).neighbours) if current else set()
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
            for peer in sorted(self.membership.known.values(), key=lambda p: p.peer_id)
        ]
        return peer_pb2.StatusReply(
            self=self.hello(), peers=peers, bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received, train_loss=self.last_loss,
            rounds_done=self.rounds_done,
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._begin_stopping)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        service = PeerService(self, self.exporter.observe_rejected if self.exporter else None)
        add_peer_service(server, service)
        bind = f"{self.config.host}:{self.config.port}"
        if self.tls is None:
            log.warning("running without TLS (--insecure): anyone who reaches %s can join the "
                        "cluster, push slices into this model and pull its parameters", bind)
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, self.tls.server_credentials())
        if port == 0:
            raise OSError(f"cannot listen on {bind}")
        address = f"{advertised_host(self.config)}:{port}"
        self.membership = Membership(Member(self.peer_id, self.mu, self.depth, self.widths),
                                     address, self.config.min_peers,
                                     dead_after_s=self.config.dead_after_s,
                                     frozen_blocks=self.engine.frozen_blocks,
                                     width_groups=width_group_names(self.spec.groups))
        await server.start()
        if self.exporter is not None:
            metrics_port = self.exporter.start(self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", advertised_host(self.config),
                     metrics_port)
        discovery = DiscoveryManager(self._discovery_sources(address, port))
        await discovery.start()
        log.info("peer %s serving on %s (cluster %s, fingerprint %s: %s, %s)", self.peer_id,
                 address, self.config.cluster, self.fingerprint,
                 describe_settings(self.planner_settings),
                 f"mutual TLS with {self.tls.directory}" if self.tls else "no TLS")
        # Ready only now: peers and `peerd status` can reach this daemon from here on.
        self.notifier.ready(f"serving on {address}, waiting for {self.config.min_peers} "
                            f"members of cluster {self.config.cluster}")
        handshakes = asyncio.create_task(self._handshake_forever(discovery))
        interval = self.notifier.watchdog_interval_s()
        watchdog = asyncio.create_task(watchdog_loop(self.notifier, interval)) if interval else None
        try:
            await self._train()
            if self.config.linger_s and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.config.linger_s)
        finally:
            self.notifier.stopping()
            for task in (handshakes, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await discovery.stop()
            for push in list(self._pushes):
                push.cancel()
            await asyncio.gather(*self._pushes, return_exceptions=True)
            await self.clients.close()
            await server.stop(SERVER_GRACE_S)
            self._worker.shutdown(wait=True)
            self._save()
            if self.exporter is not None:
                self.exporter.stop()
            self.notifier.close()
        return RunSummary(self.peer_id, self.rounds_done, self.last_loss,
                          len(self.membership.view.members) if self.membership.view else 1,
                          self.bytes_sent, self.bytes_received)

    def _begin_stopping(self) -> None:
        self.notifier.stopping()
        self._stopping.set()

    def _discovery_sources(self, address: str, port: int) -> list[Discovery]:
        sources: list[Discovery] = [StaticDiscovery(list(self.config.peers))]
        if self.config.mdns:
            record = PeerRecord(
                peer_id=self.peer_id, cluster=self.config.cluster,
                protocol_version=PROTOCOL_VERSION, model_fingerprint=self.fingerprint,
                mu=self.mu, host=address.rsplit(":", 1)[0], port=port, depth=self.depth,
                widths=tuple(encode_widths(self.widths or ())),
            )
            sources.append(MdnsDiscovery(record, self.config.mdns_interface))
        return sources

    async def _handshake_forever(self, discovery: DiscoveryManager) -> None:
        assert self.membership is not None

        async def handshake(candidate: Candidate) -> None:
            # An mDNS record's peer id is only a hint: the TLS handshake proves it.
            expected = candidate.record.peer_id if candidate.record else None
            try:
                self.admit(await self.clients.handshake(candidate.address, self.hello(),
                                                        expected))
            except (grpc.aio.AioRpcError, WireError) as error:
                self._unanswered.add(candidate.address)
                log.debug("handshake with %s failed: %s", candidate.address, error)
            else:
                self._unanswered.discard(candidate.address)

        while True:
            # All at once: a slow or dead peer must not delay hearing from the others (silence
            # drops members from the view).
            await asyncio.gather(*(handshake(candidate)
                                   for candidate in discovery.candidates()
                                   if candidate.address != self.membership.address))
            # Silence is noticed here: a dead peer sends no handshakes that would tick.
            self.membership.tick(self.round_index)
            await asyncio.sleep(HANDSHAKE_INTERVAL_S)

    async def _wait_for_view(self) -> View | None:
        """The first view: agreed with the others, or entered by joining a running one."""
        assert self.membership is not None
        next_report = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_report:
                log.info("%s", self._waiting_line())
                next_report = time.monotonic() + WAITING_REPORT_S
            view = self.membership.try_commit(self.round_index)
            if view is not None:
                first_round = self.membership.first_round
                log.info("view %s committed from round %d: %s", view.view_id, first_round,
                         ", ".join(view.ids))
                resumed_at = self.round_index
                self.round_index = first_round
                await asyncio.get_running_loop().run_in_executor(
                    self._worker, self._enter_resumed, first_round, resumed_at)
                return view
            running = self.membership.running_view()
            joined = self.membership.advance_join() if running is not None else None
            if joined is not None:
                round_index = self.membership.join_round
                if self.config.rounds is not None and round_index >= self.config.rounds:
                    log.error("the run ends before round %d, where this peer could join",
                              round_index)
                    return None
                log.info("joining view %s at round %d as %s", joined.view_id, round_index,
                         ", ".join(joined.ids))
                await self._enter_at(round_index, running)
                return joined
            await asyncio.sleep(0.1)
        return None

    def _waiting_line(self) -> str:
        """Who has been found so far and who does not answer, for the operator."""
        assert self.membership is not None
        found = self.membership.candidate_ids()
        line = (f"waiting for peers: {len(found)} of {self.config.min_peers} members found "
                f"({', '.join(found)})")
        if self._unanswered:
            line += f"; no answer yet from {', '.join(sorted(self._unanswered))}"
        return line

    async def _enter_at(self, round_index: int, running: View) -> None:
        """A joiner starts from the members' parameters after round `round_index - 1`:
        each entry the mean over the members that held it then."""
        shapes = {name: (t.dtype, tuple(t.shape)) for name, t in self.engine.params.items()}
        expectation = Expectation(PROTOCOL_VERSION, self.config.cluster, self.fingerprint,
                                  lambda header: shapes)
        request = peer_pb2.PullRequest(
            protocol_version=PROTOCOL_VERSION, cluster=self.config.cluster,
            model_fingerprint=self.fingerprint, requester=self.peer_id, round=round_index)
        pulled: dict[str, DecodedStream] = {}
        given_up: set[str] = set()
        while not self._stopping.is_set():
            wanted = [m for m in running.ids if m not in pulled and m not in given_up
                      and m not in self.membership.leaving()]
            if not wanted:
                break
            for member in wanted:
                try:
                    pulled[member] = await self.clients.pull(
                        self.membership.known[member].address, member, request, expectation)
                except grpc.aio.AioRpcError as error:
                    # Members slowed down (a round timeout, a healed partition) may take long
                    # to finish round_index - 1: wait while they still answer handshakes; one
                    # silent for the dead-member time has nothing more to give.
                    if self.membership.silent_for(member) >= self.config.dead_after_s:
                        log.warning("joining at round %d without %s's parameters: %s %s",
                                    round_index, member, error.code().name, error.details())
                        given_up.add(member)
            await asyncio.sleep(0.2)
        if not pulled and not self._stopping.is_set():
            log.warning("no member's parameters after round %d could be pulled: this peer "
                        "starts round %d from its own", round_index - 1, round_index)
        if pulled:
            params = {member: stream.tensors for member, stream in pulled.items()}
            # Plans are a pure function: computed here, never taken from the wire.
            plans = self.engine.planner.plan(round_index - 1, running.members,
                                             self.spec.groups)
            assembled = assemble(self.spec, params, plans)
            for name, tensor in self.engine.params.items():
                tensor.copy_(assembled[name])
        self.round_index = round_index
        await asyncio.get_running_loop().run_in_executor(self._worker, rewind, self.state_dir,
                                                         round_index)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoint(self, near_round: int | None) -> Checkpoint | None:
        shapes = {name: tuple(tensor.shape) for name, tensor in self.engine.params.items()}
        return load_checkpoint(self.state_dir, shapes, self.identity, near_round)

    def _resume(self, checkpoint: Checkpoint) -> None:
        """Take a checkpoint's parameters and counters; its round is where this peer asks to
        start (the first view starts at the lowest such round among its members)."""
        for name, tensor in self.engine.params.items():
            tensor.copy_(checkpoint.params[name])
        record = checkpoint.record
        self.round_index = checkpoint.round
        self.rounds_done = record["rounds_done"]
        self.bytes_sent, self.bytes_received = record["bytes_sent"], record["bytes_received"]
        self.last_loss = record["train_loss"]
        # Peers may pull these parameters (a joiner's start) before this peer finishes a round.
        members = tuple(entry_member(entry) for entry in record["view"])
        if any(m.peer_id == self.peer_id for m in members):
            plan = self.engine.planner.plan(checkpoint.round - 1, members,
                                            self.spec.groups)[self.peer_id]
            self._snapshots[checkpoint.round] = (dict(checkpoint.params), plan)

    def _enter_resumed(self, first_round: int, resumed_at: int) -> None:
        """Worker: the first view starts at `first_round`; if that is not the round this
        peer's checkpoint is for, take the checkpoint after `first_round` rounds (or the
        closest one). Later checkpoints and records are dropped: those rounds run again."""
        if first_round != resumed_at:
            checkpoint = self._load_checkpoint(first_round)
            if checkpoint is None:
                log.warning("no checkpoint here: round %d starts from the initial parameters",
                            first_round)
            else:
                if checkpoint.round != first_round:
                    log.warning("no sound checkpoint after round %d here: starting it from "
                                "%s", first_round, checkpoint.path)
                self._resume(checkpoint)
            self.round_index = first_round
        rewind(self.state_dir, first_round)

    def _checkpoint(self, round_index: int, meta: dict) -> float:
        """Worker: write the checkpoint after `round_index` rounds; returns its seconds."""
        started = time.perf_counter()
        size = save_checkpoint(self.state_dir, round_index, self.engine.params, meta,
                               self.config.checkpoints_kept)
        elapsed = time.perf_counter() - started
        # The first one at INFO: what a checkpoint costs on this board, once per start.
        log.log(logging.DEBUG if self._checkpointed else logging.INFO,
                "checkpoint after round %d: %d bytes in %.1f ms", round_index, size,
                elapsed * 1000)
        self._checkpointed = True
        return elapsed

    async def _train(self) -> None:
        assert self.membership is not None
        while await self._wait_for_view() is not None:
            if not await self._run_rounds():
                return
            log.warning("peer %s was dropped from the view in round %d; joining again",
                        self.peer_id, self.round_index)
            self.membership.rejoin()
            self._contexts.clear()
            self._inbox.clear()
            self._arrived_at.clear()
            self._merged.clear()

    async def _run_rounds(self) -> bool:
        """Rounds until the last one or a stop; True when this peer was dropped from the view
        instead (it then joins again)."""
        assert self.membership is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        while not self._stopping.is_set() and (
            self.config.rounds is None or self.round_index < self.config.rounds
        ):
            if not self.config.sync:
                self._catch_up()
            if not await self._settle():
                return self.membership.dropped()
            view = self.membership.view_at(self.round_index)
            round_started = time.monotonic()
            ctx = self._context(self.round_index)
            log.info("round %d: training (%d steps)", self.round_index + 1,
                     self.engine.round_steps())
            stats = await loop.run_in_executor(self._worker, self.engine.train, ctx)
            if self.config.slowdown > 1:
                # A device this many times slower at training, without using the CPU.
                await asyncio.sleep((self.config.slowdown - 1) * (time.monotonic() - round_started))
            outgoing = await loop.run_in_executor(self._worker, self.engine.outbox, ctx)
            if self.config.sync:
                await self._push_all(view, ctx, outgoing)
            else:
                # Semi-async: a slow receiver must not hold this peer's round.
                push = asyncio.ensure_future(self._push_all(view, ctx, outgoing))
                self._pushes.add(push)
                push.add_done_callback(self._pushes.discard)
            missing = await self._collect(ctx)
            if missing is None:
                return self.membership.dropped()
            on_time, late = self._take_slices(ctx)
            staleness = await loop.run_in_executor(self._worker, self.engine.merge, ctx,
                                                   on_time, late)
            if self.exporter is not None:
                for rounds_late in [0] * len(on_time) + staleness:
                    self.exporter.observe_staleness(rounds_late)
            self.last_loss = stats.loss
            self.rounds_done += 1
            await loop.run_in_executor(self._worker, self._keep_snapshot, ctx)
            checkpoint_s = None
            if self.config.checkpoints_kept:
                checkpoint_s = await loop.run_in_executor(
                    self._worker, self._checkpoint, ctx.round_index + 1, self._checkpoint_meta(ctx))
            local = await loop.run_in_executor(self._worker, self.engine.evaluate_local, ctx)
            self._record_round(ctx, stats, local, time.monotonic() - round_started,
                               time.monotonic() - started, checkpoint_s, missing, staleness)
            self._forget_before(self.round_index)
            self.round_index += 1
        if not self._stopping.is_set():
            # The last slices still reach the neighbours (each push ends at its own deadline).
            await asyncio.gather(*self._pushes, return_exceptions=True)
        return False

    def _catch_up(self) -> None:
        """Semi-async: a peer whose neighbours are rounds ahead skips to the furthest one's
        round instead of training rounds whose slices would reach them too late (a straggler
        keeps training, on the rounds its neighbours are in). Never past a round where the view
        may change (a join is applied at exactly its round, and the joiner pulls parameters
        after the round before it), nor past the last round."""
        assert self.membership is not None
        membership = self.membership
        view = membership.view_at(self.round_index)
        if view is None or self.peer_id not in view.ids:
            return
        neighbours = self.engine.topology.neighbours(list(view.ids), self.peer_id)
        target = max((membership.known[p].round for p in neighbours if p in membership.known),
                     default=self.round_index)
        changes = [*membership.tickets.values(), *(t.round for t in membership.leaves.values())]
        limits = [target, *(r - 1 for r in changes if r > self.round_index)]
        if self.config.rounds is not None:
            limits.append(self.config.rounds - 1)
        target = min(limits)
        if target > self.round_index and membership.view_at(target) is view:
            log.info("round %d: neighbours are at round %d; skipping to it", self.round_index,
                     target)
            self.round_index = target

    def _take_slices(self, ctx: RoundContext) -> tuple[list[SliceMessage], list[LateSlice]]:
        """Take this round's slices and the late ones of earlier rounds out of the inbox (what
        arrives from now on waits for the next merge); late ones beyond the window are
        dropped here, and the arrival delays of this round's are recorded."""
        round_index = ctx.round_index
        on_time = list(self._inbox.pop(round_index, {}).values())
        late: list[LateSlice] = []
        for old in sorted(r for r in self._inbox if r < round_index):
            for message in self._inbox.pop(old).values():
                self._merged.add((old, message.sender))
                if round_index - old <= self._late_window:
                    late.append(LateSlice(self._context(old), message))
                else:
                    log.info("round %d: dropping %s's slice of round %d (more than %d rounds "
                             "late)", round_index, message.sender, old, self._late_window)
        self._merged.update((round_index, message.sender) for message in on_time)
        self._merged = {(r, p) for r, p in self._merged if r >= round_index - self._late_window}
        self._arrived_at = {key: at for key, at in self._arrived_at.items()
                            if key[0] > round_index}
        return on_time, late

    def _checkpoint_meta(self, ctx: RoundContext) -> dict:
        return {**self.identity, "cluster": self.config.cluster,
                "view": [view_entry(m) for m in ctx.members],
                "rounds_done": self.rounds_done, "train_loss": self.last_loss,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    async def _settle(self) -> bool:
        """Wait until the view of this round is known: every leave that may take effect now
        and every join accepted for it decided. False when stopping or dropped."""
        assert self.membership is not None
        membership = self.membership
        before = membership.view_at(self.round_index)
        previous = membership.view_at(self.round_index - 1)
        while True:
            membership.tick(self.round_index)
            if self._stopping.is_set() or membership.dropped():
                return False
            if membership.settle_leaves(self.round_index) and membership.settle_joins(
                    self.round_index):
                break
            await asyncio.sleep(0.05)
        after = membership.view_at(self.round_index)
        if after is not before:
            self._contexts = {r: c for r, c in self._contexts.items() if r < self.round_index}
        if after is not None and previous is not None and after is not previous:
            gone = sorted(set(previous.ids) - set(after.ids))
            came = sorted(set(after.ids) - set(previous.ids))
            log.info("view %s from round %d: %s%s%s", after.view_id, self.round_index,
                     ", ".join(after.ids), f" (dropped: {', '.join(gone)})" if gone else "",
                     f" (joined: {', '.join(came)})" if came else "")
        return True

    async def _push_all(self, view: View, ctx: RoundContext,
                        outgoing: list[SliceMessage]) -> None:
        assert self.membership is not None

        async def push(message: SliceMessage) -> None:
            peer = self.membership.known[message.receiver]
            header = peer_pb2.StreamHeader(
                protocol_version=PROTOCOL_VERSION, cluster=self.config.cluster,
                model_fingerprint=self.fingerprint, sender=self.peer_id,
                receiver=message.receiver, round=ctx.round_index, view_id=view.view_id,
                weight=message.weight, plan=plan_to_wire(ctx.plans_now[self.peer_id]),
            )
            deadline = time.monotonic() + self.config.round_timeout_s
            # Semi-async: a receiver rounds behind would refuse the slice ("not there yet");
            # wait until its handshakes say it caught up instead of streaming it again and again.
            while (not self.config.sync and self._behind(message.receiver, ctx.round_index)
                   and time.monotonic() < deadline and not self._stopping.is_set()):
                await asyncio.sleep(COLLECT_POLL_S)
            while True:
                try:
                    acknowledged = await self.clients.push(peer.address, header, message.values)
                    break
                except grpc.aio.AioRpcError as error:
                    # A receiver being dropped from the view is not waited for; refusals
                    # (bad slice, wrong round, ...) are final.
                    retry = (error.code() in RETRIED_PUSH_CODES
                             and message.receiver not in self.membership.leaving())
                    if not retry or time.monotonic() > deadline or self._stopping.is_set():
                        log.warning("round %d: push to %s failed: %s %s", ctx.round_index,
                                    message.receiver, error.code().name, error.details())
                        return
                    await asyncio.sleep(0.1)
            self.bytes_sent += acknowledged
            peer.bytes_sent += acknowledged

        await asyncio.gather(*(push(message) for message in outgoing))

    def _behind(self, peer_id: str, round_index: int) -> bool:
        """Does `peer_id` (not being dropped) report a round before `round_index - 1`?"""
        assert self.membership is not None
        peer = self.membership.known.get(peer_id)
        return (peer is not None and peer.round + 1 < round_index
                and peer_id not in self.membership.leaving())

    async def _collect(self, ctx: RoundContext) -> list[str] | None:
        """Wait for every neighbour's slice of this round, but not for neighbours being dropped
        from the view; semi-async, only until the adaptive deadline once a quorum is in.
        Returns the neighbours merged without; None if the daemon is stopping or was dropped
        itself."""
        assert self.membership is not None
        ready_at = time.monotonic()
        timeout_at = ready_at + self.config.round_timeout_s
        deadline_at = ready_at + self._delays.deadline_s()
        quorum = math.ceil(self.config.quorum * len(ctx.neighbours))
        while True:
            if self.membership.dropped():
                log.warning("round %d abandoned: this peer is being dropped from the view",
                            ctx.round_index)
                return None
            arrived = self._inbox.get(ctx.round_index, {})
            leaving = self.membership.leaving()
            missing = [p for p in ctx.neighbours if p not in arrived]
            now = time.monotonic()
            if all(p in leaving for p in missing):
                if missing:
                    log.warning("round %d: merging without %s (being dropped from the view)",
                                ctx.round_index, ", ".join(missing))
                break
            if not self.config.sync and now >= deadline_at and len(arrived) >= quorum:
                log.info("round %d: closing at the %.2f s deadline without %s",
                         ctx.round_index, deadline_at - ready_at, ", ".join(missing))
                break
            remaining = timeout_at - now
            if remaining <= 0:
                log.warning("round %d: no slice from %s after %.0f s; merging without",
                            ctx.round_index, ", ".join(missing), self.config.round_timeout_s)
                break
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            stopper = asyncio.ensure_future(self._stopping.wait())
            # Woken at least every poll interval (a neighbour may start being dropped) and at
            # the deadline.
            wake = min(remaining, COLLECT_POLL_S)
            if not self.config.sync and deadline_at > now:
                wake = min(wake, deadline_at - now)
            await asyncio.wait({waiter, stopper}, timeout=wake,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self._stopping.is_set():
                log.info("round %d abandoned: stopping", ctx.round_index)
                return None
        delays = sorted(self._arrived_at[(ctx.round_index, peer)] - ready_at for peer in arrived)
        if delays and len(delays) >= quorum:
            self._delays.record(delays[max(quorum, 1) - 1])
        return missing

    def _keep_snapshot(self, ctx: RoundContext) -> None:
        params = {name: tensor.clone() for name, tensor in self.engine.params.items()}
        self._snapshots[ctx.round_index + 1] = (params, ctx.plans_now[self.peer_id])
        for old in sorted(self._snapshots)[:-SNAPSHOTS_KEPT]:
            del self._snapshots[old]

    def _forget_before(self, round_index: int) -> None:
        """Contexts of rounds whose slices may no longer arrive (the inbox empties as slices
        are merged)."""
        for old in [r for r in self._contexts if r < round_index - self._late_window]:
            del self._contexts[old]

    def _record_round(
        self, ctx: RoundContext, stats: TrainStats, local: Evaluation, round_s: float,
        wall_s: float, checkpoint_s: float | None, missing: list[str], staleness: list[int],
    ) -> None:
        record = {
            "round": ctx.round_index + 1, "peer_id": self.peer_id, "train_loss": stats.loss,
            "local_acc": local.accuracy, "local_loss": local.loss, "local_ppl": local.perplexity,
            "samples": stats.samples,
            "forward_flops_per_sample": stats.forward_flops_per_sample,
            "train_flops": stats.train_flops, "bytes_sent_cum": self.bytes_sent,
            "bytes_received_cum": self.bytes_received, "neighbours": list(ctx.neighbours),
            "members": len(ctx.members),
            "round_s": round_s, "wall_s": wall_s, "checkpoint_s": checkpoint_s,
            "merged_without": missing, "late_merged_staleness": staleness,
        }
        with open(self.state_dir / ROUNDS_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.exporter is not None and self.membership is not None:
            self.exporter.observe_round(record)
            self.exporter.set_membership(len(ctx.members), len(self.membership.known))
        if self.on_round is not None:
            self.on_round(record)
        log.info("round %d done: loss %.4f, %d neighbours, %.2f s, sent %d B", ctx.round_index + 1,
                 stats.loss, len(ctx.neighbours), round_s, self.bytes_sent)
        self.notifier.status(f"round {ctx.round_index + 1} done: loss {stats.loss:.4f}, "
                             f"{len(ctx.members)} members")

    def _save(self) -> None:
        view = self.membership.view if self.membership else None
        save_parameters(self.state_dir, self.engine.params, {
            "peer_id": self.peer_id, "rounds_done": self.rounds_done, "seed": self.config.seed,
            "method": self.config.method, "task": self.config.task,
            "view": [view_entry(m) for m in view.members] if view else [],
            "model_fingerprint": self.fingerprint,
        })


def serve(config: DaemonConfig, console: Console | None = None) -> RunSummary:
    """Run one daemon to completion on uvloop (`peerd start`); on a terminal `console` shows
    each round's training steps and a line per finished round."""
    import uvloop

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    keep_freed_memory()
    daemon = Daemon(config)
    if console is not None:
        daemon.on_round = lambda record: console.say(round_line(record))
        show_steps = step_display(console, lambda: f"round {daemon.round_index + 1}: training")
        daemon.engine.on_step = show_steps
    return uvloop.run(daemon.run())
