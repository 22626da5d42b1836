"""Network-namespace harness: a few hosts on one virtual LAN, for discovery and daemon tests.

Topology of `bridged_hosts(count, prefix)`:

    <tag>-h0 (eth0 10.213.0.10/24) --veth-- v0 \
    <tag>-h1 (eth0 10.213.0.11/24) --veth-- v1 --- br0   (in namespace <tag>-br)
    ...                                        /

The bridge sits in a namespace of its own, so the root namespace gains no interface, route
or traffic, and deleting the namespaces removes every veth and the bridge with them.
`tag` is `<prefix>-<pid>-<sequence>`: parallel runs and repeated calls never collide, and
namespaces left by a run that was killed (its pid no longer alive) are swept on the next call.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SUBNET_PREFIX = "10.213.0."
FIRST_HOST = 10
HOST_INTERFACE = "eth0"
IP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

_sequence = itertools.count()


def _run(args: Sequence[str], stdin: str | None = None) -> None:
    """Run one network command; a failure raises with the command's own message."""
    result = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _ip(*args: str) -> None:
    _run(["ip", *args])


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Whether this process may build namespaces, and why not when it may not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 `ip` is not installed"
    probe = f"peerd-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return False, f"cannot create a network namespace: {error}"
    _ip("netns", "del", probe)
    return True, ""


@dataclass
class Host:
    """One namespace on the virtual LAN; commands started through it run inside it."""

    name: str
    address: str
    bridge: str  # the namespace holding the LAN's bridge
    port: str  # this host's port on the bridge
    interface: str = HOST_INTERFACE
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; the harness ends it if the test does not."""
        process = subprocess.Popen(self.command(args), **kwargs)
        self._processes.append(process)
        return process

    def run(
        self, args: Sequence[str], *, timeout: float = 30.0, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(args), timeout=timeout, check=check, **kwargs)

    def set_link(self, up: bool) -> None:
        """Plug this host's cable out of the bridge (a partition) or back in."""
        _ip("-n", self.bridge, "link", "set", self.port, "up" if up else "down")

    def impair_link(self, rate: str, loss_percent: float) -> None:
        """Make this host's link slow and lossy in both directions: a token bucket of `rate`
        (tc syntax, e.g. "2mbit") on each end of its cable, and `loss_percent` of packets
        dropped at random on the way out and again on the way in (nftables numgen).
        Kernels without sch_netem (this one) still have tbf and nf_tables."""
        bucket = ("root", "tbf", "rate", rate, "burst", "16kb", "latency", "400ms")
        _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", self.interface,
              *bucket])
        _run(["ip", "netns", "exec", self.bridge, "tc", "qdisc", "add", "dev", self.port,
              *bucket])
        per_mille = round(loss_percent * 10)
        drop = f"numgen random mod 1000 < {per_mille} drop;"
        ruleset = (
            "table inet impaired {\n"
            f"  chain incoming {{ type filter hook input priority 0; {drop} }}\n"
            f"  chain outgoing {{ type filter hook output priority 0; {drop} }}\n"
            "}\n"
        )
        _run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], stdin=ruleset)

    def restore_link(self) -> None:
        """Undo impair_link."""
        _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", self.interface,
              "root"])
        _run(["ip", "netns", "exec", self.bridge, "tc", "qdisc", "del", "dev", self.port,
              "root"])
        _run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", "impaired"])

    def stop_processes(self) -> None:
        # A namespace lives on while a process holds it, veth included: end them all first.
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=STOP_TIMEOUT_S)


def _namespaces() -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=True
    )
    return [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(prefix: str) -> None:
    """Delete namespaces a killed earlier run of this harness left behind."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-(br|h\d+)$")
    for name in _namespaces():
        match = pattern.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)


@contextlib.contextmanager
def bridged_hosts(count: int, prefix: str) -> Iterator[list[Host]]:
    """`count` namespaces on one bridge, at 10.213.0.10, .11, ...; all removed on exit."""
    if not 1 <= count <= 254 - FIRST_HOST:
        raise ValueError(f"count must be in 1..{254 - FIRST_HOST}, got {count}")
    if not re.fullmatch(r"[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' and inner '-', got {prefix!r}")
    _sweep_stale(prefix)
    tag = f"{prefix}-{os.getpid()}-{next(_sequence)}"
    bridge = f"{tag}-br"
    created: list[str] = []
    hosts: list[Host] = []
    try:
        _ip("netns", "add", bridge)
        created.append(bridge)
        # No snooping: without an IGMP querier on this LAN a snooping bridge may stop
        # forwarding a group after its timers run out; flooding is what a small LAN does.
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for index in range(count):
            host = Host(name=f"{tag}-h{index}", address=f"{SUBNET_PREFIX}{FIRST_HOST + index}",
                        bridge=bridge, port=f"v{index}")
            _ip("netns", "add", host.name)
            created.append(host.name)
            peer_end = ("peer", "name", host.interface, "netns", host.name)
            _ip("-n", bridge, "link", "add", host.port, "type", "veth", *peer_end)
            _ip("-n", bridge, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.name, "link", "set", host.interface, "multicast", "on", "up")
            # Link-local groups (224.0.0.251) leave by IP_MULTICAST_IF without a route, but
            # a sender that names no interface needs one: keep all multicast on the LAN.
            _ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", host.interface)
            hosts.append(host)
        yield hosts
    finally:
        for host in hosts:
            host.stop_processes()
        errors = []
        for name in reversed(created):
            try:
                _ip("netns", "del", name)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                errors.append(str(error))
        if errors:
            raise RuntimeError("namespace cleanup failed: " + "; ".join(errors))
