"""`peerd bench compute`: a small real run through the CLI (its measurements are
peerd.capacity's, tested in test_capacity.py)."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {"task", "mu", "step_ms", "step_ratio", "flops_ratio", "memory_bytes", "memory_ratio",
        "activation_bytes", "params"}


def test_small_run_reports_every_key() -> None:
    # Through the CLI, as BENCHMARKS.md documents it.
    result = subprocess.run(
        [sys.executable, "-c", "from peerd.cli import main; main()", "bench", "compute",
         "--task", "fmnist", "--mu", "0.5", "--steps", "2", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["threads"] == 1
    full, half = report["results"]
    assert set(full) >= KEYS and set(half) >= KEYS
    assert (full["task"], full["mu"], half["task"], half["mu"]) == ("fmnist", 1.0, "fmnist", 0.5)
    assert full["step_ratio"] == full["flops_ratio"] == full["memory_ratio"] == 1.0
    assert 0.2 < half["flops_ratio"] < 0.35  # about mu^2
    assert half["step_ms"] > 0 and half["steps"] == 2
    for row in (full, half):
        # SGD with momentum: one gradient and one momentum buffer per parameter, float32.
        assert row["param_bytes"] == row["grad_bytes"] == row["optimizer_bytes"] \
            == 4 * row["params"]
        assert row["memory_bytes"] == 3 * 4 * row["params"] + row["activation_bytes"]
    assert 0 < half["activation_bytes"] < full["activation_bytes"]
    assert half["memory_ratio"] < 1.0
