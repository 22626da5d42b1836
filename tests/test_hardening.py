"""Daemons against the LAN, as real processes on real sockets: a daemon owns its port, idle
connections cannot exhaust its descriptors, and a daemon that already finished exits at once."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all

from peerd.net.limits import HANDSHAKE_TIMEOUT_S, RESERVED_DESCRIPTORS

# Scaled down from the 1,100 connections against a soft limit of 1024 (the full figure
# is in RELIABILITY.md): more idle connections than the daemon has descriptors.
DESCRIPTOR_LIMIT = 256
IDLE_CONNECTIONS = 300
FLOOD_ROUNDS = 12


def open_idle_connections(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        connection = socket.create_connection((host, int(port)), timeout=5)
        connection.setblocking(False)
        sockets.append(connection)
    return sockets


def closed_by_server(sockets: list[socket.socket]) -> int:
    closed = 0
    for connection in sockets:
        try:
            if connection.recv(4096) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def test_idle_connections_beyond_the_descriptor_limit_stop_no_round(
        tmp_path: Path, cluster_ca: ClusterCa) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", str(FLOOD_ROUNDS)], cluster_ca,
                                     descriptor_limit_by_position={0: DESCRIPTOR_LIMIT})
    flood: list[socket.socket] = []
    try:
        daemons[0].wait_rounds(1)
        flood = open_idle_connections(daemons[0].address, IDLE_CONNECTIONS)
        # Beyond the cap the server closes a connection at once; the rest when their TLS
        # handshake has stalled for HANDSHAKE_TIMEOUT_S.
        time.sleep(1.0)
        refused_at_once = closed_by_server(flood)
        cap = DESCRIPTOR_LIMIT - RESERVED_DESCRIPTORS
        assert refused_at_once >= IDLE_CONNECTIONS - cap
        time.sleep(HANDSHAKE_TIMEOUT_S + 2.0)
        assert closed_by_server(flood) == IDLE_CONNECTIONS
        assert len(daemons[0].rounds()) < FLOOD_ROUNDS, "the flood came too late to matter"
        assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
    finally:
        for connection in flood:
            connection.close()
        kill_all(daemons)
    for daemon in daemons:
        assert [r["round"] for r in daemon.rounds()] == list(range(1, FLOOD_ROUNDS + 1))
    assert f"serving at most {cap} connections at once" in daemons[0].output()
    assert "Too many open files" not in daemons[0].output()


def test_a_second_daemon_on_a_served_port_exits_naming_it(tmp_path: Path) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", "1", "--linger", "60"], None)
    try:
        daemons[0].wait_rounds(1)
        port = daemons[0].address.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "peerd.cli", "start", "--insecure", "--host", "127.0.0.1",
             "--port", port, "--state-dir", str(tmp_path / "second"), "--threads", "1",
             "--rounds", "1"],
            capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 2, second.stderr
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in second.stderr
        # It stopped before serving or announcing anything.
        assert "serving on" not in second.stderr
        assert daemons[0].process.poll() is None
    finally:
        kill_all(daemons)


def test_a_daemon_restarted_after_its_last_round_exits_at_once(tmp_path: Path) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", "1"], None)
    try:
        assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
    finally:
        kill_all(daemons)
    started = time.monotonic()
    again = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "start", "--insecure", "--no-mdns", "--host",
         "127.0.0.1", "--port", "0", "--peer-id", daemons[0].peer_id, "--state-dir",
         str(daemons[0].state_dir), "--shard", "0/2", "--min-peers", "2", "--threads", "1",
         "--rounds", "1"],
        capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert "already holds round 1 of 1: nothing left to do" in again.stderr
    assert time.monotonic() - started < 60
    assert len(daemons[0].rounds()) == 1
