"""Mixed capacities with real daemons: widths given per daemon through `peerd cluster`, and
measured ones (`--mu auto`) that must keep to their memory budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from daemons import RunningDaemon, start_loopback_daemons, wait_all

MIXED = (0.5, 0.25, 0.125)  # cycled over 4 daemons: 0.5, 0.25, 0.125, 0.5
# Coverage reaches 1.0 at round 11 for seed 0 and the default regroup period (5); peerd sim
# gives the same plans.
ROUNDS = 12


def test_a_mixed_cluster_trains_every_weight(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "4", "--mu",
         ",".join(map(str, MIXED)), "--rounds", str(ROUNDS), "--quiet", "--no-mdns",
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
