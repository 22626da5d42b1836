"""One daemon: discovery + membership + the round driver over the gRPC transport, on one
asyncio loop.

This module is wiring: the steps of a round are the round driver's (peerd/algorithm/driver.py),
the slices travel by peerd/net/slices.py, the view is peerd/net/membership.py's. Training,
slicing, merging and file writes run on a single worker thread (the engine is not thread-safe
and the event loop must never block); the loop keeps answering handshakes, pushes, pulls and
status calls meanwhile. After every merge the driver writes a checkpoint; a restarted daemon
resumes from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from peerd.agreement import agreed_settings, cluster_fingerprint, describe_settings
from peerd.algorithm.driver import RoundDriver, RoundOutcome, RoundRules, round_record
from peerd.algorithm.engine import RoundContext
from peerd.algorithm.plan import width_group_names
from peerd.algorithm.reduce import PartMessage
from peerd.algorithm.submodel import copy_into, param_bytes
from peerd.algorithm.transport import SliceMessage
from peerd.allocator import keep_freed_memory
from peerd.checkpoints import Checkpoints, enter_at, resume
from peerd.config import DaemonConfig
from peerd.looplag import LoopLag
from peerd.models.base import fingerprint
from peerd.net import GRPC_OPTIONS
from peerd.net.bulk import BulkSender, BulkServer
from peerd.net.client import PeerClients
from peerd.net.discovery import DiscoveryManager
from peerd.net.handshakes import Handshakes, discovery_sources
from peerd.net.host import DaemonHost, advertised_host
from peerd.net.limits import bind, prepare_server_limits
from peerd.net.membership import Membership, View
from peerd.net.roster import MembershipRoster
from peerd.net.rpc import add_peer_service
from peerd.net.service import PeerService
from peerd.net.slices import GrpcSlices
from peerd.net.tls import TlsError, TlsIdentity
from peerd.ops.ca import DEVICE_CERT
from peerd.ops.exporter import Exporter
from peerd.ops.progress import Console, round_line, step_display
from peerd.ops.systemd import Notifier, watchdog_loop
from peerd.peer import SNAPSHOTS_KEPT, build_peer, snapshot_budget_bytes
from peerd.state import ROUNDS_LOG, load_or_create_peer_id, rewind
from peerd.web.daemon_page import DaemonPage

log = logging.getLogger("peerd.daemon")

# While waiting for the first view the daemon says who it has found this often (a person at
# the terminal must never wonder whether it hangs).
WAITING_REPORT_S = 5.0
SERVER_GRACE_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class RunSummary:
    peer_id: str
    rounds_done: int
    train_loss: float
    members: int
    bytes_sent: int
    bytes_received: int


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


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        # First: a missing certificate is reported before seconds of data loading.
        self.tls = None if config.insecure else TlsIdentity.load_device(config.tls_dir)
        self.state_dir = Path(config.state_dir)
        self.peer_id = own_peer_id(config, self.tls)
        peer = build_peer(config, 0 if config.shard is None else config.shard[0], self.peer_id)
        # torch.optim imports torch._dynamo on the first optimizer (seconds, holding the GIL):
        # here, before the loop serves, not on the worker in round 1 (it starved the loop).
        import torch._dynamo  # noqa: F401
        self.engine, self.me, self.spec = peer.engine, peer.member, peer.spec
        self.agreed_settings = agreed_settings(config)
        self.fingerprint = cluster_fingerprint(fingerprint(self.spec), self.agreed_settings)
        self.checkpoints = Checkpoints(
            self.state_dir, {"peer_id": self.peer_id, "task": config.task,
                             "method": config.method, "seed": config.seed,
                             "model_fingerprint": self.fingerprint},
            config.cluster, config.checkpoints_kept)
        self.clients = PeerClients(self.tls, push_timeout_s=config.round_timeout_s)
        # Its address is known once the server is bound (run).
        self.membership = Membership(self.me, "", config.min_peers,
                                     dead_after_s=config.dead_after_s,
                                     frozen_blocks=self.engine.frozen_blocks,
                                     width_groups=width_group_names(self.spec.groups))
        self._stopping = asyncio.Event()
        last_round = None if config.rounds is None else config.rounds - 1
        self.roster = MembershipRoster(self.membership, self.engine.topology, last_round,
                                       self._stopping)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        rules = RoundRules(config.sync, config.quorum, config.round_timeout_s,
                           config.deadline_mads, config.deadline_floor_s, config.max_staleness)
        self.driver = RoundDriver(
            self.engine, self.roster, self, rules, self._offload, SNAPSHOTS_KEPT,
            evaluate_local=True, slowdown=config.slowdown,
            checkpoint=self._checkpoint if config.checkpoints_kept else None,
            stopping=self._stopping, reduce_parts=self if config.reduce_scatter else None,
            snapshot_budget_bytes=snapshot_budget_bytes(param_bytes(self.engine.params)))
        bulk = BulkSender(self.tls, threshold=config.bulk_threshold) if config.bulk else None
        self.slices = GrpcSlices(self.driver, self.membership, self.clients, config.cluster,
                                 self.fingerprint, bulk)
        self.host = DaemonHost(self.spec, config.cluster, self.fingerprint, self.membership,
                               self.driver, self.slices)
        self.handshakes = Handshakes(self.clients, self.host, self.membership,
                                     lambda: self.driver.round_index)
        self.notifier = Notifier.from_environment()
        self.exporter: Exporter | None = None
        if config.metrics_port is not None:
            self.exporter = Exporter(self.peer_id, config.cluster, self.fingerprint, self.me.mu,
                                     self.me.depth, self.engine.frozen_blocks)
        self.on_round: Callable[[dict], None] | None = None  # e.g. a terminal progress line
        self.loop_lag = LoopLag()
        resumed = self.checkpoints.load(self.engine.params, None)
        if resumed is not None:
            log.info("resuming after round %d from %s", resumed.round, resumed.path)
            copy_into(self.engine.params, resumed.params)
            resume(self.driver, resumed)

    async def _offload(self, function: Callable[..., T], *args: Any) -> T:
        """A blocking step on the engine's worker thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def _checkpoint(self, rounds: int, meta: dict) -> float | None:
        """Worker: the checkpoint after `rounds` rounds; its seconds, or None when it failed (a
        full disk, no descriptor left): the run goes on and the next round writes the next one."""
        try:
            return self.checkpoints.save(rounds, self.engine.params, meta)
        except OSError as error:
            log.warning("checkpoint after round %d failed, retried after the next round: %s",
                        rounds, error)
            if self.exporter is not None:
                self.exporter.observe_checkpoint_failure()
            return None

    async def push(self, ctx: RoundContext, message: SliceMessage) -> int:
        return await self.slices.push(ctx, message)

    async def push_part(self, ctx: RoundContext, part: PartMessage) -> int:
        return await self.slices.push_part(ctx, part)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._begin_stopping)
        if self.config.rounds is not None and self.driver.round_index >= self.config.rounds:
            log.info("the checkpoint in %s already holds round %d of %d: nothing left to do",
                     self.state_dir, self.driver.round_index, self.config.rounds)
            return self._summary()
        # Limits first, then the port: a second daemon on it stops here, before mDNS.
        server = grpc.aio.server(options=GRPC_OPTIONS + prepare_server_limits())
        on_reject = self.exporter.observe_rejected if self.exporter else None
        add_peer_service(server, PeerService(self.host, on_reject))
        bind_address = f"{self.config.host}:{self.config.port}"
        if self.tls is None:
            log.warning("running without TLS (--insecure): anyone who reaches %s can join the "
                        "cluster, push slices into this model and pull its parameters",
                        bind_address)
            port = bind(server.add_insecure_port, bind_address)
        else:
            credentials = self.tls.server_credentials()
            port = bind(lambda where: server.add_secure_port(where, credentials), bind_address)
        address = self.membership.address = f"{advertised_host(self.config)}:{port}"
        await server.start()
        bulk = (BulkServer(self.host, self.tls, loop, on_reject=on_reject) if self.config.bulk
                else None)
        if bulk is not None:
            self.membership.bulk_port = bulk.start(self.config.host, self.config.bulk_port)
        page = None
        if self.config.metrics_port is not None:
            page = DaemonPage(self)
            await page.start(advertised_host(self.config))
        discovery = DiscoveryManager(discovery_sources(self.config, self.me, self.fingerprint,
                                                       address, port))
        await discovery.start()
        log.info("peer %s serving on %s (cluster %s, fingerprint %s: %s, %s)", self.peer_id,
                 address, self.config.cluster, self.fingerprint,
                 describe_settings(self.agreed_settings),
                 f"mutual TLS with {self.tls.directory}" if self.tls else "no TLS")
        # Ready only now: peers and `peerd status` can reach this daemon from here on.
        self.notifier.ready(f"serving on {address}, waiting for {self.config.min_peers} "
                            f"members of cluster {self.config.cluster}")
        handshakes = asyncio.create_task(self.handshakes.forever(discovery))
        lag = asyncio.create_task(self.loop_lag.watch())
        interval = self.notifier.watchdog_interval_s()
        watchdog = asyncio.create_task(watchdog_loop(self.notifier, interval)) if interval else None
        try:
            await self._train()
            if self.config.linger_s and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.config.linger_s)
        finally:
            self.notifier.stopping()
            if self._stopping.is_set():
                # Stopped mid-run: the members drop this peer at once instead of waiting.
                self.membership.stopping = True
                await self.clients.say_goodbye(self.membership, self.host.hello())
            for task in (handshakes, lag, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await discovery.stop()
            await self.driver.cancel_sends()
            await self.clients.close()
            await server.stop(SERVER_GRACE_S)
            if bulk is not None:  # off the loop: its threads may be waiting for the loop
                await loop.run_in_executor(None, bulk.stop)
            self._worker.shutdown(wait=True)
            view = self.membership.view
            self.checkpoints.save_final(self.engine.params, self.driver.rounds_done,
                                        view.members if view else ())
            if page is not None:
                await page.stop()
            self.notifier.close()
        return self._summary()

    def _summary(self) -> RunSummary:
        view, driver = self.membership.view, self.driver
        return RunSummary(self.peer_id, driver.rounds_done, driver.last_loss,
                          len(view.members) if view else 1, driver.bytes_sent,
                          driver.bytes_received)

    def _begin_stopping(self) -> None:
        self.notifier.stopping()
        self._stopping.set()

    async def _wait_for_view(self) -> View | None:
        """The first view: agreed with the others, or entered by joining a running one."""
        driver = self.driver
        next_report = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_report:
                log.info("%s", self.handshakes.waiting_line(self.config.min_peers))
                next_report = time.monotonic() + WAITING_REPORT_S
            view = self.membership.try_commit(driver.round_index)
            if view is not None:
                first_round = self.membership.first_round
                log.info("view %s committed from round %d: %s", view.view_id, first_round,
                         ", ".join(view.ids))
                await enter_at(driver, self.checkpoints, first_round)
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
                await self.slices.join(round_index, running, self.config.dead_after_s)
                await self._offload(rewind, self.state_dir, round_index)
                return joined
            await asyncio.sleep(0.1)
        return None

    async def _train(self) -> None:
        while await self._wait_for_view() is not None:
            if not await self._run_rounds():
                return
            log.warning("peer %s was dropped from the view in round %d; joining again",
                        self.peer_id, self.driver.round_index)
            self.membership.rejoin()
            self.driver.forget_rounds()

    async def _run_rounds(self) -> bool:
        """Rounds until the last one or a stop; True when this peer was dropped from the view
        instead (it then joins again)."""
        driver, roster, config = self.driver, self.roster, self.config
        started = time.monotonic()
        while not self._stopping.is_set() and (
            config.rounds is None or driver.round_index < config.rounds
        ):
            if not config.sync:
                driver.round_index = roster.catch_up(driver.round_index)
            if not await roster.settle(driver.round_index):
                return roster.dropped()
            self.loop_lag.take()  # from here: the lag during this round
            log.info("round %d: training (%d steps)", driver.round_index + 1,
                     self.engine.round_steps())
            outcome = await driver.run_round()
            if outcome is None:
                return roster.dropped()
            self._record_round(outcome, time.monotonic() - started)
        if not self._stopping.is_set():
            await driver.finish_sends()
        return False

    def _record_round(self, outcome: RoundOutcome, wall_s: float) -> None:
        record = round_record(outcome, self.driver, wall_s, self.loop_lag.take())
        with open(self.state_dir / ROUNDS_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        ctx = outcome.ctx
        if self.exporter is not None:
            for rounds_late in [0] * outcome.on_time + outcome.late_staleness:
                self.exporter.observe_staleness(rounds_late)
            self.exporter.observe_round(record)
            self.exporter.set_membership(len(ctx.members), len(self.membership.known))
        if self.on_round is not None:
            self.on_round(record)
        log.info("round %d done: loss %.4f, %d neighbours, %.2f s, sent %d B", record["round"],
                 record["train_loss"], len(ctx.neighbours), outcome.round_s,
                 self.driver.bytes_sent)
        self.notifier.status(f"round {record['round']} done: loss {record['train_loss']:.4f}, "
                             f"{len(ctx.members)} members")


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
        daemon.engine.on_step = step_display(
            console, lambda: f"round {daemon.driver.round_index + 1}: training")
    return uvloop.run(daemon.run())
