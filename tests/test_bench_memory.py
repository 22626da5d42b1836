"""`peerd bench memory`: the configurations, the arithmetic of the report, and one real child."""

from __future__ import annotations

import math
from dataclasses import replace

from peerd.bench.memory import MemoryResult, MiB, Row, Shape, measure, shapes
from peerd.capacity import probe_width
from peerd.data import load_task_data
from peerd.submodel import init_params
from peerd.tasks import BLOCK_SIZE, get_task


def test_configurations_are_baseline_full_then_every_depth_shape() -> None:
    listed = shapes(0.25, 3)
    assert [(s.mu, s.depth, s.frozen) for s in listed] == [
        (1.0, None, 0), (1.0, 3, 0), (0.25, 3, 0), (0.25, 3, 1), (0.25, 3, 2), (0.25, 2, 0),
        (0.25, 1, 0)]
    assert [s.describe(3) for s in listed[1:4]] == [
        "full model", "mu 0.25, all blocks", "mu 0.25, all blocks, 1 frozen"]
    assert listed[-1].describe(3) == "mu 0.25, 1 of 3 blocks"


def test_training_peaks_are_medians_less_the_idle_median() -> None:
    idle, full, pruned = shapes(0.25, 2)[:3]
    nan = math.nan
    result = MemoryResult("digits", 5, (
        Row(idle, "idle", (500 * MiB, 510 * MiB, 505 * MiB), 0, (nan, nan, nan)),
        Row(full, "full", (600 * MiB, 605 * MiB, 700 * MiB), 9 * MiB, (0.04, 0.05, 0.09)),
        Row(pruned, "pruned", (550 * MiB, 560 * MiB, 555 * MiB), 2 * MiB, (0.02, 0.01, 0.03))))
    rows = result.to_json()["rows"]
    assert [r["training_mib"] for r in rows] == [0.0, 100.0, 50.0]
    assert [r["spread_mib"] for r in rows] == [10.0, 100.0, 10.0]
    assert rows[2]["training_vs_full"] == 0.5
    assert [r["step_ms"] for r in rows] == [None, 50.0, 20.0]
    assert [r["step_spread_ms"] for r in rows] == [None, 50.0, 20.0]
    assert rows[2]["step_vs_full"] == 0.4
    lines = result.describe().splitlines()
    assert lines[1].split()[-5:] == ["step", "ms", "spread", "vs", "full"]
    assert lines[-1].split()[-3:] == ["20.0", "20.0", "0.40"]


def test_a_child_trains_the_configured_submodel() -> None:
    """The child's accounted step bytes are those of the same probe run here (deterministic),
    and its peak holds at least those bytes on top of the runtime."""
    shape = Shape(0.25, 1, 0)
    peak, accounted, step_s = measure("digits", shape, 1)
    data = load_task_data("digits", None, block_size=BLOCK_SIZE)
    task = get_task("digits")
    spec = task.model(data, early_exits=True)
    here = probe_width(spec, init_params(spec, 0), data.train,
                       replace(task.train, early_exits=True), 0.25, 1, 1, 0)
    assert accounted == here.memory.total_bytes > 0
    assert peak > accounted + 50 * MiB  # torch alone is larger than that
    assert 0 < step_s < math.inf
