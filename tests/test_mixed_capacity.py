"""Mixed capacities with real daemons: widths and depths given per daemon through `peerd
cluster`, and measured widths (`--mu auto`) that must keep to their memory budget."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from daemons import RunningDaemon, start_loopback_daemons, wait_all

from peerd.cluster import ClusterConfig, DaemonProcess, run_cluster
from peerd.net.tls import TlsIdentity
from peerd.ops.status import fetch_status

MIXED = (0.5, 0.25, 0.125)  # cycled over 4 daemons: 0.5, 0.25, 0.125, 0.5
# A short drift period covers every weight in a few rounds: with period 8 and seed 0, coverage
# reaches 1.0 at round 6 for the mixed widths and at round 5 for the mixed depths below (64,
# the default, takes 37 and 23 rounds); peerd sim gives the same plans.
DRIFT_PERIOD = 8
ROUNDS = 6
DEPTHS = (2, 1)  # cycled over 3 daemons: both blocks of the digits CNN, the first, both
DEPTH_ROUNDS = 5  # at mu 0.5


def test_a_mixed_cluster_trains_every_weight(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "4", "--mu",
         ",".join(map(str, MIXED)), "--rounds", str(ROUNDS), "--drift-period",
         str(DRIFT_PERIOD), "--quiet", "--no-mdns",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["mu"] == (0.5 + 0.25 + 0.125 + 0.5) / 4
    # Every entry of the full model was trained by somebody within the run.
    assert records[-1]["coverage"] == 1.0
    # Each daemon trained its own width: forward FLOPs fall with mu.
    flops = [json.loads((tmp_path / f"peer-{i:02d}" / "rounds.jsonl").read_text().splitlines()[0])
             ["forward_flops_per_sample"] for i in range(4)]
    assert flops[0] == flops[3] > flops[1] > flops[2]


def peak_rss_mib(daemons: list[RunningDaemon]) -> dict[str, float]:
    """Each daemon's resident high-water mark (VmHWM), polled until it exits."""
    peaks: dict[str, float] = {}
    while any(d.process.poll() is None for d in daemons):
        for daemon in daemons:
            try:
                status = Path(f"/proc/{daemon.process.pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match:
                peaks[daemon.peer_id] = int(match.group(1)) / 1024
        time.sleep(0.2)
    return peaks


def test_auto_widths_keep_to_the_budget_and_travel_in_the_handshake(tmp_path: Path) -> None:
    # peer-01 is asked for rounds no width can train in time: it takes the narrowest.
    daemons = start_loopback_daemons(tmp_path, 2, ["--mu", "auto", "--rounds", "3"], None,
                                     extra_by_position={0: ["--memory-budget", "1G"],
                                                        1: ["--round-target", "0.001"]})
    peaks = peak_rss_mib(daemons)
    assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
    estimate = re.search(r"mu auto: mu 0\.5: about (\d+) MiB of a 1024 MiB budget",
                         daemons[0].output())
    assert estimate, daemons[0].output()
    assert "mu auto: mu 0.0625" in daemons[1].output()
    # The measured peak stays within the estimate the width was chosen by.
    assert peaks["peer-00"] <= int(estimate.group(1)), (peaks, estimate.group(0))
    for daemon in daemons:
        state = json.loads((daemon.state_dir / "state.json").read_text())
        assert state["view"] == [["peer-00", 0.5], ["peer-01", 0.0625]]


def test_a_budget_no_width_fits_exits_2_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "start", "--insecure", "--no-mdns",
         "--state-dir", str(tmp_path), "--mu", "auto", "--memory-budget", "64M"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "memory budget 64 MiB is too small: even mu 0.0625 needs about" in result.stderr


def depths_in_status(daemons: list[DaemonProcess]) -> dict[str, dict[str, int]]:
    """Each daemon's Status reply: the depth it reports for itself and for every peer it knows
    (learnt in the handshake)."""
    views = {}
    # Called from inside the cluster watcher's event loop: each request gets a loop of its own.
    with ThreadPoolExecutor(1) as pool:
        for daemon in daemons:
            reply = pool.submit(asyncio.run, fetch_status(
                daemon.address, TlsIdentity.load(daemon.tls_dir))).result()
            views[daemon.peer_id] = {reply.self.peer_id: reply.self.capacity.depth,
                                     **{p.peer_id: p.capacity.depth for p in reply.peers}}
    return views


def test_a_mixed_depth_cluster_trains_every_block_and_exit(tmp_path: Path) -> None:
    daemons: list[DaemonProcess] = []
    statuses: list[dict[str, dict[str, int]]] = []

    def after_round(record: dict) -> None:
        if record["round"] == 1:
            statuses.append(depths_in_status(daemons))

    config = ClusterConfig(peers=3, mu=(0.5,), depth=DEPTHS, early_exits=True,
                           rounds=DEPTH_ROUNDS, eval_every=DEPTH_ROUNDS,
                           drift_period=DRIFT_PERIOD, mdns=False,
                           out=str(tmp_path))
    records = run_cluster(config, after_round, daemons.extend)
    # Every entry of every block and exit head was trained by a peer that holds it.
    assert records[-1]["coverage"] == 1.0
    depths = {f"peer-{i:02d}": DEPTHS[i % len(DEPTHS)] for i in range(3)}
    assert statuses == [{peer: depths for peer in depths}]
    # The deep daemons (0 and 2) also train the second block and its exit: more FLOPs.
    flops = [daemon.rounds()[0]["forward_flops_per_sample"] for daemon in daemons]
    assert flops[0] == flops[2] > flops[1] > 0
    spent = records[-1]["train_flops_cum_peer"]
    assert min(spent[0], spent[2]) > spent[1]
