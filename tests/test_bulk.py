"""The bulk listener with real sockets: slices arrive bit for bit over TLS with the members'
certificates, and strangers (no certificate, another CA's, a forged sender, garbage, idle or
oversized headers, corrupt or non-finite values, floods) are refused without harming it."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all

from peerd.cluster import free_ports
from peerd.net import PROTOCOL_VERSION, bulk
from peerd.net.bulk import (
    BULK_RPC,
    MAGIC,
    MAX_CONNECTIONS,
    MAX_FRAME_BYTES,
    BulkSender,
    BulkServer,
    BulkUnreachable,
)
from peerd.net.codec import DecodedStream, Expectation, WireError, encode_frames
from peerd.net.tls import TlsIdentity
from peerd.ops.ca import init_ca, issue
from peerd.v1 import peer_pb2

CLUSTER = "bulk-test"
FINGERPRINT = "bulk-fingerprint"
SERVER, SENDER = "peer-a", "peer-b"
SPEC = {"w": (torch.float32, (256, 1024)), "b": (torch.float32, (1024,))}


class _Host:
    """Expects exactly SPEC from any sender; keeps what it accepted."""

    def __init__(self) -> None:
        self.expectation = Expectation(PROTOCOL_VERSION, CLUSTER, FINGERPRINT,
                                       tensor_spec=lambda _header: SPEC)
        self.accepted: list[DecodedStream] = []

    def accept_slice(self, decoded: DecodedStream) -> None:
        self.accepted.append(decoded)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, (_, shape) in SPEC.items()}


def _header(sender: str = SENDER, receiver: str = SERVER) -> peer_pb2.StreamHeader:
    return peer_pb2.StreamHeader(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                                 model_fingerprint=FINGERPRINT, sender=sender, receiver=receiver,
                                 round=1, weight=1.0)


class _Served:
    """A BulkServer on its own event loop thread, as a daemon runs it."""

    def __init__(self, tls: TlsIdentity | None, **limits: float) -> None:
        self.host = _Host()
        self.loop = asyncio.new_event_loop()
        self.rejected: list[tuple[str, str]] = []  # what the metrics endpoint would count
        self.server = BulkServer(self.host, tls, self.loop,
                                 on_reject=lambda rpc, code: self.rejected.append((rpc, code)),
                                 **limits)
        self.port = self.server.start("127.0.0.1")
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def insecure() -> Iterator[_Served]:
    served = _Served(None, handshake_timeout_s=0.5, idle_timeout_s=0.5, max_connections=4)
    yield served
    served.close()


@pytest.fixture
def secure(cluster_ca: ClusterCa) -> Iterator[_Served]:
    served = _Served(cluster_ca.identity(SERVER), handshake_timeout_s=0.5, idle_timeout_s=0.5)
    yield served
    served.close()


def _push(sender: BulkSender, port: int, header: peer_pb2.StreamHeader | None = None,
          tensors: dict[str, torch.Tensor] | None = None) -> int:
    return asyncio.run(sender.push("127.0.0.1", port, header or _header(),
                                   tensors if tensors is not None else _tensors()))


def _assert_still_serves(served: _Served, sender: BulkSender) -> None:
    before = len(served.host.accepted)
    assert _push(sender, served.port) == 1024 * 1024 + 4096
    assert len(served.host.accepted) == before + 1
    for name, tensor in _tensors().items():
        assert torch.equal(served.host.accepted[-1].tensors[name], tensor)


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_member_pushes_over_mutual_tls_bit_for_bit(secure: _Served,
                                                     cluster_ca: ClusterCa) -> None:
    _assert_still_serves(secure, BulkSender(cluster_ca.identity(SENDER)))
    assert secure.host.accepted[-1].header.sender == SENDER


def test_a_member_cannot_push_in_another_members_name(secure: _Served,
                                                      cluster_ca: ClusterCa) -> None:
    sender = BulkSender(cluster_ca.identity(SENDER))
    with pytest.raises(WireError) as refused:
        _push(sender, secure.port, _header(sender="peer-c"))
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "names 'peer-b'" in refused.value.detail
    assert secure.host.accepted == []


def test_the_sender_refuses_a_server_holding_another_members_certificate(
        secure: _Served, cluster_ca: ClusterCa) -> None:
    with pytest.raises(WireError) as refused:
        _push(BulkSender(cluster_ca.identity(SENDER)), secure.port, _header(receiver="peer-c"))
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert secure.host.accepted == []


def test_strangers_without_a_cluster_certificate_are_refused(
        secure: _Served, cluster_ca: ClusterCa, tmp_path: Path) -> None:
    # Another CA's device certificate with a member's name.
    init_ca(tmp_path / "other-ca")
    issue(tmp_path / "other-ca", SENDER)
    with pytest.raises(WireError) as refused:
        _push(BulkSender(TlsIdentity.load(tmp_path / "other-ca" / SENDER)), secure.port)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    # TLS without a client certificate.
    context = ssl.create_default_context(cadata=cluster_ca.identity(SERVER).ca_pem.decode())
    context.check_hostname = False
    with (socket.create_connection(("127.0.0.1", secure.port), timeout=5) as raw,
          pytest.raises((ssl.SSLError, ConnectionError)), context.wrap_socket(raw) as wrapped):
        wrapped.sendall(MAGIC)
        assert wrapped.recv(1) == b""  # the server closes after the handshake
    # Plain bytes to the TLS port.
    with socket.create_connection(("127.0.0.1", secure.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _closed_by_server(raw)
    _wait_for(lambda: secure.server.counters.failed >= 3)
    assert secure.host.accepted == []
    _assert_still_serves(secure, BulkSender(cluster_ca.identity(SENDER)))


def _closed_by_server(connection: socket.socket) -> bool:
    """The server closed (or reset) the connection, after at most a TLS alert; False when it
    is still open at the socket's timeout."""
    answered = 0
    try:
        while chunk := connection.recv(100):
            answered += len(chunk)
            assert answered < 100, "more than a TLS alert came back"
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _reply(connection: socket.socket) -> tuple[int, str]:
    code, _, length = struct.unpack("<IQI", _read(connection, 16))
    return code, _read(connection, length).decode()


def _read(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = connection.recv(count - len(data))
        assert more, f"closed after {len(data)} of {count} bytes"
        data += more
    return data


def test_garbage_and_oversized_headers_are_answered_and_closed(insecure: _Served) -> None:
    with socket.create_connection(("127.0.0.1", insecure.port), timeout=5) as raw:
        raw.sendall(b"x" * len(MAGIC))
        assert _reply(raw) == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                               "not a peerd bulk stream (wrong preamble)")
    with socket.create_connection(("127.0.0.1", insecure.port), timeout=5) as raw:
        # A length far beyond MAX_FRAME_BYTES: refused before anything that size is read.
        raw.sendall(MAGIC + struct.pack("<I", 0xFFFFFFFF))
        code, detail = _reply(raw)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert f"1 to {MAX_FRAME_BYTES}" in detail
    with socket.create_connection(("127.0.0.1", insecure.port), timeout=5) as raw:
        raw.sendall(MAGIC + struct.pack("<I", 5) + b"\xff" * 5)
        assert _reply(raw)[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert insecure.host.accepted == []
    _assert_still_serves(insecure, BulkSender(None))
    assert insecure.rejected == [(BULK_RPC, "INVALID_ARGUMENT"), (BULK_RPC, "RESOURCE_EXHAUSTED"),
                                 (BULK_RPC, "INVALID_ARGUMENT")]


def test_a_header_off_the_plan_is_refused_before_any_tensor(insecure: _Served) -> None:
    wrong = _header()
    wrong.cluster = "another"
    with pytest.raises(WireError) as refused:
        _push(BulkSender(None), insecure.port, wrong)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(WireError) as refused:
        _push(BulkSender(None), insecure.port, tensors={"w": _tensors()["w"]})
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the plan expects 2" in refused.value.detail
    assert insecure.host.accepted == []
    assert insecure.rejected == [(BULK_RPC, "FAILED_PRECONDITION"), (BULK_RPC, "INVALID_ARGUMENT")]


def _send_raw_stream(port: int, tensors: dict[str, torch.Tensor], corrupt: bool = False,
                     cut_after: int | None = None) -> tuple[int, str] | None:
    """A bulk stream by hand: `corrupt` flips a byte after the CRC was taken, `cut_after`
    closes the connection after that many tensor bytes."""
    frames = list(encode_frames(_header(), tensors, 1 << 30))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        start = frames[0].SerializeToString()
        raw.sendall(MAGIC + struct.pack("<I", len(start)) + start)
        assert _reply(raw) == (0, "")
        sent = 0
        for frame in frames[1:]:
            if isinstance(frame, memoryview):
                data = bytearray(frame)
                if corrupt:
                    data[7] ^= 0x40
                if cut_after is not None:
                    raw.sendall(data[:cut_after - sent])
                    return None
                raw.sendall(data)
                sent += len(data)
            else:
                body = frame.SerializeToString()
                raw.sendall(struct.pack("<I", len(body)) + body)
        return _reply(raw)


def test_corrupt_non_finite_and_cut_streams_never_reach_the_host(insecure: _Served) -> None:
    code, detail = _send_raw_stream(insecure.port, _tensors(), corrupt=True)
    assert code == grpc.StatusCode.DATA_LOSS.value[0] and "CRC-32" in detail
    poisoned = _tensors()
    poisoned["b"][3] = float("nan")
    code, detail = _send_raw_stream(insecure.port, poisoned)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "non-finite" in detail
    failed = insecure.server.counters.failed
    assert _send_raw_stream(insecure.port, _tensors(), cut_after=1000) is None
    _wait_for(lambda: insecure.server.counters.failed == failed + 1)
    assert insecure.host.accepted == []
    _assert_still_serves(insecure, BulkSender(None))


def test_idle_connections_time_out_and_a_flood_is_capped(insecure: _Served) -> None:
    # Four idle connections fill the cap (4); the fifth is closed at once.
    idle = [socket.create_connection(("127.0.0.1", insecure.port), timeout=5) for _ in range(4)]
    _wait_for(lambda: insecure.server.counters.accepted == 4)
    with socket.create_connection(("127.0.0.1", insecure.port), timeout=5) as extra:
        assert _closed_by_server(extra)
    assert insecure.server.counters.refused == 1
    # The idle ones are closed after the handshake timeout (0.5 s here) ...
    for connection in idle:
        assert _closed_by_server(connection)  # within the 5 s socket timeout
        connection.close()
    # ... and the listener serves members again.
    _wait_for(lambda: insecure.server.counters.failed == 4)
    _assert_still_serves(insecure, BulkSender(None))


def test_a_daemons_bulk_listener_shrugs_off_strangers_while_rounds_run(
        tmp_path: Path, cluster_ca: ClusterCa) -> None:
    """Two daemons sending every slice over the bulk path; during their rounds, peer-00's bulk
    port gets a flood of idle connections beyond its cap, plain bytes, a TLS client without a
    certificate and a cluster device that is no member. Both run every round and exit 0."""
    # Enough rounds that the strangers (the flood alone waits out the 5 s handshake timeout)
    # arrive while they run on an idle machine too: 5 rounds had ended before on one.
    rounds = 16
    bulk_port = free_ports(1)[0]
    daemons = start_loopback_daemons(
        tmp_path, 2, ["--rounds", str(rounds), "--sync", "--bulk-threshold", "1",
                      "--slowdown", "3"], cluster_ca,
        extra_by_position={0: ["--bulk-port", str(bulk_port), "--metrics-port", "0"]})
    flood: list[socket.socket] = []
    try:
        daemons[0].wait_rounds(1)
        with socket.create_connection(("127.0.0.1", bulk_port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01garbage" * 100)
            assert _closed_by_server(raw)
        # A device of the cluster that is no member: in a member's name, then in its own.
        outsider = BulkSender(cluster_ca.identity("peer-99"))
        for claimed, code in (("peer-01", grpc.StatusCode.PERMISSION_DENIED),
                              ("peer-99", grpc.StatusCode.FAILED_PRECONDITION)):
            with pytest.raises(WireError) as refused:
                asyncio.run(outsider.push("127.0.0.1", bulk_port,
                                          _header(sender=claimed, receiver="peer-00"),
                                          _tensors()))
            assert refused.value.code == code, refused.value.detail
        # Counted where an operator looks, as gRPC's refusals are.
        metrics_url = re.search(r"metrics on (http://\S+)", daemons[0].output()).group(1)
        scraped = urllib.request.urlopen(metrics_url.replace("0.0.0.0", "127.0.0.1"),
                                         timeout=10).read().decode()
        for code in ("PERMISSION_DENIED", "FAILED_PRECONDITION"):
            assert (f'peerd_rejected_messages_total{{code="{code}",rpc="{BULK_RPC}"}} 1.0'
                    in scraped), scraped
        # Idle connections beyond the cap: the last ones are closed at once, the others after
        # the handshake timeout; meanwhile slices to peer-00 fall back to gRPC.
        flood = [socket.create_connection(("127.0.0.1", bulk_port), timeout=10)
                 for _ in range(MAX_CONNECTIONS + 8)]
        assert sum(_closed_by_server(connection) for connection in flood[-8:]) == 8
        assert sum(_closed_by_server(connection) for connection in flood) == len(flood)
        assert len(daemons[0].rounds()) < rounds, "the strangers came too late to matter"
        assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
    finally:
        for connection in flood:
            connection.close()
        kill_all(daemons)
    for daemon in daemons:
        assert [r["round"] for r in daemon.rounds()] == list(range(1, rounds + 1))
    assert "first bulk slice from peer-01" in daemons[0].output()
    assert "first bulk slice from peer-00" in daemons[1].output()


class _FailingHost(_Host):
    """A host whose hand-over fails with a fault of its own (not a refusal)."""

    def accept_slice(self, decoded: DecodedStream) -> None:
        raise RuntimeError("the inbox is gone")


def test_a_fault_on_the_receiver_is_answered_not_a_silent_close(insecure: _Served) -> None:
    """An exception other than a refusal in a connection thread answers UNKNOWN (as a gRPC
    handler's does, retried by the sender) instead of ending the thread without a word."""
    insecure.server.host = _FailingHost()
    with pytest.raises(WireError) as refused:
        _push(BulkSender(None), insecure.port)
    assert not isinstance(refused.value, BulkUnreachable)
    assert refused.value.code == grpc.StatusCode.UNKNOWN
    assert "RuntimeError on the receiver: the inbox is gone" in refused.value.detail
    assert insecure.server.counters.failed == 1
    insecure.server.host = insecure.host
    _assert_still_serves(insecure, BulkSender(None))


def test_a_header_check_the_busy_loop_never_ran_in_time_never_runs(
        insecure: _Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender is cut off when the loop cannot check its header in time; the check must
    not run later (it would take an inbox slot no stream ends, or accept a slice that is
    coming again by the fallback)."""
    checked: list[int] = []
    insecure.host.expectation = Expectation(
        PROTOCOL_VERSION, CLUSTER, FINGERPRINT,
        tensor_spec=lambda header: checked.append(header.round) or SPEC)
    monkeypatch.setattr(bulk, "LOOP_CALL_TIMEOUT_S", 0.2)
    insecure.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop busy elsewhere
    with pytest.raises(BulkUnreachable):
        _push(BulkSender(None), insecure.port)
    time.sleep(1.2)  # the loop is free again: nothing queued from that stream may run
    assert checked == []
    assert insecure.host.accepted == []
    _assert_still_serves(insecure, BulkSender(None))
    assert checked == [1]
