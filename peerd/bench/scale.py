"""`peerd bench scale`: round time and bytes per peer as the cluster grows, ring against full.

For each cluster size and topology this runs a real local cluster (`peerd cluster`'s
launcher: N `peerd start` processes on loopback, discovery, gRPC exchange over mutual TLS),
lets it train a few rounds on a small task and reads every daemon's rounds.jsonl. Per
configuration it reports the median round time over peers and rounds (the first round, which
includes start-up skew, left out) and the median bytes a peer sends per round. On a ring each
peer talks to two neighbours whatever N is, so its bytes level off; fully connected, they grow
with N - 1. All daemons share this machine's cores, so round time also grows with N through
compute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peerd.bench.processes import BenchError, positive_int, print_result
from peerd.cluster import ClusterConfig, DaemonProcess, launch, stop, tls_dirs
from peerd.sim import peer_name

POLL_INTERVAL_S = 0.5
# Generous: 16 daemons on 2 cores start slowly (each imports torch) and train in turn.
ROUND_DEADLINE_S = 120.0


@dataclass(frozen=True)
class ScalePoint:
    peers: int
    topology: str
    round_s: float  # median over peers and rounds
    bytes_per_peer_round: float  # median over peers
    neighbours: int  # of each peer

    def to_json(self) -> dict[str, float | int | str]:
        return {"peers": self.peers, "topology": self.topology,
                "median_round_s": round(self.round_s, 4),
                "bytes_per_peer_round": round(self.bytes_per_peer_round),
                "neighbours": self.neighbours}


def _wait_for_rounds(daemons: list[DaemonProcess], rounds: int) -> list[list[dict]]:
    deadline = time.monotonic() + ROUND_DEADLINE_S * (rounds + 1)
    while True:
        records = [daemon.rounds() for daemon in daemons]
        if all(len(peer) >= rounds for peer in records):
            return records
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise BenchError(f"{daemon.peer_id} exited with code "
                                 f"{daemon.process.returncode}:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            done = [len(peer) for peer in records]
            raise BenchError(f"rounds done per peer after the deadline: {done}")
        time.sleep(POLL_INTERVAL_S)


def measure(peers: int, topology: str, rounds: int, task: str, mu: float, out: Path) -> ScalePoint:
    # Strict rounds: a round's record is written after its pushes are acknowledged, so the
    # cumulative byte counters of two records differ by exactly the rounds between them
    # (semi-async pushes run on in the background and land in whichever record comes next).
    config = ClusterConfig(peers=peers, topology=topology, method="msfusion", mu=(mu,), task=task,
                           rounds=rounds, out=str(out), sync=True)
    daemons = launch(config, out, tls_dirs(out, [peer_name(i) for i in range(peers)]))
    try:
        records = _wait_for_rounds(daemons, rounds)
    finally:
        stop(daemons)
    round_times = [record["round_s"] for peer in records for record in peer[1:rounds]]
    per_round_bytes = [
        (peer[rounds - 1]["bytes_sent_cum"] - peer[0]["bytes_sent_cum"]) / (rounds - 1)
        for peer in records
    ]
    return ScalePoint(peers, topology, statistics.median(round_times),
                      statistics.median(per_round_bytes), len(records[0][-1]["neighbours"]))


@dataclass(frozen=True)
class ScaleResult:
    points: tuple[ScalePoint, ...]

    def to_json(self) -> list[dict[str, float | int | str]]:
        return [point.to_json() for point in self.points]

    def describe(self) -> str:
        lines = [f"{'peers':>5} {'topology':>8} {'neighbours':>10} {'round s':>8} "
                 f"{'KiB sent per peer per round':>28}"]
        for point in self.points:
            lines.append(f"{point.peers:>5} {point.topology:>8} {point.neighbours:>10} "
                         f"{point.round_s:>8.2f} {point.bytes_per_peer_round / 1024:>28.1f}")
        return "\n".join(lines)


def run_scale(
    sizes: list[int], topologies: list[str], rounds: int, task: str, mu: float
) -> ScaleResult:
    if rounds < 2:
        raise BenchError("at least 2 rounds: the first one is left out of the medians")
    points = []
    with tempfile.TemporaryDirectory(prefix="peerd-bench-scale-") as scratch:
        for peers in sizes:
            for topology in topologies:
                out = Path(scratch) / f"{topology}-{peers}"
                points.append(measure(peers, topology, rounds, task, mu, out))
    return ScaleResult(tuple(points))


# ---- command line -----------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    sizes = [positive_int(part) for part in text.split(",")]
    if min(sizes) < 2:
        raise argparse.ArgumentTypeError("a cluster needs at least 2 peers")
    return sizes


def _topologies(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in ("ring", "full")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown topology {unknown[0]!r}: use ring or full")
    return names


def add_scale_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `scale` (under `peerd bench`); its `func` runs the benchmark."""
    scale = subparsers.add_parser(
        "scale", help="round time and bytes per peer against cluster size, ring and full",
        description="Run real local clusters of each size and topology for a few rounds on a "
                    "small task; report the median round time and bytes sent per peer per "
                    "round.",
    )
    scale.add_argument("--peers", type=_sizes, default=[2, 4, 8, 16],
                       help="comma-separated cluster sizes (default: 2,4,8,16)")
    scale.add_argument("--topology", type=_topologies, default=["ring", "full"],
                       help="comma-separated topologies (default: ring,full)")
    scale.add_argument("--rounds", type=positive_int, default=4,
                       help="rounds per cluster; the first is left out (default: %(default)s)")
    scale.add_argument("--task", default="digits", help="task (default: %(default)s)")
    scale.add_argument("--mu", type=float, default=0.5, help="width ratio (default: %(default)s)")
    scale.add_argument("--json", action="store_true", help="print one JSON list")
    scale.set_defaults(func=run_scale_command)


def run_scale_command(args: argparse.Namespace) -> int:
    return print_result(
        "scale", lambda: run_scale(args.peers, args.topology, args.rounds, args.task, args.mu),
        args.json)
