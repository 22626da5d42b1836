"""`peerd cluster`: N real daemon processes on loopback, watched and evaluated from outside.

Each daemon is a separate `peerd start` process with its own state dir, port and data shard,
started with the flags of every option the cluster shares with it (peerd/config.py);
they find each other by mDNS on 127.0.0.1 (and, unless disabled, by their static addresses)
and exchange slices over gRPC with mutual TLS: a cluster CA in OUT/ca issues every daemon its
certificate, and this process one of its own (`cluster`). This process never touches their
training: it polls their status, pulls each peer's post-merge parameters at evaluation rounds,
one peer at a time, assembles the global model from them (mean over each entry's holders) and
writes the same metrics as `peerd sim`. In semi-asynchronous mode a slow daemon skips rounds:
round N is evaluated once every daemon has reached it, with each daemon's parameters after the
last round it ran up to N.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from torch import nn

from peerd.agreement import agreed_settings, cluster_fingerprint
from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.plan import Member, Plans, decode_widths, planner_for, width_group_names
from peerd.algorithm.submodel import forward_flops_per_sample, init_params
from peerd.algorithm.topology import load_topology
from peerd.config import ENV_PREFIX, ClusterConfig, DaemonConfig, member_options
from peerd.live_model import MemberPull, pull_into
from peerd.memlimit import MemoryGroup
from peerd.metrics import GlobalEvaluation, MetricsLog, PeerRound, run_title
from peerd.models.base import fingerprint, full_units
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import Expectation
from peerd.net.tls import TlsIdentity
from peerd.ops.ca import CA_CERT, DEVICE_ROLE, READER_ROLE, init_ca, issue
from peerd.ops.progress import Console
from peerd.options import command_line
from peerd.sim import peer_name
from peerd.state import CHECKPOINT_DIR
from peerd.tasks import get_task
from peerd.v1 import peer_pb2
from peerd.web.cluster_page import ClusterFacts, ClusterPage, WatchedDaemon
from peerd.web.daemon_page import metric_name

POLL_INTERVAL_S = 0.2
# The watcher's own certificate: its pulls claim this name.
WATCHER_ID = "cluster"
# A daemon loads torch and its data and, with mu auto, probes every width before it serves:
# for kjv-large (104M parameters) on 2 busy cores that took over a minute.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
ACTIVITY_CHARS = 45  # a daemon's activity on the live line; longer ones keep their first part


class ClusterError(RuntimeError):
    """A daemon failed; the message carries the end of its log."""


class ClusterStopped(ClusterError):
    """`peerd cluster` was sent SIGTERM (kill, systemd): it stops its daemons before it ends."""


@contextlib.contextmanager
def sigterm_stops_the_cluster() -> Iterator[None]:
    """Python's default SIGTERM ends the process without running `finally`, which would leave
    the daemons running as orphans; raising instead lets run_cluster stop them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopped(signum: int, frame: object) -> None:
        raise ClusterStopped("stopped by SIGTERM; its daemons were stopped too")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class DaemonProcess:
    peer_id: str
    address: str
    metrics_url: str
    state_dir: Path
    tls_dir: Path
    process: subprocess.Popen
    memory_group: MemoryGroup | None = None

    def log_tail(self, lines: int = 20) -> str:
        log_path = self.state_dir / "daemon.log"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def rounds(self) -> list[dict]:
        path = self.state_dir / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rounds_through(self, round_number: int) -> list[dict]:
        """The records of the rounds this daemon ran up to round `round_number` (1-based); a
        semi-asynchronous straggler skips some."""
        return [r for r in self.rounds() if r["round"] <= round_number]

    def last_round(self) -> int:
        records = self.rounds()
        return records[-1]["round"] if records else 0

    def activity(self) -> str:
        """What the daemon last logged, in short: 'waiting for peers: 1 of 3 members found',
        'round 2: training (28 steps)', 'round 2 done'."""
        message = self.log_tail(1).partition(": ")[2]  # after time stamp, level and logger
        message = message.split(" (", 1)[0].split("; ", 1)[0] if message else "starting"
        return message if len(message) <= ACTIVITY_CHARS else message.split(": ", 1)[0]

    @property
    def page_url(self) -> str:
        """The daemon's live page (docs/WEB.md), on its metrics port."""
        return self.metrics_url.removesuffix("metrics")


def tls_dirs(out: Path, peer_ids: list[str]) -> dict[str, Path]:
    """A certificate for every daemon and the watcher, from the CA in OUT/ca (created on the
    first run, kept after)."""
    ca_dir = out / "ca"
    if not (ca_dir / CA_CERT).exists():
        init_ca(ca_dir, "peerd local cluster CA", force=True)
    # The watcher pulls every daemon's parameters to evaluate the global model: a reader.
    return {peer_id: issue(ca_dir, peer_id, force=True,
                           role=READER_ROLE if peer_id == WATCHER_ID else DEVICE_ROLE).directory
            for peer_id in [*peer_ids, WATCHER_ID]}


def member_config(config: ClusterConfig, position: int, **wiring: object) -> DaemonConfig:
    """The daemon at `position`: every option it shares with the cluster (peerd/config.py,
    per-peer ones cycled), then `wiring`, this process's choice of ports, names and paths."""
    return DaemonConfig(**{**member_options(config, position), **wiring})


def launch(config: ClusterConfig, out: Path, tls: dict[str, Path]) -> list[DaemonProcess]:
    all_ports = free_ports(2 * config.peers)
    ports, metrics_ports = all_ports[:config.peers], all_ports[config.peers:]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    daemons = []
    for position, (port, metrics_port) in enumerate(zip(ports, metrics_ports, strict=True)):
        peer_id = peer_name(position)
        state_dir = out / peer_id
        state_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("rounds.jsonl", "daemon.log"):
            (state_dir / stale).unlink(missing_ok=True)
        # A demo cluster starts afresh: a daemon would resume from an earlier run's checkpoints.
        shutil.rmtree(state_dir / CHECKPOINT_DIR, ignore_errors=True)
        others = tuple(a for a in addresses if a != addresses[position])
        daemon = member_config(
            config, position, peer_id=peer_id, host="127.0.0.1", port=port,
            shard=(position, config.peers), rounds=config.rounds, min_peers=config.peers,
            state_dir=str(state_dir), cluster=f"local-{os.getpid()}", threads=1,
            round_timeout_s=config.round_timeout_s, linger_s=600.0,
            metrics_port=metrics_port, tls_dir=str(tls[peer_id]),
            slowdown=config.slowdown[position] if position < len(config.slowdown) else 1.0,
            mdns_interface="127.0.0.1" if config.mdns else None,
            peers=others if config.static_peers else ())
        # The command line alone decides: no config file, no PEERD_* variable of this shell.
        args = [sys.executable, "-m", "peerd.cli", "start", "--config", os.devnull,
                *command_line(daemon)]
        environ = {name: value for name, value in os.environ.items()
                   if not name.startswith(ENV_PREFIX)}
        log_file = open(state_dir / "daemon.log", "w")  # noqa: SIM115 - owned by the child
        group = None
        if config.memory_limit is not None:
            group = MemoryGroup.create(f"peerd-{os.getpid()}-{peer_id}", config.memory_limit)
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=environ,
                                   preexec_fn=None if group is None else group.enter)
        log_file.close()
        daemons.append(DaemonProcess(peer_id, addresses[position],
                                     f"http://127.0.0.1:{metrics_port}/metrics", state_dir,
                                     tls[peer_id], process, group))
    return daemons


def stop(daemons: list[DaemonProcess]) -> list[int]:
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
    codes = []
    for daemon in daemons:
        try:
            codes.append(daemon.process.wait(timeout=STOP_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            codes.append(daemon.process.wait())
    return codes


class ClusterWatcher:
    """Polls the daemons, pulls their parameters at evaluation rounds, writes the metrics."""

    def __init__(self, config: ClusterConfig, daemons: list[DaemonProcess],
                 tls: TlsIdentity, console: Console | None = None) -> None:
        self.config = config
        self.daemons = daemons
        self.console = console
        task = get_task(config.task)
        self.data = task.load_data(config.data_dir, label_column=config.label_column)
        self.spec = task.model(self.data, config.early_exits)
        self.eval_samples = config.eval_samples if config.eval_samples else task.eval_samples
        initial = init_params(self.spec, config.seed)
        shapes = {name: (torch.float32, tuple(t.shape)) for name, t in initial.items()}
        # What the daemons announce: their options, as `launch` gives them.
        settings = agreed_settings(member_config(config, 0))
        self.expectation = Expectation(PROTOCOL_VERSION, f"local-{os.getpid()}",
                                       cluster_fingerprint(fingerprint(self.spec), settings),
                                       lambda header: shapes)
        self.clients = PeerClients(tls)
        self.planner = planner_for(config, self.spec)
        self.members: list[Member] = []  # with the widths the daemons report (mu auto)
        self.coverage = CoverageTracker(self.spec, initial)

    def check_alive(self) -> None:
        for daemon in self.daemons:
            code = daemon.process.poll()
            if code is not None:
                raise ClusterError(f"{daemon.peer_id} exited with code {code}:\n"
                                   f"{daemon.log_tail()}")

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(self.daemons)
        widths: dict[str, peer_pb2.Capacity] = {}
        while pending:
            self.check_alive()
            self._status("starting the daemons: " + "; ".join(
                f"{d.peer_id} {d.activity()}" for d in self.daemons))
            if time.monotonic() > deadline:
                raise ClusterError(f"{pending[0].peer_id} did not answer within "
                                   f"{START_TIMEOUT_S:.0f} s:\n{pending[0].log_tail()}")
            still = []
            for daemon in pending:
                try:
                    reply = await self.clients.status(daemon.address, daemon.peer_id)
                except grpc.aio.AioRpcError:
                    still.append(daemon)
                else:
                    widths[daemon.peer_id] = reply.self.capacity
            pending = still
            await asyncio.sleep(POLL_INTERVAL_S)
        self.members = [
            Member(d.peer_id, widths[d.peer_id].mu, widths[d.peer_id].depth or None,
                   decode_widths(width_group_names(self.spec.groups), widths[d.peer_id].widths)
                   if widths[d.peer_id].widths else None)
            for d in self.daemons]

    async def wait_rounds(self, rounds: int) -> None:
        """Until every daemon has finished round `rounds` or moved past it (a semi-asynchronous
        straggler that skipped it: its status reports a later round than its last record)."""
        while True:
            self.check_alive()
            behind = [d for d in self.daemons if d.last_round() < rounds]
            if not behind:
                return
            self._status(f"round {rounds}/{self.config.rounds}: " + "; ".join(
                f"{d.peer_id} {d.activity()}" for d in behind))
            if not self.config.sync and await self._all_past(behind, rounds):
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    def _status(self, text: str) -> None:
        if self.console is not None:
            self.console.status(text)

    async def _all_past(self, daemons: list[DaemonProcess], rounds: int) -> bool:
        """Has each of these daemons run a round and is it now in one after round `rounds`?"""
        for daemon in daemons:
            if daemon.last_round() == 0:
                return False
            # The round it is in, 0-based: at least `rounds` means past round `rounds`, 1-based.
            reply = await self.clients.status(daemon.address, daemon.peer_id)
            if reply.self.round < rounds:
                return False
        return True

    async def evaluate(self, rounds: int, plans: Plans) -> tuple[dict[str, float], nn.Module]:
        """The global model after `rounds` rounds, assembled with the plans of its last round
        (computed here, like every peer does, never taken from the wire): its figures and the
        model itself."""
        local = [d.rounds_through(rounds)[-1] for d in self.daemons]

        def request(round_number: int) -> peer_pb2.PullRequest:
            return peer_pb2.PullRequest(
                protocol_version=PROTOCOL_VERSION, cluster=self.expectation.cluster,
                model_fingerprint=self.expectation.model_fingerprint, requester=WATCHER_ID,
                round=round_number)

        evaluation = GlobalEvaluation(self.spec, self.data, self.eval_samples)
        await pull_into(evaluation, self.clients,
                        [MemberPull(d.peer_id, d.address, request(record["round"]))
                         for d, record in zip(self.daemons, local, strict=True)],
                        self.expectation, plans)
        figures, model = evaluation.result()
        figures["peer_acc_mean"] = statistics.fmean(r["local_acc"] for r in local)
        if self.spec.kind == "text":
            figures["peer_ppl_mean"] = statistics.fmean(r["local_ppl"] for r in local)
        return figures, model

    def peer_rounds(self, rounds: int) -> list[PeerRound]:
        figures = []
        for daemon in self.daemons:
            history = daemon.rounds_through(rounds)
            last = history[-1]
            figures.append(PeerRound(last["train_loss"], last["forward_flops_per_sample"],
                                     sum(r["train_flops"] for r in history),
                                     last["bytes_sent_cum"]))
        return figures

    def page(self) -> ClusterPage:
        """The cluster's own page: its daemons' pages merged, with the assembled model."""
        config = self.config
        facts = ClusterFacts(f"local-{os.getpid()}", load_topology(config.topology).name,
                             config.method, config.task, metric_name(self.spec), config.rounds)
        return ClusterPage(facts, [WatchedDaemon(d.peer_id, d.page_url, d.state_dir)
                                   for d in self.daemons], Path(config.out) / "metrics.jsonl")

    async def run(self, log: MetricsLog, on_round: Callable[[dict], None] | None,
                  on_page: Callable[[str], None] | None = None) -> None:
        page = self.page()
        port = await page.start("127.0.0.1", 0)
        if on_page is not None:
            on_page(f"http://127.0.0.1:{port}/")
        try:
            await self._watch(log, on_round)
        finally:
            await page.stop()

    async def _watch(self, log: MetricsLog, on_round: Callable[[dict], None] | None) -> None:
        await self.wait_ready()
        # As the simulator records it: the mean width, known once the daemons report theirs.
        log.identity["mu"] = statistics.fmean(m.mu for m in self.members)
        started = time.monotonic()
        for rounds in range(1, self.config.rounds + 1):
            await self.wait_rounds(rounds)
            plans = self.planner.plan(rounds - 1, self.members, self.spec.groups)
            self.coverage.record(plans.values())
            evaluation, model = None, None
            if rounds % self.config.eval_every == 0 or rounds == self.config.rounds:
                self._status(f"round {rounds}/{self.config.rounds}: evaluating the global model")
                evaluation, model = await self.evaluate(rounds, plans)
            record = log.record(rounds, self.peer_rounds(rounds), self.coverage.fraction,
                                evaluation, time.monotonic() - started, model)
            if on_round is not None:
                on_round(record)
        await self.clients.close()


def run_cluster(
    config: ClusterConfig, on_round: Callable[[dict], None] | None = None,
    on_start: Callable[[list[DaemonProcess]], None] | None = None,
    console: Console | None = None,
    on_page: Callable[[str], None] | None = None,
) -> list[dict]:
    """`console` shows what the daemons are doing until each round is in."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.status(f"creating the cluster CA and {config.peers + 1} certificates in "
                       f"{out / 'ca'}")
    tls = tls_dirs(out, [peer_name(position) for position in range(config.peers)])
    daemons = launch(config, out, tls)
    try:
        with sigterm_stops_the_cluster():
            if on_start is not None:
                on_start(daemons)
            if console is not None:
                console.status(f"the daemons are starting (each loads torch and its data); loading "
                               f"the {config.task} data here to evaluate the global model")
            watcher = ClusterWatcher(config, daemons, TlsIdentity.load(tls[WATCHER_ID]), console)
            identity = {
                "task": config.task, "method": config.method, "topology": config.topology,
                "peers": config.peers, "seed": config.seed,
            }
            log = MetricsLog(out, identity, forward_flops_per_sample(watcher.spec,
                                                                     full_units(watcher.spec)))
            asyncio.run(watcher.run(log, on_round, on_page))
            log.close(run_title(config.method, [m.mu for m in watcher.members], config.task,
                                config.peers))
    finally:
        codes = stop(daemons)
        write_memory_report(out, daemons, codes, config.memory_limit)
    for daemon, code in zip(daemons, codes, strict=True):
        if code != 0:
            raise ClusterError(f"{daemon.peer_id} exited with code {code}:\n{daemon.log_tail()}")
    return log.records


def write_memory_report(out: Path, daemons: list[DaemonProcess], codes: list[int],
                        limit: int | None) -> None:
    """With memory limits: OUT/memory.json, each daemon's exit code, the kernel's OOM kills in
    its group and the group's peak charge; the groups are removed."""
    if limit is None:
        return
    report = {"memory_limit_bytes": limit, "daemons": {}}
    for daemon, code in zip(daemons, codes, strict=True):
        group = daemon.memory_group
        assert group is not None
        report["daemons"][daemon.peer_id] = {
            "exit_code": code, "oom_kills": group.oom_kills(),
            "group_peak_bytes": group.max_usage_bytes(),
            "rss_peak_bytes": max((r["rss_peak_bytes"] for r in daemon.rounds()), default=None)}
        group.remove()
    (out / "memory.json").write_text(json.dumps(report, indent=1))
