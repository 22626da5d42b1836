"""Daemons against the LAN, as real processes on real sockets: a daemon owns its port, idle
connections cannot exhaust its descriptors, and a daemon that already finished exits at once."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from daemons import ClusterCa, RunningDaemon, kill_all, start_loopback_daemons, wait_all

from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.limits import HANDSHAKE_TIMEOUT_S, RESERVED_DESCRIPTORS
from peerd.net.tls import TlsIdentity
from peerd.v1 import peer_pb2

# Scaled down from the 1,100 connections against a soft limit of 1024 (the full figure
# is in RELIABILITY.md): more idle connections than the daemon has descriptors.
DESCRIPTOR_LIMIT = 256
IDLE_CONNECTIONS = 300
FLOOD_ROUNDS = 12
RESTART_ROUNDS = 24
DEAD_AFTER_S = 3.0


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


def test_idle_connections_and_failing_checkpoints_stop_no_round(
        tmp_path: Path, cluster_ca: ClusterCa) -> None:
    # Slowed training keeps the run longer than the flood on an idle machine as on a busy one.
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", str(FLOOD_ROUNDS),
                                                   "--slowdown", "4"], cluster_ca,
                                     descriptor_limit_by_position={0: DESCRIPTOR_LIMIT})
    flood: list[socket.socket] = []
    try:
        daemons[0].wait_rounds(1)
        # Meanwhile the other daemon's checkpoint folder becomes a file: every later
        # checkpoint write there fails with an OSError.
        checkpoints = daemons[1].state_dir / "checkpoints"
        checkpoints.rename(daemons[1].state_dir / "checkpoints.moved")
        checkpoints.write_text("not a folder")
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
    # A checkpoint that cannot be written is a warning, and the next round tries again.
    failed = [r["round"] for r in daemons[1].rounds() if r["checkpoint_s"] is None]
    assert failed and failed[-1] == FLOOD_ROUNDS
    assert daemons[1].output().count("failed, retried after the next round") == len(failed)


def test_a_served_port_is_owned_and_a_finished_run_is_not_served_again(tmp_path: Path) -> None:
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
    # Started again on its state dir, whose checkpoint holds the run's last round.
    started = time.monotonic()
    again = subprocess.run(daemons[0].process.args, capture_output=True, text=True,
                           timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert "already holds round 1 of 1: nothing left to do" in again.stderr
    assert "serving on" not in again.stderr
    assert time.monotonic() - started < 60
    assert len(daemons[0].rounds()) == 1


def longest_wait_between_rounds(daemon: RunningDaemon) -> float:
    """Seconds between two consecutive rounds of one uninterrupted run (its rounds.jsonl)."""
    times = [record["wall_s"] for record in daemon.rounds()]
    return max(b - a for a, b in itertools.pairwise(times))


async def forged_join(address: str, identity: TlsIdentity, rounds_ahead: int
                      ) -> tuple[grpc.StatusCode, str]:
    """A Hello from `identity` (a valid certificate, not a member) asking to join
    `rounds_ahead` rounds past the daemon's current round."""
    clients = PeerClients(identity)
    try:
        status = await clients.status(address)
        hello = peer_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, cluster=status.self.cluster,
            peer_id=identity.name, model_fingerprint=status.self.model_fingerprint,
            capacity=peer_pb2.Capacity(mu=0.5), address="127.0.0.1:9",
            join_round=status.self.round + rounds_ahead)
        await clients.stub(address, status.self.peer_id).Handshake(hello, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    finally:
        await clients.close()
    return grpc.StatusCode.OK, ""


@pytest.mark.slow  # about 100 s on 2 shared cores: test_control_fuzz.py covers it in CI
def test_sigterm_and_restart_of_one_of_three_costs_seconds(tmp_path: Path,
                                                           cluster_ca: ClusterCa) -> None:
    daemons = start_loopback_daemons(
        tmp_path, 3, ["--rounds", str(RESTART_ROUNDS), "--dead-after", str(DEAD_AFTER_S)],
        cluster_ca)
    survivors, restarted = daemons[:2], daemons[2]
    try:
        restarted.wait_rounds(4)
        # A valid certificate of a non-member asks to join far in the future: refused, and no
        # member holds a round for it.
        for rounds_ahead in (100_000, 1 << 62):
            code, details = asyncio.run(forged_join(survivors[0].address,
                                                    cluster_ca.identity("intruder"), rounds_ahead))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "Hello.join_round" in details
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(timeout=30) == 0
        survivors[0].wait_rounds(len(survivors[0].rounds()) + 2)
        with open(restarted.state_dir / "out.log", "a") as log:
            restarted.process = subprocess.Popen(restarted.process.args, stdout=log,
                                                 stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
        assert wait_all(daemons, timeout_s=300) == [0, 0, 0], [d.output() for d in daemons]
    finally:
        kill_all(daemons)
    for survivor in survivors:
        assert len(survivor.rounds()) == RESTART_ROUNDS
        assert longest_wait_between_rounds(survivor) < 3 * DEAD_AFTER_S
        assert "says goodbye" in survivor.output()
    assert "joining view" in restarted.output()
    assert restarted.rounds()[-1]["round"] == RESTART_ROUNDS
