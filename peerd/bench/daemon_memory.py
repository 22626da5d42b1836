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
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from peerd.algorithm.engine import sgd, train_step
from peerd.bench.processes import BenchError, child_result
from peerd.cluster import free_ports
from peerd.models.base import full_units
from peerd.rss import peak_rss_bytes
from peerd.tasks import get_task

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


DAEMON_WIDTHS = (1.0, 0.5, 0.25, 0.125)
LONE_STEPS = 3
LONE_TIMEOUT_S = 1800.0
RUN_TIMEOUT_S = 3600.0


def _lone_training(conn: Connection, task: str, steps: int) -> None:
    """A child: the full model trained alone in one process, as a single device would (the
    task's optimizer and batch, one torch thread); sends back its peak RSS."""
    torch.set_num_threads(1)
    definition = get_task(task)
    data = definition.load_data(None)
    spec = definition.model(data)
    module = spec.build(full_units(spec))
    module.train()
    optimizer = sgd(module, definition.train)
    size = definition.train.batch_size
    for step in range(steps):
        batch = slice(step * size, (step + 1) * size)
        train_step(spec.kind, definition.train, module, optimizer, data.train.inputs[batch],
                   data.train.targets[batch])
    conn.send(peak_rss_bytes())


def lone_training_peak(task: str, steps: int = LONE_STEPS) -> int:
    """Peak RSS of a fresh process training the task's full model alone for `steps` steps."""
    return child_result(_lone_training, (task, steps), LONE_TIMEOUT_S,
                        f"{task}: the lone full-model run")


@dataclass(frozen=True)
class DaemonsMemoryResult:
    task: str
    lone_peak_bytes: int
    runs: tuple[DaemonMemoryResult, ...]

    def to_json(self) -> dict:
        return {"task": self.task, "lone_full_training_peak_bytes": self.lone_peak_bytes,
                "runs": [run.as_dict() for run in self.runs]}

    def describe(self) -> str:
        param_bytes = next(d.param_bytes for run in self.runs for d in run.daemons)
        assert param_bytes is not None
        lines = [f"{self.task}: peak RSS (VmHWM) of each daemon, {self.runs[0].peers} daemons "
                 f"on loopback, {self.runs[0].rounds} rounds; fp32 parameters "
                 f"{param_bytes / MiB:.0f} MiB; the full model trained alone in one process "
                 f"peaks at {self.lone_peak_bytes / MiB:.0f} MiB",
                 f"{'mu':>6} {'peak MiB (each daemon)':>24} {'x params':>9} "
                 f"{'vs alone':>9} {'round s':>8}"]
        for run in self.runs:
            peaks = [d.rss_peak_bytes for d in run.daemons]
            highest = max(peaks)
            rounds_s = [d.round_s_median for d in run.daemons if d.round_s_median is not None]
            lines.append(f"{run.mu:>6g} {', '.join(f'{p / MiB:.0f}' for p in peaks):>24} "
                         f"{highest / param_bytes:>9.2f} {highest / self.lone_peak_bytes:>9.2f} "
                         f"{max(rounds_s, default=float('nan')):>8.1f}")
        return "\n".join(lines)


def run_daemons_memory(task: str, widths: tuple[float, ...], peers: int,
                       rounds: int) -> DaemonsMemoryResult:
    """One loopback run of `peers` daemons per width, and the lone full-model baseline."""
    lone = lone_training_peak(task)
    return DaemonsMemoryResult(task, lone, tuple(
        run_daemon_memory(task, mu, peers, rounds, RUN_TIMEOUT_S) for mu in widths))
