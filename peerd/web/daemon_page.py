"""One daemon's page: its status reply, its rounds.jsonl and the plans of its view.

The daemon is read through a narrow interface (DaemonFacts): its status reply (what `peerd
status` gets), its configuration, its model's unit groups, its metrics and its state dir. The
planner and topology are built here from the configuration, as every peer builds its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from peerd.algorithm.plan import planner_for
from peerd.algorithm.topology import load_topology
from peerd.config import DaemonConfig
from peerd.models.base import ModelSpec
from peerd.ops.exporter import Exporter
from peerd.state import ROUNDS_LOG
from peerd.v1 import peer_pb2
from peerd.web.facts import (
    STRAGGLER_ROUNDS,
    RecentWarnings,
    ViewChanges,
    Windows,
    describe_members,
    reply_members,
    status_json,
    stragglers,
    topology_edges,
)
from peerd.web.records import RecordsFile
from peerd.web.server import NotServed, WebServer

log = logging.getLogger("peerd.web")

# Warnings of the whole daemon: its loggers all sit under this one.
WATCHED_LOGGER = "peerd"


def rounds_reply(records: RecordsFile, series: str, since: int) -> dict[str, Any]:
    """/api/rounds: a series' records after round `since`, and its last round (smaller than
    `since` when the log was rewound: the page then reads it again from the start). Reads the
    file: call it off the event loop."""
    return {"peer_id": series, "since": since, "records": records.after(since),
            "last_round": records.last_round()}


class DaemonFacts(Protocol):
    peer_id: str
    config: DaemonConfig
    spec: ModelSpec
    state_dir: Path
    exporter: Exporter | None

    def status(self) -> peer_pb2.StatusReply: ...


def metric_name(spec: ModelSpec) -> str:
    """The local metric the page plots: perplexity for text, accuracy otherwise."""
    return "perplexity" if spec.kind == "text" else "accuracy"


class DaemonPage:
    """The PageSource of one daemon; start() serves it, stop() frees the port."""

    def __init__(self, daemon: DaemonFacts) -> None:
        self.daemon = daemon
        config = daemon.config
        self.topology = load_topology(config.topology)
        self.windows = Windows(planner_for(config, daemon.spec), daemon.spec.groups)
        self.records = RecordsFile(daemon.state_dir / ROUNDS_LOG)
        self.warnings = RecentWarnings()
        self.view_changes = ViewChanges()
        self.server = WebServer(self)

    async def start(self, advertised_host: str) -> int:
        """Serve on --metrics-host (default: --host) and --metrics-port; returns the bound
        port. `advertised_host` is what peers dial, shown when listening on every address."""
        config = self.daemon.config
        host = config.metrics_host or config.host
        port = await self.server.start(host, config.metrics_port or 0)
        logging.getLogger(WATCHED_LOGGER).addHandler(self.warnings)
        shown = advertised_host if host in ("0.0.0.0", "") else host
        if ":" in shown:  # an IPv6 address, bracketed in a URL
            shown = f"[{shown}]"
        log.info("metrics on http://%s:%d/metrics", shown, port)
        log.info("page on http://%s:%d/", shown, port)
        return port

    async def stop(self) -> None:
        logging.getLogger(WATCHED_LOGGER).removeHandler(self.warnings)
        await self.server.stop()

    def metrics(self) -> bytes | None:
        exporter = self.daemon.exporter
        return None if exporter is None else exporter.render()

    async def status(self) -> dict[str, Any]:
        # The reply is taken on the loop (the daemon's state is the loop's); the rest runs off it.
        reply = self.daemon.host.status()
        return await self.server.off_loop(self._describe, reply, time.time())

    def _describe(self, reply: peer_pb2.StatusReply, now: float) -> dict[str, Any]:
        """On the server's one worker thread: requests are described one at a time."""
        config, spec = self.daemon.config, self.daemon.spec
        me = reply.self
        facts = reply_members(reply, now)
        members = describe_members(facts, bool(me.view_id), now, config.dead_after_s,
                                   config.rounds, stragglers(self.records.latest(
                                       STRAGGLER_ROUNDS)))
        view = [fact for fact in facts if fact.position >= 0]
        for note in self.view_changes.notes((fact.peer_id for fact in view), me.round):
            self.warnings.note(note, "view")
        windows = self.windows.describe([fact.member(spec.groups) for fact in view], me.round)
        return {
            "kind": "daemon", "peer_id": me.peer_id, "cluster": me.cluster,
            "topology": self.topology.name, "method": config.method, "task": config.task,
            "metric": metric_name(spec), "round": me.round, "rounds_done": reply.rounds_done,
            "last_round": config.rounds, "now_unix": now, "view_id": me.view_id,
            "members": members,
            "edges": topology_edges(self.topology, [fact.peer_id for fact in view]),
            "windows": windows, "warnings": self.warnings.latest(),
            "series": [me.peer_id], "status": status_json(reply),
        }

    async def rounds(self, peer_id: str | None, since: int) -> dict[str, Any]:
        if peer_id not in (None, self.daemon.peer_id):
            raise NotServed(f"this daemon keeps only its own rounds ({self.daemon.peer_id}), "
                            f"not {peer_id}'s")
        return await self.server.off_loop(rounds_reply, self.records, self.daemon.peer_id, since)
