"""Faults of the network itself, between real hosts: three daemons in network namespaces on
one bridge, with mDNS and mTLS. One host's cable is pulled for 30 s (a partition), or its
link is made slow and lossy. Figures for RELIABILITY.md are printed (`pytest -s`)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from daemons import ClusterCa
from netns import Host, bridged_hosts, netns_available
from safetensors.torch import load_file

from peerd.state import CHECKPOINT_DIR, checkpoint_rounds

available, reason = netns_available()
pytestmark = pytest.mark.skipif(not available, reason=reason)

PEERS = 3
PARTITION_S = 30.0
DEAD_AFTER_S = 5.0
WAIT_S = 240.0
SLOW_RATE = "1mbit"
LOSS_PERCENT = 5.0


def rounds(state_dir: Path) -> list[dict]:
    path = state_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class LanCluster:
    hosts: list[Host]
    dirs: list[Path]
    processes: list[subprocess.Popen]

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            for process, state_dir in zip(self.processes, self.dirs, strict=True):
                log = (state_dir / "out.log").read_text()[-4000:]
                assert process.poll() is None, f"{state_dir.name} exited waiting for {what}:\n{log}"
            assert time.monotonic() < deadline, f"not within {WAIT_S:.0f} s: {what}"
            time.sleep(0.5)

    def wait_rounds(self, more: int, what: str) -> list[int]:
        """Wait until every host has recorded `more` rounds beyond now; the counts at the start."""
        start = [len(rounds(d)) for d in self.dirs]
        self.wait_until(lambda: all(len(rounds(d)) >= n + more
                                    for d, n in zip(self.dirs, start, strict=True)), what)
        return start

    def check_state(self) -> None:
        """No round recorded twice, and every host's newest checkpoint is finite."""
        for state_dir in self.dirs:
            history = [r["round"] for r in rounds(state_dir)]
            assert history == sorted(set(history)), f"{state_dir.name}: a round recorded twice"
            newest = checkpoint_rounds(state_dir)[-1]
            params = load_file(state_dir / CHECKPOINT_DIR / f"round-{newest:06d}.safetensors")
            assert all(bool(torch.isfinite(t).all()) for t in params.values())

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            assert process.wait(timeout=60) == 0


@contextmanager
def lan_cluster(tmp_path: Path, ca: ClusterCa, prefix: str) -> Iterator[LanCluster]:
    with bridged_hosts(PEERS, prefix) as hosts:
        dirs = [tmp_path / f"host{i}" for i in range(PEERS)]
        processes = []
        for i, (host, state_dir) in enumerate(zip(hosts, dirs, strict=True)):
            state_dir.mkdir()
            processes.append(host.popen(
                [sys.executable, "-m", "peerd.cli", "start", "--topology", "ring",
                 "--state-dir", str(state_dir), "--shard", f"{i}/{PEERS}",
                 "--min-peers", str(PEERS), "--threads", "1", "--dead-after", str(DEAD_AFTER_S),
                 "--round-timeout", "60", *ca.flags(f"host{i}")],
                stdout=(state_dir / "out.log").open("w"), stderr=subprocess.STDOUT))
        cluster = LanCluster(hosts, dirs, processes)
        cluster.wait_rounds(3, f"3 rounds of {PEERS}")
        yield cluster


def test_partition_and_heal(tmp_path: Path, cluster_ca: ClusterCa) -> None:
    """The two that keep a quorum drop the cut-off host and go on; after the heal it rejoins
    and all three train together again."""
    with lan_cluster(tmp_path, cluster_ca, "peerd-part") as cluster:
        majority, cut = cluster.dirs[:2], cluster.dirs[2]
        cluster.hosts[2].set_link(up=False)
        cut_at = len(rounds(cut))
        start = time.monotonic()
        cluster.wait_until(
            lambda: all(sum(r["members"] == 2 for r in rounds(d)) >= 2 for d in majority),
            "the majority's rounds as two")
        went_on_s = time.monotonic() - start
        assert went_on_s < PARTITION_S, "the majority did not go on in time"
        # The cut-off host makes no round with the others meanwhile.
        assert all(r["members"] == PEERS for r in rounds(cut)[cut_at:])
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - start)))
        cluster.hosts[2].set_link(up=True)
        healed = time.monotonic()
        healed_at = {d: len(rounds(d)) for d in cluster.dirs}

        cluster.wait_until(lambda: all(any(r["members"] == PEERS for r in rounds(d)[healed_at[d]:])
                                       for d in cluster.dirs), "rounds of three after the heal")
        rejoined_s = time.monotonic() - healed
        cluster.check_state()
        cluster.stop()
        print(json.dumps({
            "majority_went_on_s": went_on_s, "all_three_again_s": rejoined_s,
            "rounds_as_two": {d.name: sum(r["members"] == 2 for r in rounds(d)) for d in majority},
            "local_acc_last": {d.name: rounds(d)[-1]["local_acc"] for d in cluster.dirs},
        }))


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables' `nft` is not installed")
def test_slow_lossy_link(tmp_path: Path, cluster_ca: ClusterCa) -> None:
    """A slow, lossy link is not a dead peer: nobody is dropped, every round still closes with
    all three, and nothing non-finite reaches a checkpoint."""
    with lan_cluster(tmp_path, cluster_ca, "peerd-lossy") as cluster:
        before = cluster.wait_rounds(3, "rounds on a clean link")
        cluster.hosts[2].impair_link(SLOW_RATE, LOSS_PERCENT)
        impaired = cluster.wait_rounds(4, "rounds on the impaired link")
        cluster.hosts[2].restore_link()
        restored = cluster.wait_rounds(2, "rounds after the link is restored")
        cluster.check_state()
        cluster.stop()

        figures = {}
        for state_dir, clean_at, impaired_at, restored_at in zip(
                cluster.dirs, before, impaired, restored, strict=True):
            history = rounds(state_dir)
            during = history[impaired_at:restored_at]
            assert all(r["members"] == PEERS for r in history), (
                f"{state_dir.name} made a round without all {PEERS} members")
            figures[state_dir.name] = {
                "rounds_impaired": len(during),
                "round_s_clean": statistics.median(r["round_s"] for r in
                                                   history[clean_at:impaired_at]),
                "round_s_impaired": statistics.median(r["round_s"] for r in during),
                "local_acc_before": history[impaired_at - 1]["local_acc"],
                "local_acc_after": history[-1]["local_acc"],
            }
        print(json.dumps({"link": f"{SLOW_RATE}, {LOSS_PERCENT}% loss each way",
                          "hosts": figures}))
