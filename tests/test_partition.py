"""A network partition between real hosts: three daemons in network namespaces on one bridge;
one host's link goes down for 30 s. The two that keep a quorum drop it and go on; after the
link is back it rejoins and all three train together again (RELIABILITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from daemons import ClusterCa
from netns import bridged_hosts, netns_available
from safetensors.torch import load_file

from peerd.state import CHECKPOINT_DIR, checkpoint_rounds

available, reason = netns_available()
pytestmark = pytest.mark.skipif(not available, reason=reason)

PARTITION_S = 30.0
DEAD_AFTER_S = 5.0
WAIT_S = 240.0


def rounds(state_dir: Path) -> list[dict]:
    path = state_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(
    condition, what: str, processes: list[subprocess.Popen], dirs: list[Path]
) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for process, state_dir in zip(processes, dirs, strict=True):
            log = (state_dir / "out.log").read_text()[-3000:]
            assert process.poll() is None, f"{state_dir.name} exited waiting for {what}:\n{log}"
        assert time.monotonic() < deadline, f"not within {WAIT_S:.0f} s: {what}"
        time.sleep(0.5)


def test_partition_and_heal(tmp_path: Path, cluster_ca: ClusterCa) -> None:
    with bridged_hosts(3, "peerd-part") as hosts:
        dirs = [tmp_path / f"host{i}" for i in range(3)]
        for state_dir in dirs:
            state_dir.mkdir()
        processes = [
            host.popen(
                [sys.executable, "-m", "peerd.cli", "start", "--topology", "ring",
                 "--state-dir", str(state_dir), "--shard", f"{i}/3", "--min-peers", "3",
                 "--threads", "1", "--dead-after", str(DEAD_AFTER_S), "--round-timeout", "60",
                 *cluster_ca.flags(f"host{i}")],
                stdout=(state_dir / "out.log").open("w"), stderr=subprocess.STDOUT)
            for i, (host, state_dir) in enumerate(zip(hosts, dirs, strict=True))
        ]
        majority, cut = dirs[:2], dirs[2]
        wait_until(lambda: all(len(rounds(d)) >= 3 for d in dirs), "3 rounds of 3", processes, dirs)

        # The partition: host2's port on the bridge goes down.
        bridge = hosts[0].name.rsplit("-", 1)[0] + "-br"
        subprocess.run(["ip", "-n", bridge, "link", "set", "v2", "down"], check=True, timeout=10)
        cut_at = len(rounds(cut))
        start = time.monotonic()
        wait_until(lambda: all(sum(r["members"] == 2 for r in rounds(d)) >= 2 for d in majority),
                   "the majority's rounds as two", processes, dirs)
        assert time.monotonic() - start < PARTITION_S, "the majority did not go on in time"
        # The cut-off host makes no round with the others meanwhile.
        assert all(r["members"] == 3 for r in rounds(cut)[cut_at:])
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - start)))
        subprocess.run(["ip", "-n", bridge, "link", "set", "v2", "up"], check=True, timeout=10)
        healed_at = {d: len(rounds(d)) for d in dirs}

        # Healed: every host records rounds of three members again.
        wait_until(lambda: all(any(r["members"] == 3 for r in rounds(d)[healed_at[d]:])
                               for d in dirs), "rounds of three after the heal", processes, dirs)
        for state_dir in dirs:
            history = [r["round"] for r in rounds(state_dir)]
            assert history == sorted(set(history)), "a round recorded twice"
            newest = checkpoint_rounds(state_dir)[-1]
            params = load_file(state_dir / CHECKPOINT_DIR / f"round-{newest:06d}.safetensors")
            assert all(bool(torch.isfinite(t).all()) for t in params.values())
        for process in processes:
            process.terminate()
        for process in processes:
            assert process.wait(timeout=60) == 0
