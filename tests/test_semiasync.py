"""Semi-asynchronous rounds with real daemons over mutual TLS: a daemon slowed down does not
hold its neighbours; it skips to their rounds, its late slices are merged by them with a
staleness weight and never beyond the bound, and everybody ends at the last round with finite
parameters."""

from __future__ import annotations

import math
from pathlib import Path

from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all
from safetensors.torch import load_file

ROUNDS = 10
MAX_STALENESS = 4
SLOW = 3  # peer-03: on the ring, a neighbour of peer-00 and peer-02
SLOWDOWN = 4


def test_a_slow_daemon_does_not_hold_its_neighbours(tmp_path: Path, cluster_ca: ClusterCa) -> None:
    daemons = start_loopback_daemons(
        tmp_path, 4, ["--rounds", str(ROUNDS), "--topology", "ring",
                      "--max-staleness", str(MAX_STALENESS)], cluster_ca,
        extra_by_position={SLOW: ["--slowdown", str(SLOWDOWN)]})
    try:
        assert wait_all(daemons, timeout_s=300) == [0, 0, 0, 0], [d.output() for d in daemons]
    finally:
        kill_all(daemons)
    slow = daemons[SLOW]
    neighbours_of_slow = [daemons[0], daemons[2]]
    for daemon in daemons:
        records = daemon.rounds()
        assert records[-1]["round"] == ROUNDS, daemon.peer_id
        numbers = [r["round"] for r in records]
        assert numbers == sorted(set(numbers)), daemon.peer_id
        assert all(math.isfinite(r["train_loss"]) for r in records), daemon.peer_id
        params = load_file(daemon.state_dir / "params.safetensors")
        assert all(bool(t.isfinite().all()) for t in params.values()), daemon.peer_id
        for record in records:
            assert all(1 <= s <= MAX_STALENESS for s in record["late_merged_staleness"])
    # The slow daemon skipped rounds to keep up instead of running every one behind the others.
    assert len(slow.rounds()) < ROUNDS
    assert "skipping to it" in slow.output()
    for daemon in neighbours_of_slow:
        records = daemon.rounds()
        # Its neighbours closed rounds without it, and merged its slices when they came late.
        assert any(slow.peer_id in r["merged_without"] for r in records), daemon.peer_id
        assert any(r["late_merged_staleness"] for r in records), daemon.peer_id
        assert len(records) > len(slow.rounds()), daemon.peer_id
