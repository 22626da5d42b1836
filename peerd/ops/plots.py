"""Learning curves as PNG: the assembled model's quality and the training loss against rounds
and per-peer training compute."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: daemons and CI have no display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_curves(records: Sequence[dict], path: Path, title: str) -> None:
    """The assembled model's metric (accuracy, or perplexity for text) and the peers' mean
    training loss, each against rounds and against cumulative per-peer training FLOPs."""
    evaluated = [r for r in records if r.get("global_acc") is not None]
    text = bool(evaluated) and evaluated[0].get("global_ppl") is not None
    metric, metric_label = (("global_ppl", "global perplexity (log scale)") if text
                            else ("global_acc", "global accuracy"))
    figure = Figure(figsize=(10, 7))
    axes = figure.subplots(2, 2)
    rows = ((evaluated, metric, metric_label),
            (records, "train_loss_mean", "train loss (mean over peers)"))
    columns = (("round", "round"),
               ("train_flops_cum_peer_mean", "training FLOPs per peer (cumulative)"))
    for row, (shown, field, label) in zip(axes, rows, strict=True):
        for axis, (x_field, x_label) in zip(row, columns, strict=True):
            axis.plot([r[x_field] for r in shown], [r.get(field, math.nan) for r in shown],
                      marker=".")
            axis.set_xlabel(x_label)
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            if x_field == "round":
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            if field == "global_ppl":
                axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_series(
    series: dict[str, Sequence[tuple[float, float]]], path: Path, title: str, xlabel: str,
    ylabel: str, log_x: bool = False, target: float | None = None,
    bands: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> None:
    """One line per label through its (x, y) points: a benchmark's curves side by side; a
    dotted line at `target` when given; a label's (low, high) at each of its points shaded
    when `bands` has it (the range over seeds)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if target is not None:
        axis.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    for index, (label, points) in enumerate(series.items()):
        x = [x for x, _ in points]
        # Matplotlib's colours repeat after ten lines: the next ten are dashed.
        line, = axis.plot(x, [y for _, y in points], marker=".", label=label,
                          linestyle="-" if index < 10 else "--")
        if bands is not None and label in bands:
            axis.fill_between(x, [low for low, _ in bands[label]],
                              [high for _, high in bands[label]], color=line.get_color(),
                              alpha=0.2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if log_x:
        axis.set_xscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
