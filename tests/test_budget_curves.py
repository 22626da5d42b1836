"""scripts/budget_curves.py on records in diagnose_assembly's format: medians, ranges and seed
counts against per-peer GFLOPs, a clear refusal of a bad row, and the PNG with ranges shaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "budget_curves.py"


def write_records(path: Path, accuracies: list[float]) -> None:
    path.write_text("".join(json.dumps({"round": 4 * (index + 1), "assembled": accuracy}) + "\n"
                            for index, accuracy in enumerate(accuracies)))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def test_medians_ranges_and_seeds_that_reached_each_point(tmp_path: Path) -> None:
    write_records(tmp_path / "a-s0.jsonl", [0.2, 0.5, 0.6])
    write_records(tmp_path / "a-s1.jsonl", [0.4, 0.3])  # still running: two evaluations
    write_records(tmp_path / "b-s2.jsonl", [0.3, 0.7])  # another run's seed, named apart
    png = tmp_path / "curves.png"
    result = run("--png", str(png), "--row", "rowA", "assembled", "2.5",
                 f"{tmp_path / 'a-s*.jsonl'},{tmp_path / 'b-s2.jsonl'}")
    assert result.returncode == 0, result.stderr
    assert "| 10 | 0.300 | 0.200..0.400 | 3 |" in result.stdout
    assert "| 20 | 0.500 | 0.300..0.700 | 3 |" in result.stdout
    assert "| 30 | 0.600 | 0.600..0.600 | 1 |" in result.stdout
    assert "final median 0.600 at 30 GFLOPs; best median 0.600 at 30" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_field_or_bad_cost_is_refused_by_name(tmp_path: Path) -> None:
    write_records(tmp_path / "a-s0.jsonl", [0.2])
    missing = run("--row", "rowA", "sub_global_mean", "2.5", str(tmp_path / "a-s0.jsonl"))
    assert missing.returncode != 0
    assert "no field 'sub_global_mean' in round 4" in missing.stderr
    bad_cost = run("--row", "rowA", "assembled", "lots", str(tmp_path / "a-s0.jsonl"))
    assert bad_cost.returncode != 0
    assert "GFLOPS_PER_ROUND 'lots' is not a number" in bad_cost.stderr
    nothing = run("--row", "rowA", "assembled", "2.5", str(tmp_path / "none-*.jsonl"))
    assert nothing.returncode != 0
    assert "no records match" in nothing.stderr
