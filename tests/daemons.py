"""Starting real `peerd start` processes for tests, with certificates from a test CA."""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peerd.cluster import free_ports
from peerd.net.tls import TlsIdentity
from peerd.ops.ca import DEVICE_KEY, issue


@dataclass(frozen=True)
class ClusterCa:
    """A cluster CA for tests (the `cluster_ca` fixture); issues each name's files once."""

    directory: Path

    def device(self, peer_id: str) -> Path:
        """The TLS directory of `peer_id` (`--tls-dir`)."""
        folder = self.directory / peer_id
        if not (folder / DEVICE_KEY).exists():
            issue(self.directory, peer_id)
        return folder

    def identity(self, peer_id: str) -> TlsIdentity:
        return TlsIdentity.load(self.device(peer_id))

    def flags(self, peer_id: str) -> list[str]:
        return ["--tls-dir", str(self.device(peer_id))]


@dataclass
class RunningDaemon:
    peer_id: str
    address: str
    state_dir: Path
    process: subprocess.Popen

    def rounds(self) -> list[dict]:
        path = self.state_dir / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_rounds(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.rounds()) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.peer_id} exited early: {self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.peer_id} did not finish {count} rounds")
            time.sleep(0.2)

    def output(self) -> str:
        return (self.state_dir / "out.log").read_text(errors="replace")


def start_loopback_daemons(
    root: Path, count: int, extra: list[str], ca: ClusterCa | None, static: bool = True,
    extra_by_position: Mapping[int, list[str]] | None = None,
    descriptor_limit_by_position: Mapping[int, int] | None = None,
) -> list[RunningDaemon]:
    """`count` daemons on 127.0.0.1, each given the others' addresses, mDNS off; with
    certificates from `ca`, or with --insecure when it is None; `extra_by_position` adds
    flags for some of them, `descriptor_limit_by_position` starts some under a file descriptor
    limit (soft and hard: the daemon cannot raise it)."""
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    daemons = []
    for position, port in enumerate(ports):
        peer_id = f"peer-{position:02d}"
        state_dir = root / peer_id
        state_dir.mkdir(parents=True)
        args = [sys.executable, "-m", "peerd.cli", "start", "--no-mdns", "--host", "127.0.0.1",
                "--port", str(port), "--peer-id", peer_id, "--state-dir", str(state_dir),
                "--shard", f"{position}/{count}", "--min-peers", str(count), "--threads", "1",
                *(ca.flags(peer_id) if ca else ["--insecure"]), *extra,
                *(extra_by_position or {}).get(position, [])]
        if static:
            for other in addresses:
                if other != addresses[position]:
                    args += ["--peer", other]
        with open(state_dir / "out.log", "w") as log:
            limit = (descriptor_limit_by_position or {}).get(position)
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL,
                                       preexec_fn=None if limit is None else
                                       functools.partial(limit_descriptors, limit))
        daemons.append(RunningDaemon(peer_id, addresses[position], state_dir, process))
    return daemons


def limit_descriptors(limit: int) -> None:
    """In a child before exec: at most `limit` open files, soft and hard."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


# wait_all without a timeout: a run may go on while a daemon writes to its log (a round, a
# handshake, a wait line every 10 s) at least every QUIET_S, up to MAX_RUN_S in all. A fixed
# 180 s killed healthy runs of 4 daemons on a loaded machine (load 20 on 2 cores: torch alone
# took 57 s to import, a whole run about 150 s); a stuck daemon still fails.
QUIET_S = 180.0
MAX_RUN_S = 900.0


def wait_all(daemons: list[RunningDaemon], timeout_s: float | None = None) -> list[int]:
    """The daemons' exit statuses once all have exited; those still running after `timeout_s`
    (or, without it, once no log grew for QUIET_S or after MAX_RUN_S) are killed (-9)."""
    started = last_progress = time.monotonic()
    log_sizes: list[int] = []
    while any(daemon.process.poll() is None for daemon in daemons):
        now = time.monotonic()
        if timeout_s is not None:
            if now - started > timeout_s:
                break
        else:
            sizes = [(daemon.state_dir / "out.log").stat().st_size for daemon in daemons]
            if sizes != log_sizes:
                log_sizes, last_progress = sizes, now
            if now - last_progress > QUIET_S or now - started > MAX_RUN_S:
                break
        time.sleep(0.2)
    kill_all(daemons)
    return [daemon.process.returncode for daemon in daemons]


def kill_all(daemons: list[RunningDaemon]) -> None:
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
