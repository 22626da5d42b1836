"""Cluster identity by mutual TLS, over real gRPC with real certificates: only certificates of
the cluster CA get in, a certificate speaks only for its own peer id, the client reaches only
the peer it means, `peerd ca` writes files that fit together, and daemons train over mTLS."""

from __future__ import annotations

import asyncio
import logging
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all

from peerd.cli import main
from peerd.config import DaemonConfig
from peerd.daemon import own_peer_id
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import DecodedStream, Expectation, WireError, encode_frames_off_loop
from peerd.net.rpc import add_peer_service
from peerd.net.service import PeerService
from peerd.net.tls import TARGET_NAME_OPTION, TlsError, TlsIdentity, probe_peer_name
from peerd.ops.ca import (
    CA_CERT,
    CA_KEY,
    DEVICE_CERT,
    DEVICE_KEY,
    OBSERVER_ROLE,
    READER_ROLE,
    init_ca,
    issue,
)
from peerd.v1 import peer_pb2, peer_pb2_grpc

CLUSTER = "tls-test"
FINGERPRINT = "f" * 16
RECEIVER = "receiver"
MEMBER = "peer-a"
SPEC = {"w": (torch.float32, (8,))}
Outcomes = dict[str, tuple[grpc.StatusCode, str]]


@dataclass
class MergingHost:
    """A PeerHost that merges every slice it accepts into its parameters at once: any push
    that gets through shows in `params`, any handshake in `admitted`."""

    name: str
    expectation: Expectation = field(init=False)
    params: dict[str, torch.Tensor] = field(
        default_factory=lambda: {"w": torch.linspace(-1, 1, 8)})
    admitted: list[str] = field(default_factory=list)
    introduces_itself_as: str | None = None

    def __post_init__(self) -> None:
        self.expectation = Expectation(PROTOCOL_VERSION, CLUSTER, FINGERPRINT, lambda _: SPEC)

    def hello(self) -> peer_pb2.Hello:
        # A view with MEMBER: members pull parameters, other devices may not.
        return peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                              peer_id=self.introduces_itself_as or self.name,
                              model_fingerprint=FINGERPRINT, view_id="0" * 16,
                              members=sorted([MEMBER, self.name]))

    def admit(self, hello: peer_pb2.Hello) -> None:
        self.admitted.append(hello.peer_id)

    def accept_slice(self, decoded: DecodedStream) -> None:
        self.params["w"] += decoded.tensors["w"]

    def snapshot(self, request: peer_pb2.PullRequest) -> tuple[peer_pb2.StreamHeader, dict]:
        header = peer_pb2.StreamHeader(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                                       model_fingerprint=FINGERPRINT, sender=self.name,
                                       receiver=request.requester, weight=1.0)
        return header, {"w": self.params["w"].clone()}

    def status(self) -> peer_pb2.StatusReply:
        return peer_pb2.StatusReply(self=self.hello())


@dataclass
class Served:
    address: str
    host: MergingHost
    rejected: list[tuple[str, str]]


async def serve(host: MergingHost, tls: TlsIdentity | None) -> tuple[grpc.aio.Server, Served]:
    server = grpc.aio.server()
    rejected: list[tuple[str, str]] = []
    service = PeerService(host, lambda rpc, code: rejected.append((rpc, code)))
    add_peer_service(server, service)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    return server, Served(f"127.0.0.1:{port}", host, rejected)


@pytest.fixture
async def receiver(cluster_ca: ClusterCa) -> AsyncIterator[Served]:
    """A service with the cluster certificate of RECEIVER."""
    server, served = await serve(MergingHost(RECEIVER), cluster_ca.identity(RECEIVER))
    yield served
    await server.stop(0)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCa:
    """Another cluster's CA: its certificates may carry the very same peer ids."""
    return ClusterCa(init_ca(tmp_path_factory.mktemp("foreign-ca")))


def tls_channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials, options=[(TARGET_NAME_OPTION, RECEIVER)])


async def try_every_claim(stub: peer_pb2_grpc.PeerStub, claimed: str) -> Outcomes:
    """Handshake, push and pull, each claiming to come from `claimed`: the outcome of each."""
    hello = peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER, peer_id=claimed,
                           model_fingerprint=FINGERPRINT, capacity=peer_pb2.Capacity(mu=0.5))
    header = peer_pb2.StreamHeader(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                                   model_fingerprint=FINGERPRINT, sender=claimed,
                                   receiver=RECEIVER, round=1, weight=1.0)
    pull = peer_pb2.PullRequest(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                                model_fingerprint=FINGERPRINT, requester=claimed)

    async def pull_all() -> None:
        async for _ in stub.Pull(pull, timeout=5):
            pass

    calls = {
        "Handshake": lambda: stub.Handshake(hello, timeout=5),
        "PushSlices": lambda: stub.PushSlices(
            encode_frames_off_loop(header, {"w": torch.full((8,), 100.0)}), timeout=5),
        "Pull": pull_all,
    }
    outcomes: Outcomes = {}
    for rpc, call in calls.items():
        try:
            await call()
            outcomes[rpc] = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as error:
            outcomes[rpc] = (error.code(), error.details() or "")
    return outcomes


async def claims_over(channel: grpc.aio.Channel, claimed: str) -> Outcomes:
    try:
        return await try_every_claim(peer_pb2_grpc.PeerStub(channel), claimed)
    finally:
        await channel.close()


async def member_claims(ca: ClusterCa, served: Served, member: str, claimed: str) -> Outcomes:
    """`member`, with its cluster certificate, claiming to be `claimed`."""
    clients = PeerClients(ca.identity(member))
    try:
        return await try_every_claim(clients.stub(served.address, RECEIVER), claimed)
    finally:
        await clients.close()


def assert_untouched(served: Served, before: torch.Tensor) -> None:
    assert torch.equal(served.host.params["w"], before)  # bit for bit: nothing was merged
    assert served.host.admitted == []


# ---- who gets in --------------------------------------------------------------------------------

async def test_a_member_speaking_for_itself_gets_through(receiver: Served,
                                                         cluster_ca: ClusterCa) -> None:
    # The control for the refusals below: the same calls with a matching name succeed, and
    # the push visibly changes the model.
    before = receiver.host.params["w"].clone()
    outcomes = await member_claims(cluster_ca, receiver, "peer-a", "peer-a")
    assert {rpc: code for rpc, (code, _) in outcomes.items()} == dict.fromkeys(
        ("Handshake", "PushSlices", "Pull"), grpc.StatusCode.OK)
    assert receiver.host.admitted == ["peer-a"]
    assert torch.equal(receiver.host.params["w"], before + 100.0)
    assert receiver.rejected == []


async def test_a_certificate_of_another_ca_gets_nowhere(
    receiver: Served, cluster_ca: ClusterCa, foreign_ca: ClusterCa
) -> None:
    before = receiver.host.params["w"].clone()
    stranger = foreign_ca.identity("peer-a")
    # Trusting only its own CA, it refuses the server; trusting ours (ca.crt is public), the
    # server refuses its certificate. Either way no call reaches the service.
    for trusted in (stranger.ca_pem, cluster_ca.identity(RECEIVER).ca_pem):
        outcomes = await claims_over(tls_channel(receiver.address, grpc.ssl_channel_credentials(
            trusted, stranger.key_pem, stranger.cert_pem)), "peer-a")
        assert {code for code, _ in outcomes.values()} == {grpc.StatusCode.UNAVAILABLE}, outcomes
        if trusted == stranger.ca_pem:  # the client itself saw the server's chain fail
            assert "CERTIFICATE_VERIFY_FAILED" in outcomes["Handshake"][1], outcomes
    assert_untouched(receiver, before)
    assert receiver.rejected == []  # refused by TLS, before any call existed


async def test_a_client_without_certificate_or_without_tls_is_refused(
    receiver: Served, cluster_ca: ClusterCa
) -> None:
    before = receiver.host.params["w"].clone()
    ca_only = tls_channel(receiver.address,
                          grpc.ssl_channel_credentials(cluster_ca.identity(RECEIVER).ca_pem))
    plain = grpc.aio.insecure_channel(receiver.address)
    for channel in (ca_only, plain):
        outcomes = await claims_over(channel, "peer-a")
        assert {code for code, _ in outcomes.values()} == {grpc.StatusCode.UNAVAILABLE}, outcomes
    assert_untouched(receiver, before)


async def test_a_member_cannot_speak_for_another(receiver: Served, cluster_ca: ClusterCa,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    before = receiver.host.params["w"].clone()
    with caplog.at_level(logging.WARNING, logger="peerd.service"):
        outcomes = await member_claims(cluster_ca, receiver, "peer-b", "peer-a")
    # Three refusals from one host: each counted, one logged (at most one per interval).
    assert len([r for r in caplog.records if r.name == "peerd.service"]) == 1
    for rpc, (code, details) in outcomes.items():
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        assert "'peer-b'" in details and "'peer-a'" in details, details
    assert sorted(receiver.rejected) == sorted(
        (rpc, "PERMISSION_DENIED") for rpc in ("Handshake", "PushSlices", "Pull"))
    assert_untouched(receiver, before)


async def test_insecure_service_and_client_still_talk() -> None:
    server, served = await serve(MergingHost(RECEIVER), None)
    clients = PeerClients()
    try:
        outcomes = await try_every_claim(clients.stub(served.address), "anyone")
    finally:
        await clients.close()
        await server.stop(0)
    assert {code for code, _ in outcomes.values()} == {grpc.StatusCode.OK}, outcomes
    assert served.host.admitted == ["anyone"]


# ---- whom the client reaches --------------------------------------------------------------------

async def test_the_client_reaches_only_the_peer_it_names(receiver: Served,
                                                         cluster_ca: ClusterCa) -> None:
    member = cluster_ca.identity("peer-a")
    assert await probe_peer_name(receiver.address, member, 5.0) == RECEIVER
    hello = peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster=CLUSTER,
                           peer_id="peer-a", model_fingerprint=FINGERPRINT)
    clients = PeerClients(member)
    try:
        # A bootstrap address: the name comes from the server's certificate.
        assert (await clients.handshake(receiver.address, hello)).peer_id == RECEIVER
        # A hint (an mDNS record) naming another peer: the server cannot prove that name.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.handshake(receiver.address, hello, "peer-c")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A server whose introduction names another peer than its certificate.
        receiver.host.introduces_itself_as = "peer-c"
        with pytest.raises(WireError, match="certificate of receiver but introduces itself as "
                                            "peer-c") as lied:
            await clients.handshake(receiver.address, hello)
        assert lied.value.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await clients.close()


async def test_a_probe_finds_no_member_behind_a_plain_or_foreign_server(
    foreign_ca: ClusterCa, cluster_ca: ClusterCa
) -> None:
    for tls in (None, foreign_ca.identity(RECEIVER)):
        server, served = await serve(MergingHost(RECEIVER), tls)
        try:
            with pytest.raises(ConnectionError, match="no cluster member answers TLS"):
                await probe_peer_name(served.address, cluster_ca.identity("peer-a"), 5.0)
        finally:
            await server.stop(0)


# ---- peerd ca -----------------------------------------------------------------------------------

def test_ca_init_and_issue_write_files_that_fit(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "board-1"
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert main(["ca", "issue", "board-1", "--dir", str(ca_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"peerd ca issue NAME --dir {ca_dir}" in printed
    assert str(out / DEVICE_KEY) in printed and "/etc/peerd/tls" in printed
    for key in (ca_dir / CA_KEY, out / DEVICE_KEY):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca_certificate = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    certificate = x509.load_pem_x509_certificate((out / DEVICE_CERT).read_bytes())
    certificate.verify_directly_issued_by(ca_certificate)
    assert (out / CA_CERT).read_bytes() == (ca_dir / CA_CERT).read_bytes()
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "board-1"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["board-1"]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert TlsIdentity.load(out).name == "board-1"


def test_ca_refuses_to_overwrite_without_force(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert main(["ca", "issue", "board-1", "--dir", str(ca_dir)]) == 0
    first_ca, first_key = (ca_dir / CA_CERT).read_bytes(), (ca_dir / "board-1" / DEVICE_KEY)
    first_device_key = first_key.read_bytes()
    capsys.readouterr()
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 2
    error = capsys.readouterr().err
    assert f"{ca_dir / CA_CERT} exists" in error and "--force" in error
    assert main(["ca", "issue", "board-1", "--dir", str(ca_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (ca_dir / CA_CERT).read_bytes() == first_ca
    assert first_key.read_bytes() == first_device_key
    assert main(["ca", "issue", "bad name", "--dir", str(ca_dir)]) == 2
    assert "peer id 'bad name' is invalid" in capsys.readouterr().err
    assert main(["ca", "init", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / CA_CERT).read_bytes() != first_ca
    # The old device certificate does not fit the new CA.
    (ca_dir / "board-1" / CA_CERT).write_bytes((ca_dir / CA_CERT).read_bytes())
    with pytest.raises(TlsError, match="not issued by this CA"):
        TlsIdentity.load(ca_dir / "board-1")


def test_starting_without_certificates_says_how_to_make_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls_dir = tmp_path / "tls"
    assert main(["start", "--tls-dir", str(tls_dir), "--state-dir", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err
    for expected in (str(tls_dir / CA_CERT), str(tls_dir / DEVICE_CERT), str(tls_dir / DEVICE_KEY),
                     "peerd ca init", f"peerd ca issue NAME --out {tls_dir}", "--insecure"):
        assert expected in error, (expected, error)


def test_the_peer_id_is_the_certificate_name(tmp_path: Path, cluster_ca: ClusterCa,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    tls = cluster_ca.identity("board-7")
    config = DaemonConfig(tls_dir=str(tls.directory), state_dir=str(tmp_path / "state"))
    assert own_peer_id(config, tls) == "board-7"
    assert (tmp_path / "state" / "peer_id").read_text() == "board-7"
    assert main(["start", *cluster_ca.flags("board-7"), "--peer-id", "board-8",
                 "--state-dir", str(tmp_path / "state")]) == 2
    error = capsys.readouterr().err
    assert "peer_id='board-8'" in error and "'board-7'" in error


# ---- daemons ------------------------------------------------------------------------------------

def test_two_daemons_train_over_mutual_tls(tmp_path: Path, cluster_ca: ClusterCa,
                                           foreign_ca: ClusterCa) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", "2", "--linger", "120"],
                                     cluster_ca)
    try:
        for daemon in daemons:
            daemon.wait_rounds(2)
            assert "mutual TLS with" in daemon.output()
            rounds = daemon.rounds()
            assert rounds[-1]["bytes_received_cum"] > 0 and rounds[-1]["members"] == 2

        async def attempts() -> dict[str, grpc.StatusCode]:
            address = daemons[0].address
            request = peer_pb2.PullRequest(requester="peer-01")
            codes = {}
            for label, tls in (("insecure", None), ("foreign", foreign_ca.identity("peer-01")),
                               ("impostor", cluster_ca.identity("intruder"))):
                clients = PeerClients(tls)
                try:
                    async for _ in clients.stub(address, "peer-00").Pull(request, timeout=5):
                        pass
                    codes[label] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    codes[label] = error.code()
                finally:
                    await clients.close()
            return codes

        assert asyncio.run(attempts()) == {"insecure": grpc.StatusCode.UNAVAILABLE,
                                           "foreign": grpc.StatusCode.UNAVAILABLE,
                                           "impostor": grpc.StatusCode.PERMISSION_DENIED}
        shown = subprocess.run(
            [sys.executable, "-m", "peerd.cli", "status", "--addr", daemons[1].address,
             *cluster_ca.flags("admin")],
            capture_output=True, text=True, timeout=60, check=False)
        assert shown.returncode == 0 and "peer peer-01" in shown.stdout, shown.stderr
        refused = subprocess.run(
            [sys.executable, "-m", "peerd.cli", "status", "--addr", daemons[1].address,
             "--insecure"], capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "no daemon answers" in refused.stderr
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
        assert wait_all(daemons, timeout_s=30) == [0, 0]
    finally:
        kill_all(daemons)


def test_insecure_daemons_still_train_together_and_warn(tmp_path: Path) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", "1"], None)
    try:
        assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
    finally:
        kill_all(daemons)
    for daemon in daemons:
        assert "WARNING peerd.daemon: running without TLS (--insecure)" in daemon.output()
        assert daemon.rounds()[-1]["bytes_received_cum"] > 0


# ---- roles --------------------------------------------------------------------------------------

def role_identity(ca: ClusterCa, name: str, role: str) -> TlsIdentity:
    """A certificate for `name` with `role`, issued once into its own directory."""
    directory = ca.directory / f"{name}-{role}"
    if not (directory / DEVICE_KEY).exists():
        issue(ca.directory, name, directory, role=role)
    return TlsIdentity.load(directory)


async def calls_with(identity: TlsIdentity, served: Served) -> Outcomes:
    """Status plus every claim-carrying call, by `identity` speaking for itself."""
    clients = PeerClients(identity)
    try:
        outcomes = await try_every_claim(clients.stub(served.address, RECEIVER), identity.name)
        try:
            await clients.status(served.address, RECEIVER)
            outcomes["Status"] = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as error:
            outcomes["Status"] = (error.code(), error.details() or "")
        return outcomes
    finally:
        await clients.close()


async def test_an_observer_reads_status_and_nothing_else(receiver: Served,
                                                         cluster_ca: ClusterCa) -> None:
    before = receiver.host.params["w"].clone()
    observer = role_identity(cluster_ca, "operator", OBSERVER_ROLE)
    assert observer.role == OBSERVER_ROLE
    outcomes = await calls_with(observer, receiver)
    assert outcomes["Status"] == (grpc.StatusCode.OK, "")
    for rpc in ("Handshake", "PushSlices", "Pull"):
        code, details = outcomes[rpc]
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        assert f"{rpc} needs a device" in details and "certificate is observer" in details
    assert sorted(receiver.rejected) == sorted(
        (rpc, "PERMISSION_DENIED") for rpc in ("Handshake", "PushSlices", "Pull"))
    assert_untouched(receiver, before)


async def test_only_members_and_readers_pull(receiver: Served, cluster_ca: ClusterCa) -> None:
    stranger = await calls_with(cluster_ca.identity("peer-z"), receiver)
    assert stranger["Pull"][0] == grpc.StatusCode.PERMISSION_DENIED
    assert "peer-z is neither a member" in stranger["Pull"][1]
    member = await calls_with(cluster_ca.identity(MEMBER), receiver)
    assert member["Pull"] == (grpc.StatusCode.OK, "")
    reader = await calls_with(role_identity(cluster_ca, "evaluator", READER_ROLE), receiver)
    assert {rpc: code for rpc, (code, _) in reader.items()} == {
        "Handshake": grpc.StatusCode.PERMISSION_DENIED,
        "PushSlices": grpc.StatusCode.PERMISSION_DENIED,
        "Pull": grpc.StatusCode.OK, "Status": grpc.StatusCode.OK}


def test_ca_issue_role_and_a_daemon_refuses_a_non_device_certificate(
        tmp_path: Path, cluster_ca: ClusterCa, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "watch"
    assert main(["ca", "issue", "watch", "--dir", str(cluster_ca.directory), "--out", str(out),
                 "--role", "observer"]) == 0
    certificate = x509.load_pem_x509_certificate((out / DEVICE_CERT).read_bytes())
    assert certificate.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "observer"
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(TlsError, match="is an observer certificate: a daemon needs a device"):
        TlsIdentity.load_device(out)
    assert main(["start", "--tls-dir", str(out), "--state-dir", str(tmp_path / "state")]) == 2
    assert "a daemon needs a device certificate" in capsys.readouterr().err
