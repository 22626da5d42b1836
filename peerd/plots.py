"""Learning curves as PNG: the assembled model's quality against per-peer training compute."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: daemons and CI have no display
import matplotlib.pyplot as plt


def plot_curves(records: Sequence[dict], path: Path, title: str) -> None:
    """Global accuracy (perplexity for text) against cumulative per-peer FLOPs and rounds."""
    evaluated = [r for r in records if r.get("global_acc") is not None]
    metric = "global_ppl" if evaluated and "global_ppl" in evaluated[0] else "global_acc"
    label = "global perplexity" if metric == "global_ppl" else "global accuracy"
    figure, (by_flops, by_round) = plt.subplots(1, 2, figsize=(10, 4))
    flops = [r["train_flops_cum_peer_mean"] for r in evaluated]
    values = [r[metric] for r in evaluated]
    by_flops.plot(flops, values, marker=".")
    by_flops.set_xlabel("cumulative training FLOPs per peer")
    by_flops.set_ylabel(label)
    by_round.plot([r["round"] for r in evaluated], values, marker=".")
    by_round.set_xlabel("round")
    by_round.set_ylabel(label)
    for axis in (by_flops, by_round):
        axis.grid(alpha=0.3)
        if metric == "global_ppl":
            axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_series(
    series: dict[str, Sequence[tuple[float, float]]], path: Path, title: str, xlabel: str,
    ylabel: str, log_x: bool = False,
) -> None:
    """One line per label through its (x, y) points: a benchmark's curves side by side."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (label, points) in enumerate(series.items()):
        # Matplotlib's colours repeat after ten lines: the next ten are dashed.
        axis.plot([x for x, _ in points], [y for _, y in points], marker=".", label=label,
                  linestyle="-" if index < 10 else "--")
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
