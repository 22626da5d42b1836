"""`peerd bench capacity --quick` through the CLI: the tables, the compute matching of each
pair, per-peer FLOPs by width, and `--reuse` reading runs back; table d's two runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerd.bench.capacity import (
    DISTILL_DEPTHS,
    DISTILL_TEMPERATURE,
    FLOPS_TOLERANCE,
    PAIRS,
    QUICK_ROUNDS,
    REFERENCES,
    run_capacity,
    run_distill,
)
from peerd.bench.processes import seeds_arg


def _by_name(report: dict) -> dict[str, dict]:
    return {cluster["name"]: cluster for cluster in report["clusters"]}


def test_quick_run_matches_compute_and_reuses_runs(tmp_path: Path) -> None:
    # Through the CLI, as BENCHMARKS.md documents it.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from peerd.cli import main; sys.exit(main())",
         "bench", "capacity", "--quick", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rounds"] == QUICK_ROUNDS and report["seeds"] == [0] and report["peers"] == 8
    assert json.loads((tmp_path / "capacity.json").read_text()) == report
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "capacity.md").read_text()
    clusters = _by_name(report)
    names = [c.name for pair in PAIRS for c in (pair.mixed, pair.homogeneous)]
    assert list(clusters) == names + [c.name for c in REFERENCES]
    for name in clusters:
        assert f"| {name} |" in markdown

    # Each pair spends the same total training FLOPs, planned and as the runs counted them.
    assert len(report["pairs"]) == len(PAIRS) >= 2
    for pair in report["pairs"]:
        for ratio in pair["flops_ratio"].values():
            assert abs(ratio - 1) <= FLOPS_TOLERANCE
        measured = clusters[pair["mixed"]]["total_train_flops"] \
            / clusters[pair["homogeneous"]]["total_train_flops"]
        assert abs(measured - pair["flops_ratio"]["measured"]) < 1e-3

    for cluster in clusters.values():
        rows = cluster["by_width"]  # widest first
        assert sum(row["peers"] for row in rows) == 8
        forward = [row["forward_flops_per_sample"] for row in rows]
        per_round = [row["train_flops_per_round"] for row in rows]
        assert forward == sorted(forward, reverse=True) and len(set(forward)) == len(forward)
        assert per_round == sorted(per_round, reverse=True)
        # iid shards of equal size: training FLOPs per forward FLOP (3 x samples trained) is
        # the same for every width, to within a sample or two of shard size.
        samples = [t / f for t, f in zip(per_round, forward, strict=True)]
        assert max(samples) / min(samples) < 1.02
        # Per position: a peer's FLOPs follow its width.
        (run,) = cluster["seeds"]
        by_position = sorted(zip(cluster["mu"], run["train_flops"], strict=True))
        flops_in_width_order = [flops for _, flops in by_position]
        assert flops_in_width_order == sorted(flops_in_width_order)
        assert 0 <= cluster["global_acc"]["median"] <= 1
        assert all(0 <= acc <= 1 for acc in run["peer_acc"])

    # --reuse reads the stored runs back rather than training again: an edited run shows.
    metrics = tmp_path / "runs" / "mixed-A-seed0" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        record["global_acc"] = 0.625
    metrics.write_text("".join(json.dumps(record) + "\n" for record in records))
    threads = torch.get_num_threads()
    try:
        rerun = run_capacity("digits", QUICK_ROUNDS, (0,), tmp_path, reuse=True, quick=True)
    finally:
        torch.set_num_threads(threads)
    reused = _by_name(json.loads(json.dumps(rerun.to_json())))
    assert reused["mixed-A"]["global_acc"]["median"] == 0.625
    assert reused["homogeneous-0.5"] == clusters["homogeneous-0.5"]


def test_quick_distill_table_runs_distillation_on_and_off(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        result = run_distill("digits", QUICK_ROUNDS, (0,), tmp_path, quick=True)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "capacity-distill.json").read_text())
    assert report == json.loads(json.dumps(result.to_json()))
    on, off = report["clusters"]
    assert (on["name"], off["name"]) == ("distill-on", "distill-off")
    assert on["config"]["train"]["distill_temperature"] == DISTILL_TEMPERATURE
    assert off["config"]["train"]["distill_temperature"] is None
    # The run that trained is the one described: its stored config has distillation off too.
    stored = json.loads((tmp_path / "runs" / "distill-off-seed0" / "config.json").read_text())
    assert stored == off["config"]
    for cluster in (on, off):
        assert cluster["config"]["train"]["early_exits"] is True
        assert tuple(cluster["config"]["depth"]) == DISTILL_DEPTHS
        # The shallow peers drop a block: each trains fewer FLOPs than any deep peer.
        (run,) = cluster["seeds"]
        depth = [DISTILL_DEPTHS[p % len(DISTILL_DEPTHS)] for p in range(8)]
        shallow = [f for f, d in zip(run["train_flops"], depth, strict=True) if d == 1]
        deep = [f for f, d in zip(run["train_flops"], depth, strict=True) if d == 2]
        assert report["blocks"] == 2 and max(shallow) < min(deep)
    figures = [row["figure"] for row in report["rows"]]
    assert figures == ["global accuracy", "own accuracy, depth 1 (4 peers)",
                       "own accuracy, depth 2 (4 peers)"]
    markdown = (tmp_path / "capacity-distill.md").read_text()
    assert all(f"| {figure} |" in markdown for figure in figures)
    assert (tmp_path / "capacity-distill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_seeds_are_refused_by_name() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="seed is repeated"):
        seeds_arg("1,1")
    with pytest.raises(argparse.ArgumentTypeError, match="seeds 'one'"):
        seeds_arg("one")
