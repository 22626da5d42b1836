"""Curves against per-peer training GFLOPs from `scripts/diagnose_assembly.py` records.

Usage: python scripts/budget_curves.py [--png OUT.png] [--title T]
           --row LABEL FIELD GFLOPS_PER_ROUND GLOB [--row ...]

One row per `--row`: the records matching GLOB (one file per seed; several patterns joined by
commas, e.g. a long run of one seed and shorter runs of the others), the figure FIELD of each
evaluation (`assembled`, `sub_global_mean`, ...), placed at round x GFLOPS_PER_ROUND (a peer's
training GFLOPs in one round; `peerd bench compute` or `peerd sim`'s `train_flops_cum_peer_mean`
give it). Prints a markdown table per row: every evaluation's median over the seeds that reached
it, its range and the seed count; then each row's final median and best median. With `--png`
draws the medians with their ranges shaded, one line per row. Records still being written are
read as far as they go (rows with fewer seeds at the end say so in the seed count).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    gflops: float
    median: float
    low: float
    high: float
    seeds: int


def read_row(field: str, gflops_per_round: float, pattern: str) -> list[Point]:
    """Median, range and seed count of FIELD at each evaluated round over the files matching
    the comma-separated patterns."""
    paths = sorted({path for part in pattern.split(",") for path in glob.glob(part)})
    if not paths:
        raise SystemExit(f"no records match {pattern!r}")
    by_round: dict[int, list[float]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if field not in record:
                raise SystemExit(f"{path}: no field {field!r} in round {record['round']}")
            by_round.setdefault(record["round"], []).append(record[field])
    return [Point(round_index * gflops_per_round, statistics.median(values), min(values),
                  max(values), len(values))
            for round_index, values in sorted(by_round.items())]


def print_row(label: str, points: list[Point]) -> None:
    print(f"\n{label}\n\n| GFLOPs per peer | median | range | seeds |\n|---|---|---|---|")
    for point in points:
        print(f"| {point.gflops:.0f} | {point.median:.3f} | {point.low:.3f}..{point.high:.3f} "
              f"| {point.seeds} |")
    best = max(points, key=lambda point: point.median)
    print(f"\nfinal median {points[-1].median:.3f} at {points[-1].gflops:.0f} GFLOPs; best median "
          f"{best.median:.3f} at {best.gflops:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", nargs=4, action="append", required=True,
                        metavar=("LABEL", "FIELD", "GFLOPS_PER_ROUND", "GLOB"))
    parser.add_argument("--png", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = {}
    for label, field, gflops_per_round, pattern in args.row:
        try:
            per_round = float(gflops_per_round)
        except ValueError:
            raise SystemExit(f"--row {label}: GFLOPS_PER_ROUND {gflops_per_round!r} is not a "
                             "number") from None
        rows[label] = read_row(field, per_round, pattern)
        print_row(label, rows[label])
    if args.png:
        from peerd.ops.plots import plot_series  # matplotlib: only when a figure is asked for

        plot_series({label: [(p.gflops, p.median) for p in points]
                     for label, points in rows.items()}, args.png, args.title,
                    "training GFLOPs per peer (cumulative)",
                    "test accuracy (median of seeds, range shaded)",
                    bands={label: [(p.low, p.high) for p in points]
                           for label, points in rows.items()})


if __name__ == "__main__":
    main()
