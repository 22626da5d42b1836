"""The systemd integration: the unit passes systemd-analyze, and the daemon speaks the notify
protocol (READY, WATCHDOG, STATUS, STOPPING) to a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from daemons import ClusterCa

from peerd.config import DaemonConfig, read_environment
from peerd.net.tls import TARGET_NAME_OPTION
from peerd.ops.ca import DEVICE_FILES
from peerd.ops.systemd import Notifier, watchdog_loop
from peerd.v1 import peer_pb2, peer_pb2_grpc

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "peerd.service"
INSTALLED_PEERD = "/opt/peerd/venv/bin/peerd"
MAX_EXPOSURE = 2.5
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=60, check=False)


@needs_systemd_analyze
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: a copy of the unit runs this
    # environment's peerd instead of the one install.sh puts in /opt, so the check is about
    # the unit, not this machine.
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PEERD} " in text
    unit = tmp_path / "peerd.service"
    unit.write_text(text.replace(INSTALLED_PEERD, str(Path(sys.executable).with_name("peerd"))))
    result = analyze("verify", str(unit))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)


@needs_systemd_analyze
def test_unit_exposure_is_low() -> None:
    result = analyze("security", "--offline=yes", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for peerd\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_hands_the_tls_files_to_the_daemon_as_credentials() -> None:
    # DynamicUser cannot read root's /etc/peerd/tls: systemd copies each file into the
    # service's credentials directory under the name the daemon looks for.
    lines = UNIT.read_text().splitlines()
    assert [line for line in lines if line.startswith("LoadCredential=")] == [
        f"LoadCredential={name}:/etc/peerd/tls/{name}" for name in DEVICE_FILES]
    (start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert start.endswith(" --tls-dir ${CREDENTIALS_DIRECTORY}")


def test_example_environment_file_sets_only_known_options() -> None:
    # Uncommented, every example line must pass the config layer: an unknown PEERD_* variable
    # would stop the service.
    lines = (UNIT.parent / "peerd.env").read_text().splitlines()
    example = dict(line[1:].split("=", 1) for line in lines if line.startswith("#PEERD_"))
    assert len(example) >= 10
    assert set(read_environment(example)) == {k.removeprefix("PEERD_").lower() for k in example}
    DaemonConfig(**read_environment(example))


# ---- the notify protocol ----------------------------------------------------------------------

def bound_receiver(address: str) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + address[1:] if address.startswith("@") else address)
    receiver.settimeout(10)
    return receiver


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        tuple[socket.socket, str]]:
    """A datagram socket standing in for the service manager, and its NOTIFY_SOCKET value."""
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@peerd-test-{uuid.uuid4().hex}"
    receiver = bound_receiver(address)
    yield receiver, address
    receiver.close()


def pending(receiver: socket.socket) -> list[bytes]:
    """The datagrams already queued, without waiting for more."""
    datagrams = []
    receiver.setblocking(False)
    try:
        while True:
            datagrams.append(receiver.recv(4096))
    except BlockingIOError:
        return datagrams
    finally:
        receiver.settimeout(10)


def test_notifier_sends_each_message_as_one_datagram(
    notify_socket: tuple[socket.socket, str],
) -> None:
    receiver, address = notify_socket
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
    notifier.ready("serving on 10.0.0.1:7470")
    notifier.watchdog()
    notifier.status("round 1 done")
    notifier.stopping()
    notifier.stopping()  # a signal and the `finally` both stop: the manager hears it once
    notifier.close()
    assert pending(receiver) == [b"READY=1\nSTATUS=serving on 10.0.0.1:7470", b"WATCHDOG=1",
                                 b"STATUS=round 1 done", b"STOPPING=1"]


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s() is None
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()


def test_a_failed_send_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="peerd.ops.systemd"):
        notifier.ready("x")
        notifier.watchdog()
    levels = [r.levelno for r in caplog.records if r.name == "peerd.ops.systemd"]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(base).watchdog_interval_s() == 15.0
    mine = {**base, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(mine).watchdog_interval_s() == 15.0
    # The variables were meant for a parent that exec'd us without clearing them.
    other = {**base, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(other).watchdog_interval_s() is None
    assert Notifier.from_environment({**base, "WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


async def test_watchdog_loop_pings_until_cancelled(
    notify_socket: tuple[socket.socket, str],
) -> None:
    receiver, address = notify_socket
    task = asyncio.create_task(watchdog_loop(Notifier(address), 0.05))
    await asyncio.sleep(0.22)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = pending(receiver)
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}, pings
    await asyncio.sleep(0.1)
    assert pending(receiver) == []


# ---- a real daemon under a stand-in service manager ---------------------------------------------

def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path,
                                                     cluster_ca: ClusterCa) -> None:
    receiver = bound_receiver(str(tmp_path / "notify"))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PEERD_")}
    environment.update(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000")
    environment.pop("WATCHDOG_PID", None)
    # --linger keeps the daemon up for two watchdog periods after its rounds, however fast.
    command = [sys.executable, "-m", "peerd.cli", "start", "--no-mdns", "--min-peers", "1",
               "--rounds", "2", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
               "--state-dir", str(tmp_path / "state"), "--linger", "1",
               *cluster_ca.flags("peer-00")]
    with open(tmp_path / "out.log", "w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    datagrams: list[bytes] = []
    receiver.settimeout(1)
    try:
        deadline = time.monotonic() + 45
        while b"STOPPING=1" not in datagrams and time.monotonic() < deadline:
            try:
                datagram = receiver.recv(4096)
            except TimeoutError:
                if process.poll() is not None:
                    break  # it died early: the assertions below show how
                continue
            datagrams.append(datagram)
            if datagram.startswith(b"READY=1\n"):
                # READY promises that peers can reach the daemon: ask it at once.
                address = re.search(rb"serving on (\S+),", datagram)
                assert address is not None, datagram
                client = cluster_ca.identity("admin")
                with grpc.secure_channel(address.group(1).decode(),
                                         client.channel_credentials(),
                                         options=[(TARGET_NAME_OPTION, "peer-00")]) as channel:
                    reply = peer_pb2_grpc.PeerStub(channel).Status(peer_pb2.StatusRequest(),
                                                                   timeout=5)
                assert reply.self.peer_id
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        receiver.close()
    output = (tmp_path / "out.log").read_text(errors="replace")
    assert code == 0, output
    assert datagrams[0].startswith(b"READY=1\nSTATUS="), datagrams
    assert datagrams.count(b"WATCHDOG=1") >= 2, datagrams
    assert b"STATUS=round 2 done" in b"\n".join(datagrams), datagrams
    assert datagrams[-1] == b"STOPPING=1" and datagrams.count(b"STOPPING=1") == 1, datagrams
