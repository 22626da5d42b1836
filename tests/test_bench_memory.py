"""`peerd bench memory`: the configurations, the arithmetic of the report, and one real child."""

from __future__ import annotations

from dataclasses import replace

from peerd.algorithm.submodel import init_params
from peerd.bench.memory import MemoryResult, MiB, Row, Shape, run_memory, shapes
from peerd.capacity import probe_width
from peerd.data import load_task_data
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
    result = MemoryResult("digits", 5, (
        Row(idle, "idle", (500 * MiB, 510 * MiB, 505 * MiB), 0, (), ()),
        Row(full, "full", (600 * MiB, 605 * MiB, 700 * MiB), 9 * MiB, (0.04, 0.05, 0.09),
            (0.04, 0.04, 0.05)),
        Row(pruned, "pruned", (550 * MiB, 560 * MiB, 555 * MiB), 2 * MiB, (0.02, 0.01, 0.03),
            (0.01, 0.01, 0.012))))
    rows = result.to_json()["rows"]
    assert [r["training_mib"] for r in rows] == [0.0, 100.0, 50.0]
    assert [r["spread_mib"] for r in rows] == [10.0, 100.0, 10.0]
    assert rows[2]["training_vs_full"] == 0.5
    # Step times: medians over the processes, their spread, the ratio to the full model's.
    assert [r["step_ms"] for r in rows] == [None, 50.0, 20.0]
    assert [r["step_spread_ms"] for r in rows] == [None, 50.0, 20.0]
    assert [r["step_vs_full"] for r in rows] == [None, 1.0, 0.4]
    assert [r["cpu_ms"] for r in rows] == [None, 40.0, 10.0]
    assert [r["cpu_spread_ms"] for r in rows] == [None, 10.0, 2.0]
    assert [r["cpu_vs_full"] for r in rows] == [None, 1.0, 0.25]
    lines = result.describe().splitlines()
    assert lines[1].split()[-10:] == ["wall", "ms", "spread", "vs", "full", "CPU", "ms",
                                      "spread", "vs", "full"]
    assert lines[-1].split()[-6:] == ["20.0", "20.0", "0.40", "10.0", "2.0", "0.25"]


def test_no_ratio_to_a_full_model_whose_training_does_not_peak_above_the_baseline() -> None:
    """On a task as small as digits, setting up can peak higher than training the full model."""
    idle, full, pruned = shapes(0.25, 2)[:3]
    result = MemoryResult("digits", 1, (
        Row(idle, "idle", (500 * MiB,), 0, (), ()),
        Row(full, "full", (500 * MiB,), 9 * MiB, (0.04,), (0.04,)),
        Row(pruned, "pruned", (501 * MiB,), 2 * MiB, (0.02,), (0.01,))))
    assert [r["training_vs_full"] for r in result.to_json()["rows"]] == [None, None, None]
    assert result.describe().splitlines()[-1].split()[3:5] == ["1.0", "2.00"]  # no ratio


def test_real_children_train_the_configured_submodels_and_time_every_one() -> None:
    """One fresh process per configuration: a child's accounted step bytes are those of the same
    probe run here (deterministic), its peak holds at least those bytes on top of the runtime,
    and every configuration that trains has a positive wall and CPU time per step."""
    result = run_memory("digits", 0.25, 1, 1)
    data = load_task_data("digits", None, block_size=BLOCK_SIZE)
    task = get_task("digits")
    spec = task.model(data, early_exits=True)
    here = probe_width(spec, init_params(spec, 0), data.train,
                       replace(task.train, early_exits=True), 0.25, 1, 1, 0)
    shallow = next(row for row in result.rows if row.shape == Shape(0.25, 1, 0))
    assert shallow.accounted == here.memory.total_bytes > 0
    assert shallow.peak > shallow.accounted + 50 * MiB  # torch alone is larger than that
    rows = result.to_json()["rows"]
    assert [row["config"] for row in rows] == [s.describe(2) for s in shapes(0.25, 2)]
    assert rows[0]["step_ms"] is None and rows[0]["cpu_ms"] is None  # the idle baseline
    for row in rows[1:]:
        assert row["step_ms"] > 0 and row["cpu_ms"] > 0, row
