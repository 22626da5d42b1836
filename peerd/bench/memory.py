"""`peerd bench memory`: peak resident memory and training time per step of one peer, with
and without depth pruning and freezing, against the full model (issue 5, benchmark b; the time
column is Co-S2P's other headline figure).

Every configuration runs in a fresh process (spawned, one torch thread), which imports peerd,
loads the task's data and builds the full parameters a daemon holds, then trains `--steps` + 1
steps of its sub-model the way a round does (extract, freeze, SGD with momentum; the task's
batch size, early exits and self-distillation on). It reports its peak resident set
(getrusage ru_maxrss). An idle process doing the same minus the training gives the baseline:
the training's own peak is the difference. Both figures are reported, as medians over
`--repeats` fresh processes with their spread (max - min). The wall time per step is each
process's median over its `--steps` timed steps (the measured first step is the warm-up), then
the median over the processes, with its spread; the CPU time per step (process time) likewise:
on a shared machine the wall time also counts waiting for a core, the CPU time does not.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import torch

from peerd.algorithm.submodel import init_params
from peerd.bench.daemon_memory import DAEMON_WIDTHS, run_daemons_memory
from peerd.bench.processes import child_result, positive_int, print_result
from peerd.capacity import depth_shapes, probe_width
from peerd.models.base import DEPTH
from peerd.tasks import get_task

MiB = 2**20
CHILD_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Shape:
    """One configuration: width, blocks kept (None: the idle baseline) and blocks frozen."""

    mu: float
    depth: int | None
    frozen: int

    def describe(self, blocks: int) -> str:
        if self.depth is None:
            return "idle (imports, data, full parameters)"
        if self.mu == 1.0:
            return "full model"
        pruned = "all blocks" if self.depth == blocks else f"{self.depth} of {blocks} blocks"
        return f"mu {self.mu:g}, {pruned}" + (f", {self.frozen} frozen" if self.frozen else "")


def shapes(mu: float, blocks: int) -> list[Shape]:
    """The baseline, the full model, then width mu at every depth shape the capacity probe
    considers (capacity.depth_shapes)."""
    return [Shape(1.0, None, 0), Shape(1.0, blocks, 0),
            *(Shape(mu, depth, frozen) for depth, frozen in depth_shapes(blocks))]


def _peak_rss(conn: Connection, task: str, shape: Shape, steps: int) -> None:
    """A child: set up as a daemon would, train if a depth is given, send back ru_maxrss, the
    bytes the step accounts for and the median wall and CPU seconds of a timed step (None: no
    training)."""
    torch.set_num_threads(1)
    definition = get_task(task)
    data = definition.load_data(None)
    spec = definition.model(data, early_exits=True)
    params = init_params(spec, 0)
    accounted, times = 0, None
    if shape.depth is not None:
        config = replace(definition.train, early_exits=True)
        probe = probe_width(spec, params, data.train, config, shape.mu, steps, shape.depth,
                            shape.frozen)
        accounted, times = probe.memory.total_bytes, (probe.step_s, probe.step_cpu_s)
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, accounted, times))


def measure(task: str, shape: Shape, steps: int
            ) -> tuple[int, int, tuple[float, float] | None]:
    """(peak RSS in bytes, bytes the training step accounts for, median (wall, CPU) seconds of
    a timed step or None for the idle baseline) of one fresh process."""
    return child_result(_peak_rss, (task, shape, steps), CHILD_TIMEOUT_S, f"{task} {shape}")


@dataclass(frozen=True)
class Row:
    shape: Shape
    label: str
    peaks: tuple[int, ...]  # bytes, one per repeat
    accounted: int  # parameters + gradients + optimizer state + saved activations
    # Seconds of a step, one per repeat (that process's median step); empty for the baseline.
    wall_steps: tuple[float, ...]
    cpu_steps: tuple[float, ...]

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks)

    @property
    def spread(self) -> int:
        return max(self.peaks) - min(self.peaks)


def _median_spread(values: tuple[float, ...]) -> tuple[float, float]:
    return statistics.median(values), max(values) - min(values)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class MemoryResult:
    task: str
    steps: int
    rows: tuple[Row, ...]  # the idle baseline first, then the full model

    def training(self, row: Row) -> float:
        """Peak above the idle baseline (medians)."""
        return row.peak - self.rows[0].peak

    def training_vs_full(self, row: Row) -> float | None:
        """The training's peak as a ratio of the full model's; None where the full model's
        does not rise above the baseline (a task so small that setting up peaks higher)."""
        full = self.training(self.rows[1])
        return None if full <= 0 else self.training(row) / full

    def step_times(self, row: Row) -> dict[str, float | None]:
        """Wall and CPU milliseconds of a step (median over the processes), their spread, and
        their ratio to the full model's; None for the idle baseline, which trains nothing."""
        figures: dict[str, float | None] = {}
        full = self.rows[1]
        for kind, times, full_times in (("step", row.wall_steps, full.wall_steps),
                                        ("cpu", row.cpu_steps, full.cpu_steps)):
            if not times:
                figures |= {f"{kind}_ms": None, f"{kind}_spread_ms": None,
                            f"{kind}_vs_full": None}
                continue
            median, spread = _median_spread(times)
            figures |= {f"{kind}_ms": round(median * 1e3, 2),
                        f"{kind}_spread_ms": round(spread * 1e3, 2),
                        f"{kind}_vs_full": round(median / _median_spread(full_times)[0], 3)}
        return figures

    def to_json(self) -> dict[str, object]:
        return {"task": self.task, "steps": self.steps, "rows": [
            {"config": row.label, "mu": row.shape.mu, "depth": row.shape.depth,
             "frozen": row.shape.frozen, "peak_mib": round(row.peak / MiB, 1),
             "spread_mib": round(row.spread / MiB, 1),
             "training_mib": round(self.training(row) / MiB, 1),
             "training_vs_full": _rounded(self.training_vs_full(row), 3),
             "accounted_mib": round(row.accounted / MiB, 2), **self.step_times(row)}
            for row in self.rows]}

    def describe(self) -> str:
        lines = [f"{self.task}: peak RSS of one peer over {self.steps + 1} training steps, wall "
                 f"and CPU time of a step (medians of {len(self.rows[0].peaks)} fresh processes)",
                 f"{'configuration':<38} {'peak MiB':>9} {'spread':>7} {'training':>9} "
                 f"{'vs full':>8} {'accounted':>10} {'wall ms':>8} {'spread':>7} {'vs full':>8} "
                 f"{'CPU ms':>8} {'spread':>7} {'vs full':>8}"]
        for row in self.rows:
            training = self.training(row)
            line = (f"{row.label:<38} {row.peak / MiB:>9.1f} {row.spread / MiB:>7.1f} "
                    f"{training / MiB:>9.1f}")
            if row.shape.depth is None:
                lines.append(f"{line} {'':>8} {row.accounted / MiB:>10.2f}")
                continue
            times = self.step_times(row)
            ratio = self.training_vs_full(row)
            lines.append(
                f"{line} {'' if ratio is None else f'{ratio:.2f}':>8} {row.accounted / MiB:>10.2f} "
                f"{times['step_ms']:>8.1f} {times['step_spread_ms']:>7.1f} "
                f"{times['step_vs_full']:>8.2f} {times['cpu_ms']:>8.1f} "
                f"{times['cpu_spread_ms']:>7.1f} {times['cpu_vs_full']:>8.2f}")
        return "\n".join(lines)


def run_memory(task: str, mu: float, steps: int, repeats: int) -> MemoryResult:
    definition = get_task(task)
    blocks = definition.model(definition.load_data(None), early_exits=True).groups[DEPTH].units
    configurations = shapes(mu, blocks)
    peaks: dict[Shape, list[int]] = {shape: [] for shape in configurations}
    wall: dict[Shape, list[float]] = {shape: [] for shape in configurations}
    cpu: dict[Shape, list[float]] = {shape: [] for shape in configurations}
    accounted: dict[Shape, int] = {}
    for _ in range(repeats):  # interleaved, so a slow drift of the machine hits every shape
        for shape in configurations:
            peak, accounted[shape], times = measure(task, shape, steps)
            peaks[shape].append(peak)
            if times is not None:
                wall[shape].append(times[0])
                cpu[shape].append(times[1])
    return MemoryResult(task, steps, tuple(
        Row(shape, shape.describe(blocks), tuple(peaks[shape]), accounted[shape],
            tuple(wall[shape]), tuple(cpu[shape]))
        for shape in configurations))


def _widths(text: str) -> tuple[float, ...]:
    try:
        widths = tuple(float(part) for part in text.split(","))
    except ValueError:
        widths = (math.nan,)
    if not all(0 < mu <= 1 for mu in widths):
        raise argparse.ArgumentTypeError(
            f"widths={text!r} is invalid: comma-separated numbers in (0, 1]")
    return widths


def _mu(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"mu={text!r} is invalid: must be in (0, 1)")
    return value


def add_memory_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `memory` (under `peerd bench`); its `func` runs the benchmark."""
    memory = subparsers.add_parser(
        "memory", help="peak RSS and step times of one peer: depth pruning and freezing against "
                       "the full model",
        description="Peak resident memory and wall and CPU time per training step of one peer "
                    "training its sub-model at width mu, with every depth and freezing shape, "
                    "against the full model; each in a fresh process, peaks less an idle "
                    "process's baseline.",
    )
    memory.add_argument("--task", choices=["digits", "fmnist", "kjv", "kjv-large"],
                        default=None, help="which task model (default: fmnist, with --daemon "
                                           "kjv-large)")
    memory.add_argument("--mu", type=_mu, default=0.25, help="width ratio (default: 0.25)")
    memory.add_argument("--steps", type=positive_int, default=5,
                        help="timed training steps per process, after one more measured "
                             "(default: %(default)s)")
    memory.add_argument("--repeats", type=positive_int, default=3,
                        help="fresh processes per configuration (default: %(default)s)")
    memory.add_argument("--json", action="store_true", help="print one JSON object")
    daemon = memory.add_argument_group(
        "--daemon", "real daemon processes on loopback instead: each one's peak RSS (VmHWM) "
                    "against the parameter bytes and a lone process training the full model")
    daemon.add_argument("--daemon", action="store_true",
                        help="measure daemons (see above) instead of one peer's training")
    daemon.add_argument("--widths", type=_widths, default=DAEMON_WIDTHS, metavar="MU[,MU...]",
                        help="the widths of the daemon runs, one run each (default: "
                             "1,0.5,0.25,0.125)")
    daemon.add_argument("--peers", type=positive_int, default=2,
                        help="daemons per run (default: %(default)s)")
    daemon.add_argument("--rounds", type=positive_int, default=2,
                        help="rounds per run (default: %(default)s)")
    memory.set_defaults(func=run_memory_command)


def run_memory_command(args: argparse.Namespace) -> int:
    if args.daemon:
        task = args.task or "kjv-large"
        return print_result("memory", lambda: run_daemons_memory(
            task, args.widths, args.peers, args.rounds), args.json)
    task = args.task or "fmnist"
    return print_result(
        "memory", lambda: run_memory(task, args.mu, args.steps, args.repeats), args.json)
