"""Three hosts in network namespaces on one bridge: `peerd start --topology ring` with no
addresses given finds the others by mDNS multicast alone and completes its rounds, with mixed
capacities: widths and depths (early exits; one width and depth measured: --mu auto)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemons import ClusterCa
from netns import bridged_hosts, netns_available

available, reason = netns_available()
pytestmark = pytest.mark.skipif(not available, reason=reason)

ROUNDS = 2
# host0 keeps both blocks of the digits CNN, host1 the first; host2 measures its width and
# depth: a round target no shape can meet makes it take the narrowest and shallowest.
CAPACITIES = (["--mu", "0.5"], ["--mu", "0.25", "--depth", "1"],
              ["--mu", "auto", "--round-target", "0.001"])
VIEW = [["host0", 0.5], ["host1", 0.25, 1], ["host2", 0.0625, 1]]


def test_three_namespaced_daemons_find_each_other_by_mdns(
    tmp_path: Path, cluster_ca: ClusterCa
) -> None:
    with bridged_hosts(3, "peerd-mdns") as hosts:
        processes = []
        for position, host in enumerate(hosts):
            state_dir = tmp_path / f"host{position}"
            processes.append(host.popen(
                [sys.executable, "-m", "peerd.cli", "start", "--topology", "ring",
                 "--state-dir", str(state_dir), "--shard", f"{position}/3", "--rounds",
                 str(ROUNDS), "--min-peers", "3", "--threads", "1", "--early-exits",
                 *CAPACITIES[position],
                 *cluster_ca.flags(f"host{position}")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        outputs = []
        for process in processes:
            output, _ = process.communicate(timeout=240)
            outputs.append(output)
            assert process.returncode == 0, output
        for host, output in zip(hosts, outputs, strict=True):
            assert f"serving on {host.address}:7470" in output, output
            assert f"{ROUNDS} rounds, 3 members" in output, output
        assert "no width trains a round within 0.001 s" in outputs[2]
        # Every member planned with everyone's width and depth, host2's as it measured them.
        for position in range(3):
            state = json.loads((tmp_path / f"host{position}" / "state.json").read_text())
            assert state["view"] == VIEW
