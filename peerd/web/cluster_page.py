"""The page of `peerd cluster`: the pages of its daemons merged into one, with the assembled
model's curve.

Members are each daemon's own row of its own /api/status (a daemon that stops answering is shown
gone); the topology, windows and coverage are those of the daemon furthest ahead; warnings of all
are merged. Curves read each daemon's rounds.jsonl and the cluster's metrics.jsonl, whose records
carry the assembled model's metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from peerd.state import ROUNDS_LOG
from peerd.web.daemon_page import rounds_reply
from peerd.web.facts import GONE, WARNINGS_KEPT
from peerd.web.records import RecordsFile
from peerd.web.server import NotServed, WebServer

ASSEMBLED = "assembled"  # the series of the assembled model (metrics.jsonl)
FETCH_TIMEOUT_S = 2.0
# Replies are shared by the requests of this long: many open pages cost the daemons one poll.
REPLY_KEPT_S = 0.5


@dataclass(frozen=True)
class WatchedDaemon:
    peer_id: str
    page_url: str  # ends with /
    state_dir: Path


@dataclass(frozen=True)
class ClusterFacts:
    cluster: str
    topology: str
    method: str
    task: str
    metric: str  # accuracy or perplexity
    last_round: int


class ClusterPage:
    """The PageSource of a local cluster; start() serves it, stop() frees the port."""

    def __init__(self, facts: ClusterFacts, daemons: Sequence[WatchedDaemon],
                 metrics_log: Path) -> None:
        self.facts = facts
        self.daemons = list(daemons)
        self.records = {d.peer_id: RecordsFile(d.state_dir / ROUNDS_LOG) for d in self.daemons}
        self.records[ASSEMBLED] = RecordsFile(metrics_log)
        self.server = WebServer(self)
        self._session: aiohttp.ClientSession | None = None
        self._last_rows: dict[str, dict] = {}  # each daemon's own row when it last answered
        self._reply: tuple[float, dict[str, Any]] | None = None
        self._reply_lock = asyncio.Lock()

    async def start(self, host: str, port: int) -> int:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(FETCH_TIMEOUT_S))
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def metrics(self) -> bytes | None:
        return None  # each daemon serves its own

    async def _fetch(self, daemon: WatchedDaemon) -> dict | None:
        assert self._session is not None
        try:
            async with self._session.get(daemon.page_url + "api/status") as reply:
                reply.raise_for_status()
                return await reply.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def status(self) -> dict[str, Any]:
        async with self._reply_lock:
            if self._reply is None or time.monotonic() - self._reply[0] > REPLY_KEPT_S:
                self._reply = (time.monotonic(), await self._merge())
            return self._reply[1]

    async def _merge(self) -> dict[str, Any]:
        replies = await asyncio.gather(*(self._fetch(d) for d in self.daemons))
        answered = {d.peer_id: r for d, r in zip(self.daemons, replies, strict=True) if r}
        members = []
        for daemon in self.daemons:
            reply = answered.get(daemon.peer_id)
            if reply is not None:
                self._last_rows[daemon.peer_id] = next(
                    row for row in reply["members"] if row["peer_id"] == daemon.peer_id)
                members.append(self._last_rows[daemon.peer_id])
            elif daemon.peer_id in self._last_rows:
                members.append({**self._last_rows[daemon.peer_id], "state": GONE})
        ahead = max(answered.values(), key=lambda reply: reply["round"], default=None)
        warnings = sorted(({**w, "source": f"{peer}: {w['source']}"}
                           for peer, reply in answered.items() for w in reply["warnings"]),
                          key=lambda w: w["time_unix"], reverse=True)[:WARNINGS_KEPT]
        facts = self.facts
        return {
            "kind": "cluster", "cluster": facts.cluster, "topology": facts.topology,
            "method": facts.method, "task": facts.task, "metric": facts.metric,
            "round": max((m["round"] for m in members), default=0),
            "last_round": facts.last_round, "now_unix": time.time(), "members": members,
            "edges": ahead["edges"] if ahead else [],
            "windows": ahead["windows"] if ahead else {"round": 0, "groups": []},
            "warnings": warnings, "series": [*(d.peer_id for d in self.daemons), ASSEMBLED],
            "pages": {d.peer_id: d.page_url for d in self.daemons},
        }

    async def rounds(self, peer_id: str | None, since: int) -> dict[str, Any]:
        series = peer_id or ASSEMBLED
        if series not in self.records:
            raise NotServed(f"no series {series!r} here; the series are "
                            f"{', '.join(self.records)}")
        return await self.server.off_loop(rounds_reply, self.records[series], series, since)
