"""Starting real `peerd start` processes for tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peerd.cluster import free_ports


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
    root: Path, count: int, extra: list[str], static: bool = True
) -> list[RunningDaemon]:
    """`count` daemons on 127.0.0.1, each given the others' addresses, mDNS off."""
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
                *extra]
        if static:
            for other in addresses:
                if other != addresses[position]:
                    args += ["--peer", other]
        with open(state_dir / "out.log", "w") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        daemons.append(RunningDaemon(peer_id, addresses[position], state_dir, process))
    return daemons


def wait_all(daemons: list[RunningDaemon], timeout_s: float = 180.0) -> list[int]:
    codes = []
    for daemon in daemons:
        try:
            codes.append(daemon.process.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            codes.append(daemon.process.wait())
    return codes


def kill_all(daemons: list[RunningDaemon]) -> None:
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
