"""Discovery: TXT and address validation, mDNS on loopback, and mDNS across network namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest
from netns import Host, bridged_hosts, netns_available
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from peerd.net.discovery import (
    SERVICE_TYPE,
    Candidate,
    DiscoveryManager,
    MdnsDiscovery,
    PeerRecord,
    StaticDiscovery,
    instance_label,
    parse_address,
)

# Ids carry the pid: concurrent runs on this machine share loopback and must not mix.
RUN = str(os.getpid())
FIND_TIMEOUT_S = 10.0


def make_record(peer_id: str, **changes: object) -> PeerRecord:
    record = PeerRecord(
        peer_id=f"{peer_id}-{RUN}",
        cluster=f"lab-{RUN}",
        protocol_version=1,
        model_fingerprint="cnn-3f9a",
        mu=0.25,
        host="127.0.0.1",
        port=7000,
    )
    return replace(record, **changes)


async def eventually(condition: Callable[[], bool], what: str, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {timeout} s: {what}")


def test_txt_round_trip() -> None:
    record = make_record("a", mu=0.125, host="::1", port=7443)
    txt = record.to_txt()
    assert all(isinstance(value, str) for value in txt.values())
    assert PeerRecord.from_txt(txt, "0:0::1", 7443) == record
    assert record.address == "[::1]:7443"
    assert make_record("a").address == "127.0.0.1:7000"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("peer_id", None),
        ("peer_id", ""),
        ("peer_id", "a" * 65),
        ("peer_id", "has space"),
        ("peer_id", "semi;colon"),
        ("cluster", None),
        ("cluster", "x/y"),
        ("model_fingerprint", None),
        ("model_fingerprint", "\ufffd"),
        ("protocol_version", None),
        ("protocol_version", "1.5"),
        ("protocol_version", "-1"),
        ("protocol_version", "v1"),
        ("protocol_version", " 1"),
        ("mu", None),
        ("mu", "half"),
        ("mu", "0"),
        ("mu", "-0.25"),
        ("mu", "1.01"),
        ("mu", "nan"),
        ("mu", "inf"),
    ],
)
def test_from_txt_names_the_bad_key(key: str, value: str | None) -> None:
    txt: dict[str, str | None] = dict(make_record("a").to_txt())
    txt[key] = value
    with pytest.raises(ValueError, match=key):
        PeerRecord.from_txt(txt, "127.0.0.1", 7000)


def test_from_txt_missing_key() -> None:
    for key in make_record("a").to_txt():
        txt = make_record("a").to_txt()
        del txt[key]
        with pytest.raises(ValueError, match=f"'{key}' is missing"):
            PeerRecord.from_txt(txt, "127.0.0.1", 7000)


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [("", 7000, "host"), ("bad_host", 7000, "host"), ("127.0.0.1", 0, "port"),
     ("127.0.0.1", 65536, "port")],
)  # fmt: skip
def test_from_txt_checks_host_and_port(host: str, port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerRecord.from_txt(make_record("a").to_txt(), host, port)


def test_from_txt_accepts_bounds_and_extra_keys() -> None:
    txt = {**make_record("a").to_txt(), "mu": "1", "protocol_version": "0", "future": "x"}
    record = PeerRecord.from_txt(txt, "10.213.0.10", 65535)
    assert (record.mu, record.protocol_version, record.port) == (1.0, 0, 65535)
    assert PeerRecord.from_txt(make_record("a" * 50).to_txt(), "h.lan", 1).peer_id.startswith("a")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:7000", ("::1", 7000)),
        ("[2001:DB8:0::1]:65535", ("2001:db8::1", 65535)),
        ("Board-3.LAN:1", ("board-3.lan", 1)),
        ("localhost:50051", ("localhost", 50051)),
    ],
)
def test_parse_address_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "7000", "host", "host:", ":7000", "host:0", "host:65536", "host:x", "host:+1",
     "host:\u0663", "::1:7000", "[::1]7000", "[::1:7000", "[127.0.0.1]:7000", "[]:7000",
     "bad_host:7000", "-host:7000", "host name:7000", "a..b:7000"],
)  # fmt: skip
def test_parse_address_bad(text: str) -> None:
    with pytest.raises(ValueError, match="bad address") as raised:
        parse_address(text)
    assert repr(text) in str(raised.value)


async def test_static_discovery_normalizes_and_deduplicates() -> None:
    static = StaticDiscovery(["[::0:1]:7000", "[::1]:7000", "Host.lan:7001"])
    await static.start()
    assert static.candidates() == [Candidate("[::1]:7000", None), Candidate("host.lan:7001", None)]
    await static.stop()
    with pytest.raises(ValueError, match="'nope'"):
        StaticDiscovery(["127.0.0.1:7000", "nope"])


class FakeSource:
    """A Discovery that records its lifecycle and returns fixed candidates."""

    def __init__(self, candidates: list[Candidate], fail_start: bool = False) -> None:
        self.fixed = candidates
        self.fail_start = fail_start
        self.running = False

    async def start(self) -> None:
        if self.fail_start:
            raise OSError("cannot bind")
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def candidates(self) -> list[Candidate]:
        return list(self.fixed)


async def test_manager_merges_preferring_records() -> None:
    known = make_record("b", host="10.213.0.11", port=7000)
    mdns = FakeSource([Candidate(known.address, known)])
    static = StaticDiscovery(["10.213.0.11:7000", "10.213.0.12:7000"])
    manager = DiscoveryManager([static, mdns])
    await manager.start()
    assert mdns.running
    assert manager.candidates() == [
        Candidate("10.213.0.11:7000", known),
        Candidate("10.213.0.12:7000", None),
    ]
    await manager.stop()
    assert not mdns.running


async def test_manager_start_failure_stops_started_sources() -> None:
    first = FakeSource([])
    manager = DiscoveryManager([first, FakeSource([], fail_start=True)])
    with pytest.raises(OSError, match="cannot bind"):
        await manager.start()
    assert not first.running


def test_mdns_rejects_unusable_names_and_addresses() -> None:
    for peer_id in ("a" * 64, "a..b", ".a"):
        with pytest.raises(ValueError, match="mDNS name"):
            MdnsDiscovery(replace(make_record("x"), peer_id=peer_id), "127.0.0.1")
    with pytest.raises(ValueError, match="IPv4"):
        MdnsDiscovery(make_record("a"), interface="eth0")
    with pytest.raises(ValueError, match="announce"):
        MdnsDiscovery(make_record("a", host="board.lan"))
    with pytest.raises(ValueError, match="announce"):
        MdnsDiscovery(make_record("a", host="0.0.0.0"))


@pytest.fixture
async def loopback_peers() -> AsyncIterator[dict[str, MdnsDiscovery]]:
    """Five peers on 127.0.0.1: a and b match; the others differ in one field each."""
    loopback = "127.0.0.1"
    peers = {
        "a": MdnsDiscovery(make_record("a", port=7001), loopback),
        "b": MdnsDiscovery(make_record("b", port=7002), loopback),
        "c": MdnsDiscovery(make_record("c", port=7003, cluster=f"other-{RUN}"), loopback),
        "d": MdnsDiscovery(make_record("d", port=7004, model_fingerprint="x"), loopback),
        "e": MdnsDiscovery(make_record("e", port=7005, protocol_version=2), loopback),
    }
    # A raw announcement with a TXT record that fails validation (mu out of range).
    malformed = make_record("f", port=7006)
    raw = AsyncZeroconf(interfaces=[loopback], ip_version=IPVersion.V4Only)
    raw_info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance_label(malformed.peer_id, malformed.cluster)}.{SERVICE_TYPE}",
        port=malformed.port,
        properties={**malformed.to_txt(), "mu": "2"},
        server=f"{instance_label(malformed.peer_id, malformed.cluster)}.local.",
        parsed_addresses=[loopback],
    )
    try:
        async with asyncio.timeout(FIND_TIMEOUT_S):
            await asyncio.gather(
                raw.async_register_service(raw_info), *(peer.start() for peer in peers.values())
            )
        yield peers
    finally:
        await asyncio.gather(*(peer.stop() for peer in peers.values()), return_exceptions=True)
        await raw.async_close()


def peer_ids(discovery: MdnsDiscovery) -> set[str]:
    return {candidate.record.peer_id for candidate in discovery.candidates() if candidate.record}


IGNORED_REASONS = ("cluster", "fingerprint", "protocol", "malformed")


async def test_mdns_on_loopback(loopback_peers: dict[str, MdnsDiscovery]) -> None:
    a, b = loopback_peers["a"], loopback_peers["b"]
    await eventually(
        lambda: peer_ids(a) == {b.own.peer_id} and peer_ids(b) == {a.own.peer_id},
        "a and b find each other",
        FIND_TIMEOUT_S,
    )
    await eventually(
        lambda: all(a.ignored[reason] >= 1 for reason in IGNORED_REASONS),
        f"a counts each of {IGNORED_REASONS}",
        FIND_TIMEOUT_S,
    )
    assert a.candidates() == [Candidate("127.0.0.1:7002", b.own)]
    for name in "cde":
        # Each incompatible peer hears a and b and ignores them, and never lists itself.
        assert loopback_peers[name].candidates() == []

    await b.stop()
    await eventually(lambda: a.candidates() == [], "a drops b after b stops", FIND_TIMEOUT_S)


# Runs in each namespace: announce, wait for the others, print what was found as one JSON
# line, then keep announcing until stdin closes so that slower peers can still find this one.
FIND_PEERS = """
import asyncio, json, sys
from peerd.net.discovery import MdnsDiscovery, PeerRecord

async def main(peer_id, cluster, address, expected, timeout):
    own = PeerRecord(peer_id, cluster, 1, "cnn-3f9a", 0.25, address, 7000)
    discovery = MdnsDiscovery(own, interface=address)
    await discovery.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(discovery.candidates()) < expected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        found = {c.record.peer_id: c.address for c in discovery.candidates()}
        print(json.dumps(found), flush=True)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        await asyncio.wait_for(stdin.read(), timeout)
    finally:
        await discovery.stop()
    return 0 if len(found) == expected else 1

sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                          float(sys.argv[5]))))
"""
NAMESPACE_TIMEOUT_S = 20.0


def require_netns() -> None:
    available, reason = netns_available()
    if not available:
        pytest.skip(reason)


@pytest.fixture
def lan() -> Iterator[list[Host]]:
    require_netns()
    with bridged_hosts(3, "peerd-disc") as hosts:
        yield hosts


def test_bridged_hosts_removes_everything() -> None:
    require_netns()
    # 2**22 is above any Linux pid, so this name looks like a namespace of a killed run.
    stale = f"peerd-harness-{2**22}-{os.getpid()}-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    with (
        pytest.raises(RuntimeError, match="body failed"),
        bridged_hosts(2, "peerd-harness") as hosts,
    ):
        assert [host.address for host in hosts] == ["10.213.0.10", "10.213.0.11"]
        assert "10.213.0.11/24" in hosts[1].run(["ip", "-o", "addr", "show", "eth0"]).stdout
        sleeper = hosts[0].popen(["sleep", "60"])
        names = [host.name for host in hosts] + [hosts[0].name.removesuffix("-h0") + "-br"]
        raise RuntimeError("body failed")
    assert sleeper.poll() is not None
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    left = {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}
    assert left.isdisjoint([*names, stale])


def read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return process.stdout.readline() if ready else ""


def test_mdns_across_namespaces(lan: list[Host]) -> None:
    cluster = f"lan-{RUN}"
    processes = [
        host.popen(
            [sys.executable, "-c", FIND_PEERS, f"h{index}", cluster, host.address,
             str(len(lan) - 1), str(NAMESPACE_TIMEOUT_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index, host in enumerate(lan)
    ]  # fmt: skip
    deadline = time.monotonic() + NAMESPACE_TIMEOUT_S + 10.0
    lines = [read_line(process, deadline) for process in processes]
    # communicate closes stdin: each peer stops once every peer has reported.
    outcomes = [process.communicate(timeout=15.0) for process in processes]
    for index, (process, (_, stderr)) in enumerate(zip(processes, outcomes, strict=True)):
        assert process.returncode == 0, f"h{index} exited {process.returncode}: {stderr}"

    for index, line in enumerate(lines):
        expected = {
            f"h{other}": f"{host.address}:7000" for other, host in enumerate(lan) if other != index
        }
        assert json.loads(line) == expected, f"h{index} found {line!r}"


async def test_clusters_sharing_a_network_may_reuse_peer_ids() -> None:
    # Two local clusters both have a peer-00: each announces under a name tagged with its
    # cluster, so neither one's probe collides with the other's (it crashed both before).
    loopback = "127.0.0.1"
    first = MdnsDiscovery(make_record("twin", port=7011), loopback)
    elsewhere = MdnsDiscovery(make_record("twin", port=7012, cluster=f"other-{RUN}"), loopback)
    assert instance_label("twin", "a") != instance_label("twin", "b")
    assert len(instance_label("x" * 54, "a")) == 63
    try:
        async with asyncio.timeout(FIND_TIMEOUT_S):
            await first.start()
            await elsewhere.start()
    finally:
        await asyncio.gather(first.stop(), elsewhere.stop(), return_exceptions=True)
