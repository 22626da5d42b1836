"""A peer that starts while a cluster is running joins at a round all members agree on, starts
from the members' current parameters, and trains with them to the end, in strict rounds and in
semi-asynchronous ones (where the joiner, slow in its first round, may skip to the others')."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from daemons import ClusterCa, RunningDaemon, kill_all, start_loopback_daemons, wait_all
from safetensors.torch import load_file

from peerd.cluster import free_ports

ROUNDS = 20


def increasing_to_the_end(rounds: list[int], first: int) -> bool:
    """Strict rounds run every round; semi-asynchronous ones may skip to their neighbours'."""
    return rounds[0] == first and rounds == sorted(set(rounds)) and rounds[-1] == ROUNDS


@pytest.mark.parametrize("strict", [True, False], ids=["sync", "semi-async"])
def test_late_peer_joins_a_running_ring(tmp_path: Path, cluster_ca: ClusterCa,
                                        strict: bool) -> None:
    (late_port,) = free_ports(1)
    late_address = f"127.0.0.1:{late_port}"
    mode = ["--sync"] if strict else []
    members = start_loopback_daemons(
        tmp_path, 3, ["--rounds", str(ROUNDS), "--topology", "ring", "--peer", late_address,
                      *mode], cluster_ca)
    late: RunningDaemon | None = None
    try:
        for member in members:
            member.wait_rounds(1)
        state_dir = tmp_path / "peer-03"
        state_dir.mkdir()
        args = [sys.executable, "-m", "peerd.cli", "start", "--no-mdns", "--host", "127.0.0.1",
                "--port", str(late_port), "--peer-id", "peer-03", "--state-dir", str(state_dir),
                "--shard", "3/4", "--rounds", str(ROUNDS), "--min-peers", "3", "--threads", "1",
                *cluster_ca.flags("peer-03"), *mode,
                *[arg for m in members for arg in ("--peer", m.address)]]
        with open(state_dir / "out.log", "w") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        late = RunningDaemon("peer-03", late_address, state_dir, process)
        everyone = [*members, late]
        assert wait_all(everyone, timeout_s=240) == [0, 0, 0, 0], [d.output() for d in everyone]

        joined_rounds = [r["round"] for r in late.rounds()]
        first = joined_rounds[0]
        assert 2 < first <= ROUNDS
        if strict:
            assert joined_rounds == list(range(first, ROUNDS + 1))
        else:
            assert increasing_to_the_end(joined_rounds, first)
        for member in members:
            history = {r["round"]: r for r in member.rounds()}
            if strict:
                assert sorted(history) == list(range(1, ROUNDS + 1))
            else:
                # A member never skips the round before a join nor the join's round.
                assert increasing_to_the_end([r["round"] for r in member.rounds()], 1)
            # Ring of three before the join (everyone is a neighbour), of four after it.
            assert len(history[first - 1]["neighbours"]) == 2
            expected_after = {"peer-00": ["peer-01", "peer-03"],
                              "peer-01": ["peer-00", "peer-02"],
                              "peer-02": ["peer-01", "peer-03"]}[member.peer_id]
            assert history[first]["neighbours"] == expected_after
        for daemon in everyone:
            meta = json.loads((daemon.state_dir / "state.json").read_text())
            assert [peer for peer, _ in meta["view"]] == ["peer-00", "peer-01", "peer-02",
                                                          "peer-03"]
            params = load_file(daemon.state_dir / "params.safetensors")
            assert all(bool(t.isfinite().all()) for t in params.values())
        assert all(math.isfinite(r["train_loss"]) for r in late.rounds())
    finally:
        kill_all([*members, *([late] if late else [])])
