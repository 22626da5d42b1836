"""`peerd bench memory --daemon`: the peak resident memory of real daemon processes.

N `peerd start` processes on loopback (no TLS, no mDNS, static addresses, one torch thread,
strict rounds) train the task for a few rounds at width mu. This process reads every daemon's
VmHWM from /proc while it runs (the last reading before it exits is its peak) and sets it
against the full model's fp32 parameter bytes: invariant 9 (memory follows the slice) says a
daemon holds one full copy of the parameters, its sub-model's training state and slice-sized
buffers, so its peak is about params + a constant, not a multiple of params.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from peerd.bench.processes import BenchError
from peerd.cluster import free_ports

MiB = 2**20
POLL_S = 0.1


@dataclass(frozen=True)
class DaemonPeak:
    peer_id: str
    rss_peak_bytes: int  # VmHWM read from outside, up to the process's exit
    rounds: int
    round_s_median: float | None
    params_full: int | None  # from rounds.jsonl

    @property
    def param_bytes(self) -> int | None:
        return None if self.params_full is None else 4 * self.params_full


@dataclass(frozen=True)
class DaemonMemoryResult:
    task: str
    mu: float
    peers: int
    rounds: int
    daemons: tuple[DaemonPeak, ...]

    def as_dict(self) -> dict:
        return {"task": self.task, "mu": self.mu, "peers": self.peers, "rounds": self.rounds,
                "daemons": [{**asdict(d), "param_bytes": d.param_bytes}
                            for d in self.daemons]}


def _vm_hwm(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def daemon_command(root: Path, position: int, addresses: list[str], task: str, mu: float,
                   rounds: int, extra: list[str]) -> list[str]:
    """The `peerd start` command line of daemon `position` of a loopback bench cluster."""
    peer_id = f"peer-{position:02d}"
    host, port = addresses[position].rsplit(":", 1)
    command = [sys.executable, "-m", "peerd.cli", "start", "--insecure", "--no-mdns",
               "--host", host, "--port", port, "--peer-id", peer_id,
               "--state-dir", str(root / peer_id), "--shard", f"{position}/{len(addresses)}",
               "--min-peers", str(len(addresses)), "--threads", "1", "--task", task,
               "--mu", f"{mu:g}", "--rounds", str(rounds), "--sync", *extra]
    for other in addresses:
        if other != addresses[position]:
            command += ["--peer", other]
    return command


def run_daemon_memory(task: str, mu: float, peers: int, rounds: int, timeout_s: float,
                      out: Path | None = None, extra: tuple[str, ...] = ()) -> DaemonMemoryResult:
    """Run the daemons to the end of `rounds` and report each one's peak."""
    root = Path(tempfile.mkdtemp(prefix="peerd-memory-")) if out is None else out
    addresses = [f"127.0.0.1:{port}" for port in free_ports(peers)]
    processes = []
    for position in range(peers):
        state_dir = root / f"peer-{position:02d}"
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(state_dir / "out.log", "w") as log:
            processes.append(subprocess.Popen(
                daemon_command(root, position, addresses, task, mu, rounds, list(extra)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    peaks = [0] * peers
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline:
                raise BenchError(f"the daemons did not finish {rounds} rounds in {timeout_s:.0f} s")
            for position, process in enumerate(processes):
                peak = _vm_hwm(process.pid) if process.poll() is None else None
                if peak is not None:
                    peaks[position] = max(peaks[position], peak)
            time.sleep(POLL_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [p for p in range(peers) if processes[p].returncode != 0]
    if failed:
        raise BenchError(f"daemons {failed} exited with codes "
                         f"{[processes[p].returncode for p in failed]}; see {root}/*/out.log")
    return DaemonMemoryResult(task, mu, peers, rounds, tuple(
        _daemon_peak(root / f"peer-{position:02d}", peaks[position])
        for position in range(peers)))


def _daemon_peak(state_dir: Path, outside_peak: int) -> DaemonPeak:
    records = [json.loads(line) for line in (state_dir / "rounds.jsonl").read_text().splitlines()
               if line.strip()]
    durations = sorted(r["round_s"] for r in records)
    inside = max((r.get("rss_peak_bytes", 0) for r in records), default=0)
    return DaemonPeak(state_dir.name, max(outside_peak, inside), len(records),
                      durations[len(durations) // 2] if durations else None,
                      records[-1].get("params_full") if records else None)
