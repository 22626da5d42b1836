"""`peerd compare DIR DIR...`: `peerd sim` or `peerd cluster` runs side by side.

Each DIR holds a run's metrics.jsonl. The table gives, per run, its final metric, the
per-peer training FLOPs until the metric first reached the target, the bytes each peer sent
and the wall time; the plot draws every run's metric against per-peer training FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from peerd.ops.report import METRICS_FIELDS, METRICS_FILE, ReportError, read_jsonl
from peerd.scoring import TASK_SCORING, Metric, task_metric

COLUMNS = ("run", "task", "method", "mu", "peers", "rounds", "final", "GFLOPs/peer to target",
           "KiB sent/peer", "wall s")


@dataclass(frozen=True)
class RunFigures:
    """One run's line of the table and its curve."""

    label: str
    task: str
    method: str
    mu: float | str
    peers: int | str
    rounds: int
    final: float | None
    flops_to_target: float | None  # per peer; None: never reached
    bytes_sent_per_peer: float
    wall_s: float
    curve: list[tuple[float, float]]  # (cumulative per-peer training FLOPs, metric)


def run_figures(run_dir: Path, label: str, metric: Metric, target: float) -> RunFigures:
    records = read_jsonl(run_dir / METRICS_FILE, METRICS_FIELDS)
    evaluated = [r for r in records if r.get(metric.global_key) is not None
                 and math.isfinite(r[metric.global_key])]
    reached = next((r for r in evaluated if metric.reached(r[metric.global_key], target)), None)
    last = records[-1]
    return RunFigures(
        label=label, task=last.get("task", "?"),
        method=last.get("method", "?"), mu=last.get("mu", "?"), peers=last.get("peers", "?"),
        rounds=last["round"],
        final=evaluated[-1][metric.global_key] if evaluated else None,
        flops_to_target=None if reached is None else reached["train_flops_cum_peer_mean"],
        bytes_sent_per_peer=last.get("bytes_sent_cum_peer_mean", math.nan),
        wall_s=last.get("wall_s", math.nan),
        curve=[(r["train_flops_cum_peer_mean"], r[metric.global_key]) for r in evaluated],
    )


def _task(run_dir: Path) -> str:
    return read_jsonl(run_dir / METRICS_FILE, METRICS_FIELDS)[-1].get("task", "?")


def _cells(run: RunFigures) -> tuple[str, ...]:
    mu = f"{run.mu:.3g}" if isinstance(run.mu, float) else str(run.mu)
    return (run.label, run.task, run.method, mu, str(run.peers), str(run.rounds),
            "n/a" if run.final is None else f"{run.final:.4f}",
            "not reached" if run.flops_to_target is None else f"{run.flops_to_target / 1e9:.3f}",
            f"{run.bytes_sent_per_peer / 2**10:.1f}", f"{run.wall_s:.1f}")


def format_table(runs: list[RunFigures], metric: Metric, target: float) -> str:
    rows = [COLUMNS, *(_cells(run) for run in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"final: global {metric.name} at the last evaluated round; target: global "
             f"{metric.name} {'>=' if metric.higher_is_better else '<='} {target}"]
    lines += ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
              for row in rows]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], target: float | None = None,
                 plot_path: Path | None = None) -> tuple[str, Path]:
    """The table (text) and the path of the plot of the runs' curves. Runs must share their
    metric: accuracy and perplexity cannot share an axis."""
    if len(run_dirs) < 2:
        raise ReportError("compare needs at least two run directories")
    tasks = [_task(run_dir) for run_dir in run_dirs]
    metrics = {task_metric(task) for task in tasks}
    if len(metrics) > 1:
        raise ReportError(f"these runs are scored by different metrics ({', '.join(tasks)}): "
                          "compare runs of one kind of task")
    metric = metrics.pop()
    if target is None:
        target = TASK_SCORING[tasks[0]].target if tasks[0] in TASK_SCORING else 0.8
    try:
        metric.check_target(target)
    except ValueError as error:
        raise ReportError(str(error)) from None
    names = [run_dir.resolve().name for run_dir in run_dirs]
    # A run is named by its directory, or by the path given where two share a name.
    labels = [name if names.count(name) == 1 else str(run_dir)
              for name, run_dir in zip(names, run_dirs, strict=True)]
    runs = [run_figures(run_dir, label, metric, target)
            for run_dir, label in zip(run_dirs, labels, strict=True)]
    plot_path = plot_path if plot_path is not None else run_dirs[0] / "compare.png"
    from peerd.ops.plots import plot_series  # matplotlib: only once there is something to draw

    plot_series({run.label: [(flops / 1e9, value) for flops, value in run.curve]
                 for run in runs}, plot_path,
                f"global {metric.name} of {len(runs)} runs (target {target})",
                "training GFLOPs per peer (cumulative)", f"global {metric.name}",
                target=target)
    return format_table(runs, metric, target), plot_path
