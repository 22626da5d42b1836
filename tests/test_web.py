"""The metrics port's HTTP server over a real socket: routes, read-only answers, the caps that
keep a flood from growing the process, and the parts the page is derived from."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from test_exporter import check, observed, samples
from test_exporter import record as exporter_record

from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.topology import load_topology
from peerd.models.base import UnitGroup
from peerd.v1 import peer_pb2
from peerd.web.daemon_page import rounds_reply
from peerd.web.facts import (
    GONE,
    LATE,
    TRAINING,
    WAITING,
    RecentWarnings,
    ViewChanges,
    Windows,
    describe_members,
    reply_members,
    stragglers,
    topology_edges,
    unit_runs,
)
from peerd.web.records import RecordsFile
from peerd.web.server import NotServed, WebServer


def record(round_number: int, **fields: Any) -> dict:
    return {"round": round_number, "peer_id": "peer-00", "train_loss": 1.0 / round_number,
            "bytes_sent_cum": 100 * round_number, **fields}


def write_records(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        for r in records:
            handle.write(json.dumps(r) + "\n")


class FixedSource:
    """A page source with set answers: what is tested here is the HTTP side around it."""

    def __init__(self, rounds_log: Path) -> None:
        self.exporter = observed()
        self.records = RecordsFile(rounds_log)

    async def status(self) -> dict[str, Any]:
        return {"peer_id": "peer-00", "loss": float("nan"), "round": 3}

    async def rounds(self, peer_id: str | None, since: int) -> dict[str, Any]:
        if peer_id not in (None, "peer-00"):
            raise NotServed(f"no series {peer_id}")
        return rounds_reply(self.records, "peer-00", since)

    def metrics(self) -> bytes | None:
        return self.exporter.render()


@pytest.fixture
async def served(tmp_path: Path):
    log = tmp_path / "rounds.jsonl"
    write_records(log, [record(1), record(2), record(3)])
    source = FixedSource(log)
    server = WebServer(source)
    port = await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        yield session, source
    await server.stop()


async def test_routes_answer_json_metrics_and_the_page(served) -> None:
    session, source = served
    async with session.get("/api/status") as reply:
        assert reply.status == 200
        assert reply.content_type == "application/json"
        # NaN is no JSON: it travels as null.
        assert json.loads(await reply.text()) == {"peer_id": "peer-00", "loss": None, "round": 3}
    async with session.get("/api/rounds", params={"since": "1"}) as reply:
        body = await reply.json()
    assert [r["round"] for r in body["records"]] == [2, 3]
    assert body["last_round"] == 3
    async with session.get("/metrics") as reply:
        assert reply.status == 200
        check(samples(await reply.text()))
    source.exporter.observe_round(exporter_record(4, 5000, 3100, 0.1))
    async with session.get("/metrics") as reply:
        after = samples(await reply.text())
    assert after[("peerd_rounds_total", frozenset())] == 4.0
    assert after[("peerd_bytes_sent_total", frozenset())] == 5000.0
    for path, kind in (("/", "text/html"), ("/page.js", "text/javascript"),
                       ("/page.css", "text/css")):
        async with session.get(path) as reply:
            assert reply.status == 200 and reply.content_type == kind
    async with session.head("/api/status") as reply:
        assert reply.status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405_and_change_nothing(served, method: str) -> None:
    session, _ = served
    for path in ("/", "/api/status", "/api/rounds", "/metrics"):
        async with session.request(method, path, data=b"x" * 100_000) as reply:
            assert reply.status == 405, (method, path)
            assert "GET" in reply.headers["Allow"]
    async with session.get("/api/rounds") as reply:
        assert [r["round"] for r in (await reply.json())["records"]] == [1, 2, 3]


async def test_unknown_paths_404_and_bad_queries_400(served) -> None:
    session, _ = served
    for path in ("/nope", "/api", "/api/status/x", "/../etc/passwd", "/static/page.js"):
        async with session.get(path) as reply:
            assert reply.status == 404, path
    async with session.get("/api/rounds", params={"peer": "peer-09"}) as reply:
        assert reply.status == 404 and "peer-09" in await reply.text()
    for since in ("x", "-1", "1.5"):
        async with session.get("/api/rounds", params={"since": since}) as reply:
            assert reply.status == 400 and "since" in await reply.text()


async def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Does the server close this connection (we never send a byte) within the time?"""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1),
                                      timeout_s) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_connections_beyond_the_cap_are_closed_and_idle_ones_time_out(
        tmp_path: Path) -> None:
    server = WebServer(FixedSource(tmp_path / "rounds.jsonl"), max_connections=8,
                       idle_timeout_s=2.0)
    port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    idle = []
    started = time.monotonic()
    for _ in range(server.max_connections + 6):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        idle.append(sock)
        await asyncio.sleep(0.01)  # accepted one by one: the cap holds exactly
    # Within the idle timeout only those beyond the cap are closed.
    closed = await asyncio.gather(*(closed_within(sock, 0.3) for sock in idle))
    assert time.monotonic() - started < server.idle_timeout_s
    assert closed == [False] * server.max_connections + [True] * 6
    assert server.refused == 6
    # The others are closed by the server once idle for its timeout.
    waiting = idle[:server.max_connections]
    assert all(await asyncio.gather(*(closed_within(sock, 5.0) for sock in waiting)))
    assert time.monotonic() - started >= server.idle_timeout_s
    for sock in idle:
        sock.close()
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/api/status") as reply:
            assert reply.status == 200
    finally:
        await server.stop()


async def test_stop_frees_the_port_and_start_twice_is_refused(tmp_path: Path) -> None:
    server = WebServer(FixedSource(tmp_path / "rounds.jsonl"))
    port = await server.start("127.0.0.1", 0)
    with pytest.raises(RuntimeError, match="already started"):
        await server.start("127.0.0.1", 0)
    await server.stop()
    await server.stop()  # a second stop is harmless
    successor = WebServer(FixedSource(tmp_path / "rounds.jsonl"))
    assert await successor.start("127.0.0.1", port) == port
    await successor.stop()


def test_page_loads_nothing_from_elsewhere() -> None:
    static = resources.files("peerd.web") / "static"
    for name in ("index.html", "page.js", "page.css"):
        text = (static / name).read_text()
        # The only absolute URL is SVG's namespace name, which is never fetched.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "@import" not in text and "url(" not in text
    html = (static / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["page.css", "data:,", "page.js"]


# ---- the records file -----------------------------------------------------------------------

def test_records_file_follows_appends_partial_lines_and_rewinds(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    records = RecordsFile(path, kept=4)
    assert records.after(0) == [] and records.last_round() == 0
    write_records(path, [record(1), record(2)])
    with open(path, "a") as handle:
        handle.write('{"round": 3, "train_lo')  # being written
    assert [r["round"] for r in records.after(0)] == [1, 2]
    with open(path, "a") as handle:
        handle.write('ss": 0.5}\n')
    assert [r["round"] for r in records.after(1)] == [2, 3]
    write_records(path, [record(r) for r in range(4, 9)])
    # More than kept: older rounds come from the file itself.
    assert [r["round"] for r in records.after(0)] == list(range(1, 9))
    assert [r["round"] for r in records.after(6)] == [7, 8]
    assert len(records.recent) == 4
    # A rewind rewrites the file (atomically: another inode) back to round 2.
    rewound = tmp_path / "new"
    write_records(rewound, [record(1), record(2, train_loss=9.0)])
    rewound.replace(path)
    assert [(r["round"], r["train_loss"]) for r in records.after(0)] == [(1, 1.0), (2, 9.0)]
    assert records.last_round() == 2
    # Rounds run again appended in place replace the earlier ones.
    write_records(path, [record(2, train_loss=7.0)])
    assert [(r["round"], r["train_loss"]) for r in records.after(0)] == [(1, 1.0), (2, 7.0)]
    path.unlink()
    assert records.after(0) == []


# ---- facts ----------------------------------------------------------------------------------

def status_reply(now: float) -> peer_pb2.StatusReply:
    me = peer_pb2.Hello(peer_id="b", address="h:2", round=10, members=["a", "b", "c", "d"],
                        view_id="v1", capacity=peer_pb2.Capacity(mu=0.5))
    peers = [
        peer_pb2.PeerStatus(peer_id="a", position=0, round=10, last_seen_unix=now - 0.4,
                            capacity=peer_pb2.Capacity(mu=0.25)),
        peer_pb2.PeerStatus(peer_id="c", position=2, round=8, last_seen_unix=now - 0.3,
                            capacity=peer_pb2.Capacity(mu=0.5)),
        peer_pb2.PeerStatus(peer_id="d", position=3, round=10, last_seen_unix=now - 12,
                            capacity=peer_pb2.Capacity(mu=0.5)),
        peer_pb2.PeerStatus(peer_id="e", position=-1, round=3, last_seen_unix=now - 0.2,
                            capacity=peer_pb2.Capacity(mu=0.5)),
    ]
    return peer_pb2.StatusReply(self=me, peers=peers, bytes_sent=5, bytes_received=7)


def test_member_states_and_stragglers() -> None:
    now = 1000.0
    facts = reply_members(status_reply(now), now)
    assert [f.peer_id for f in facts] == ["a", "b", "c", "d", "e"]
    rows = {row["peer_id"]: row for row in describe_members(
        facts, committed=True, now=now, dead_after_s=10.0, last_round=None,
        merged_without={"a"})}
    assert {p: r["state"] for p, r in rows.items()} == {
        "a": TRAINING, "b": TRAINING, "c": LATE, "d": GONE, "e": GONE}
    assert {p for p, r in rows.items() if r["straggler"]} == {"a", "c"}
    assert (rows["b"]["bytes_sent"], rows["b"]["bytes_received"]) == (5, 7)
    waiting = describe_members(facts, committed=False, now=now, dead_after_s=10.0,
                               last_round=None, merged_without=set())
    assert {row["state"] for row in waiting} == {WAITING}
    done = describe_members(facts, committed=True, now=now, dead_after_s=10.0, last_round=10,
                            merged_without=set())
    assert {r["peer_id"]: r["state"] for r in done}["b"] == WAITING
    assert stragglers([{"merged_without": ["x"]}, {"merged_without": []},
                       {"merged_without": ["x", "y"]}]) == {"x"}


def test_windows_match_the_planner_and_count_coverage() -> None:
    groups = {"hidden": UnitGroup("hidden", 12), "heads": UnitGroup("heads", 4)}
    members = [Member("a", 0.5), Member("b", 0.25), Member("c", 0.5)]
    planner = make_planner("msfusion", 3)
    windows = Windows(planner, groups)
    shown = windows.describe(members, 5)
    plans = planner.plan(5, members, groups)
    for group in shown["groups"]:
        assert [w["peer_id"] for w in group["windows"]] == ["a", "b", "c"]
        for window in group["windows"]:
            units = sorted(u for start, length in window["runs"]
                           for u in range(start, start + length))
            expected = sorted(u % group["units"] for u in plans[window["peer_id"]][
                group["name"]].tolist())
            assert units == expected and window["width"] == len(expected)
        assert sum(group["held_rounds"]) == sum(w["width"] for w in group["windows"])
    assert windows.describe(members, 6)["counted_through"] == 7
    assert windows.describe([], 6)["groups"] == []
    assert sum(windows.held["hidden"]) == 2 * (6 + 3 + 6)
    assert unit_runs(np.array([0, 1, 2, 7, 9, 10])) == [[0, 3], [7, 1], [9, 2]]
    assert topology_edges(load_topology("ring"), ["a", "b", "c", "d"]) == [
        ["a", "b"], ["a", "d"], ["b", "c"], ["c", "d"]]


def test_view_changes_and_warnings_are_noted_and_bounded() -> None:
    changes = ViewChanges()
    assert changes.notes(["a", "b", "c"], 1) == []
    assert changes.notes(["a", "c", "d"], 4) == ["b dropped from the view (round 4)",
                                                 "d joined the view (round 4)"]
    warnings = RecentWarnings(kept=3)
    for index in range(5):
        warnings.note(f"note {index}", "view")
    assert [w["message"] for w in warnings.latest()] == ["note 4", "note 3", "note 2"]
